"""Linear-attention kernels of the JetBlock.

One sub-package per operation family, each with `naive.py` (the definition in plain
PyTorch, used by the reference model and as the test oracle) and the implementations
vLLM runs: `cpu.py` / `chunk.py` / `fused_recurrent.py` on the CPU, `triton_*.py` on
GPUs. The operations exported here are the routed ones (`dispatch`, which documents the
contract every implementation honours): the same call runs Triton on CUDA tensors and
the CPU implementation otherwise. The training functions (`*_autograd`, Triton) load on
first access, so importing this package never imports triton.
"""

import importlib

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
    "fused_recurrent_gated_delta_rule_varlen",
    "gated_delta_rule_decode",
    "gated_delta_rule_gates",
    "gated_rmsnorm",
    "gated_rmsnorm_naive",
    "naive_recurrent_gated_delta_rule",
]
