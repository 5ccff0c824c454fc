"""Linear-attention kernels of the JetBlock.

One sub-package per operation family, the same file names in each (as in
flash-linear-attention's `fla/ops/<algorithm>/`): `naive.py`, the definition in plain
PyTorch (the reference model's and the tests' oracle; for the gated delta rule also the
chunked form the converter trains with), `gate.py` where a family has gating, `cpu.py`,
what vLLM runs on the CPU, and `triton_*.py`, the GPU kernels and their autograd. The
operations exported here are the routed ones (`dispatch`, which documents the contract
every implementation honours): the same call runs Triton on CUDA tensors and the CPU
implementation otherwise. Nothing here imports triton until a GPU call needs it.
"""

from .dispatch import (
    chunk_gated_delta_rule,
    dynamic_causal_conv,
    dynamic_causal_conv_spec_decode,
    dynamic_causal_conv_step,
    fused_recurrent_gated_delta_rule,
    fused_recurrent_gated_delta_rule_from_gates,
    fused_recurrent_gated_delta_rule_varlen,
    gated_delta_rule_decode,
    gated_delta_rule_gates,
    gated_rmsnorm,
)
from .dynamic_conv.naive import dynamic_causal_conv_naive
from .gated_delta_rule.naive import naive_recurrent_gated_delta_rule
from .gated_rmsnorm.naive import gated_rmsnorm_naive

__all__ = [
    "chunk_gated_delta_rule",
    "dynamic_causal_conv",
    "dynamic_causal_conv_naive",
    "dynamic_causal_conv_spec_decode",
    "dynamic_causal_conv_step",
    "fused_recurrent_gated_delta_rule",
    "fused_recurrent_gated_delta_rule_from_gates",
    "fused_recurrent_gated_delta_rule_varlen",
    "gated_delta_rule_decode",
    "gated_delta_rule_gates",
    "gated_rmsnorm",
    "gated_rmsnorm_naive",
    "naive_recurrent_gated_delta_rule",
]
