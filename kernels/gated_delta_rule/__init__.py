"""Gated delta rule: S_t = exp(g_t) S_{t-1} + beta_t k_t (v_t - exp(g_t) S_{t-1}^T k_t)^T,
o_t = S_t^T (q_t * scale), with L2-normalised q and k.

The Triton kernels (triton_chunk.py, triton_fused_recurrent.py, triton_chunk_autograd.py)
import triton, so they load on first use: through `kernels.dispatch`, or by name here.
"""

import importlib

from .chunk import chunk_gated_delta_rule
from .fused_recurrent import (
    fused_recurrent_gated_delta_rule,
    fused_recurrent_gated_delta_rule_from_gates,
    gated_delta_rule_gates,
)
from .naive import naive_recurrent_gated_delta_rule

# name -> module, imported on first access (keeps triton optional on CPU installs)
_TRITON_EXPORTS = {"chunk_gated_delta_rule_autograd": ".triton_chunk_autograd"}


def __getattr__(name: str):
    if name in _TRITON_EXPORTS:
        return getattr(importlib.import_module(_TRITON_EXPORTS[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "chunk_gated_delta_rule",
    "chunk_gated_delta_rule_autograd",
    "fused_recurrent_gated_delta_rule",
    "fused_recurrent_gated_delta_rule_from_gates",
    "gated_delta_rule_gates",
    "naive_recurrent_gated_delta_rule",
]
