"""Linear-attention kernels of the JetBlock.

One sub-package per operation family, each with `naive.py` (the definition in plain
PyTorch, used by the reference model and as the test oracle) and the implementations
vLLM runs (`cpu.py` here; Triton kernels for GPUs sit beside them).

State layout everywhere: the recurrent state of one sequence is `[H, K, V]` (keys by
values, as in flash-linear-attention); conv states are `[W - 1, D]` (time first).
"""

from .dynamic_conv import (
    dynamic_causal_conv,
    dynamic_causal_conv_naive,
    dynamic_causal_conv_step,
)
from .gated_delta_rule import (
    chunk_gated_delta_rule,
    fused_recurrent_gated_delta_rule,
    naive_recurrent_gated_delta_rule,
)
from .gated_rmsnorm import gated_rmsnorm, gated_rmsnorm_naive

__all__ = [
    "chunk_gated_delta_rule",
    "dynamic_causal_conv",
    "dynamic_causal_conv_naive",
    "dynamic_causal_conv_step",
    "fused_recurrent_gated_delta_rule",
    "gated_rmsnorm",
    "gated_rmsnorm_naive",
    "naive_recurrent_gated_delta_rule",
]
