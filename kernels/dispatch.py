"""The JetBlock's stateful operations, each routed by device: the Triton kernel when the
input tensor is on a CUDA (or ROCm) device, the PyTorch CPU implementation otherwise.
Same names, signatures and semantics as the CPU functions of this package. Triton is
imported only on the first GPU call, so CPU-only installs never need it."""

import torch

from .dynamic_conv import cpu as _conv_cpu
from .gated_delta_rule import chunk as _chunk_cpu
from .gated_delta_rule import fused_recurrent as _recurrent_cpu
from .gated_rmsnorm import naive as _norm_cpu


def _on_gpu(x: torch.Tensor) -> bool:
    return x.device.type == "cuda"


def chunk_gated_delta_rule(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    cu_seqlens: torch.Tensor,
    state_pool: torch.Tensor,
    state_indices: torch.Tensor,
    has_initial_state: torch.Tensor,
    scale: float | None = None,
    use_qk_l2norm: bool = True,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """Varlen prefill, states in a pool; see `gated_delta_rule.chunk.chunk_gated_delta_rule`.
    `chunk_size` None: each implementation's own (Triton 64, CPU 32); the result does not
    depend on it beyond rounding."""
    if _on_gpu(q):
        from .gated_delta_rule.triton_chunk import chunk_gated_delta_rule as impl
    else:
        impl = _chunk_cpu.chunk_gated_delta_rule
    chunking = {} if chunk_size is None else {"chunk_size": chunk_size}
    return impl(q, k, v, g, beta, cu_seqlens, state_pool, state_indices, has_initial_state,
                scale, use_qk_l2norm, **chunking)


def fused_recurrent_gated_delta_rule(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    state_pool: torch.Tensor,
    state_indices: torch.Tensor,
    scale: float | None = None,
    use_qk_l2norm: bool = True,
    num_accepted_tokens: torch.Tensor | None = None,
) -> torch.Tensor:
    """Decode steps (speculative ones with `num_accepted_tokens`), states updated in
    place; see `gated_delta_rule.fused_recurrent.fused_recurrent_gated_delta_rule`."""
    if _on_gpu(q):
        from .gated_delta_rule.triton_fused_recurrent import fused_recurrent_gated_delta_rule as impl
    else:
        impl = _recurrent_cpu.fused_recurrent_gated_delta_rule
    return impl(q, k, v, g, beta, state_pool, state_indices, scale, use_qk_l2norm, num_accepted_tokens)


def fused_recurrent_gated_delta_rule_from_gates(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    A_log: torch.Tensor,
    dt_bias: torch.Tensor,
    state_pool: torch.Tensor,
    state_indices: torch.Tensor,
    scale: float | None = None,
    use_qk_l2norm: bool = True,
    num_accepted_tokens: torch.Tensor | None = None,
) -> torch.Tensor:
    """Decode steps from the raw gate projections (g and beta computed inside); see
    `gated_delta_rule.fused_recurrent.fused_recurrent_gated_delta_rule_from_gates`."""
    if _on_gpu(q):
        from .gated_delta_rule.triton_fused_recurrent import fused_recurrent_gated_delta_rule_from_gates as impl
    else:
        impl = _recurrent_cpu.fused_recurrent_gated_delta_rule_from_gates
    return impl(q, k, v, a, b, A_log, dt_bias, state_pool, state_indices, scale, use_qk_l2norm,
                num_accepted_tokens)


def dynamic_causal_conv(
    x: torch.Tensor,
    kernels: torch.Tensor,
    cu_seqlens: torch.Tensor,
    state_pool: torch.Tensor,
    state_indices: torch.Tensor,
    has_initial_state: torch.Tensor,
) -> torch.Tensor:
    """Varlen prefill, conv states in a pool; see `dynamic_conv.cpu.dynamic_causal_conv`."""
    if _on_gpu(x):
        from .dynamic_conv.triton_conv import dynamic_causal_conv as impl
    else:
        impl = _conv_cpu.dynamic_causal_conv
    return impl(x, kernels, cu_seqlens, state_pool, state_indices, has_initial_state)


def dynamic_causal_conv_step(
    x: torch.Tensor,
    kernels: torch.Tensor,
    state_pool: torch.Tensor,
    state_indices: torch.Tensor,
) -> torch.Tensor:
    """One decode token per sequence; see `dynamic_conv.cpu.dynamic_causal_conv_step`."""
    if _on_gpu(x):
        from .dynamic_conv.triton_conv import dynamic_causal_conv_step as impl
    else:
        impl = _conv_cpu.dynamic_causal_conv_step
    return impl(x, kernels, state_pool, state_indices)


def dynamic_causal_conv_spec_decode(
    x: torch.Tensor,
    kernels: torch.Tensor,
    cu_seqlens: torch.Tensor,
    state_pool: torch.Tensor,
    state_indices: torch.Tensor,
    num_accepted_tokens: torch.Tensor,
) -> torch.Tensor:
    """Speculative-decoding step with wide conv histories; see
    `dynamic_conv.cpu.dynamic_causal_conv_spec_decode`. There is no Triton kernel for it:
    the PyTorch implementation runs on every device."""
    return _conv_cpu.dynamic_causal_conv_spec_decode(x, kernels, cu_seqlens, state_pool, state_indices,
                                                     num_accepted_tokens)


def gated_rmsnorm(x: torch.Tensor, z: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """rmsnorm(x) * weight * silu(z) over the last dim; see `gated_rmsnorm.naive.gated_rmsnorm_naive`."""
    if _on_gpu(x):
        from .gated_rmsnorm.triton_norm import gated_rmsnorm as impl
    else:
        impl = _norm_cpu.gated_rmsnorm_naive
    return impl(x, z, weight, eps)


__all__ = [
    "chunk_gated_delta_rule",
    "dynamic_causal_conv",
    "dynamic_causal_conv_spec_decode",
    "dynamic_causal_conv_step",
    "fused_recurrent_gated_delta_rule",
    "fused_recurrent_gated_delta_rule_from_gates",
    "gated_rmsnorm",
]
