"""Gated RMSNorm of the JetBlock output: rmsnorm(x) * weight * silu(z), per head over V."""

from .naive import gated_rmsnorm_naive

# The CPU path is the definition itself: one fused elementwise expression.
gated_rmsnorm = gated_rmsnorm_naive

__all__ = ["gated_rmsnorm", "gated_rmsnorm_naive"]
