"""The JetBlock's stateful operations as vLLM runs them: the one place that chooses an
implementation. Today every device runs the PyTorch CPU implementations of `kernels`
(varlen prefill, in-place decode steps on the state pool); the Triton kernels plug in
here for tensors on a GPU."""

from vllm_jetnemotron.kernels import (
    chunk_gated_delta_rule,
    dynamic_causal_conv,
    dynamic_causal_conv_step,
    fused_recurrent_gated_delta_rule,
    gated_rmsnorm,
)
from vllm_jetnemotron.kernels.dynamic_conv.cpu import dynamic_causal_conv_spec_decode

__all__ = [
    "chunk_gated_delta_rule",
    "dynamic_causal_conv",
    "dynamic_causal_conv_spec_decode",
    "dynamic_causal_conv_step",
    "fused_recurrent_gated_delta_rule",
    "gated_rmsnorm",
]
