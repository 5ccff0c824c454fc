"""Gated RMSNorm of the JetBlock output: rmsnorm(x) * weight * silu(z), per head over V.
`naive.py` is the definition and the CPU path (one fused elementwise expression under
Inductor); `triton_norm.py` runs on GPUs, through `kernels.dispatch`."""

from .naive import gated_rmsnorm_naive

__all__ = ["gated_rmsnorm_naive"]
