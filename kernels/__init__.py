"""Linear-attention kernels of the JetBlock.

One sub-package per operation family, each with `naive.py` (the definition in plain
PyTorch, used by the reference model and as the test oracle) and the implementations
vLLM runs (`cpu.py` here; Triton kernels for GPUs sit beside them as `triton_*.py`).
`dispatch` exposes the CPU functions' names and picks Triton for CUDA tensors; the
training functions (`*_autograd`, Triton) load on first access, so importing this
package never imports triton.

State layout everywhere: the recurrent state of one sequence is `[H, K, V]` (keys by
values, as in flash-linear-attention); conv states are `[W - 1, D]` (time first).
"""

import importlib

from .dynamic_conv import (
    dynamic_causal_conv,
    dynamic_causal_conv_naive,
    dynamic_causal_conv_spec_decode,
    dynamic_causal_conv_step,
)
from .gated_delta_rule import (
    chunk_gated_delta_rule,
    fused_recurrent_gated_delta_rule,
    fused_recurrent_gated_delta_rule_from_gates,
    gated_delta_rule_gates,
    naive_recurrent_gated_delta_rule,
)
from .gated_rmsnorm import gated_rmsnorm, gated_rmsnorm_naive

# name -> module, imported on first access (keeps triton optional on CPU installs)
_TRITON_EXPORTS = {
    "chunk_gated_delta_rule_autograd": ".gated_delta_rule.triton_chunk_autograd",
    "dynamic_causal_conv_autograd": ".dynamic_conv.triton_conv_autograd",
}


def __getattr__(name: str):
    if name in _TRITON_EXPORTS:
        return getattr(importlib.import_module(_TRITON_EXPORTS[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "chunk_gated_delta_rule",
    "chunk_gated_delta_rule_autograd",
    "dynamic_causal_conv",
    "dynamic_causal_conv_autograd",
    "dynamic_causal_conv_naive",
    "dynamic_causal_conv_spec_decode",
    "dynamic_causal_conv_step",
    "fused_recurrent_gated_delta_rule",
    "fused_recurrent_gated_delta_rule_from_gates",
    "gated_delta_rule_gates",
    "gated_rmsnorm",
    "gated_rmsnorm_naive",
    "naive_recurrent_gated_delta_rule",
]
