"""Linear-attention kernels of the JetBlock.

One sub-package per operation family, the same file names in each (as in
flash-linear-attention's `fla/ops/<algorithm>/`): `naive.py`, the definition in plain
PyTorch (the reference model's and the tests' oracle; for the gated delta rule also the
chunked form the converter trains with), `gate.py` where a family has gating, `cpu.py`,
what vLLM runs on the CPU, and `triton_*.py`, the GPU kernels and their autograd. The
operations exported here are the routed ones (`dispatch`, which documents the contract
every implementation honours), named by phase as vLLM calls them (`*_prefill`, `*_step`,
`*_spec_decode`): the same call runs Triton on CUDA tensors and the CPU implementation
otherwise. The gated delta rule's take the raw gate projections (`gated_delta_rule_gates`,
exported too, computes g and beta from them). Nothing here imports triton until a GPU call
needs it.
"""

# The families first: loading a sub-package binds its name here, and `gated_rmsnorm` must
# end up the routed function below, not the sub-package of the same name.
from .dynamic_conv.naive import dynamic_causal_conv_naive
from .gated_delta_rule.gate import gated_delta_rule_gates
from .gated_delta_rule.naive import naive_recurrent_gated_delta_rule
from .gated_rmsnorm.naive import gated_rmsnorm_naive

from .dispatch import (  # noqa: I001 (after the families, see above)
    dynamic_conv_prefill,
    dynamic_conv_spec_decode,
    dynamic_conv_step,
    gated_delta_rule_prefill,
    gated_delta_rule_spec_decode,
    gated_delta_rule_step,
    gated_rmsnorm,
)

__all__ = [
    "dynamic_causal_conv_naive",
    "dynamic_conv_prefill",
    "dynamic_conv_spec_decode",
    "dynamic_conv_step",
    "gated_delta_rule_gates",
    "gated_delta_rule_prefill",
    "gated_delta_rule_spec_decode",
    "gated_delta_rule_step",
    "gated_rmsnorm",
    "gated_rmsnorm_naive",
    "naive_recurrent_gated_delta_rule",
]
