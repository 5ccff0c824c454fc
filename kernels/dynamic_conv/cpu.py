"""Dynamic causal convolution for vLLM on the CPU: varlen prefill and decode steps
with conv states kept in a pool (time-first `[num_slots, W - 1, D]`, any strides)."""

import torch
import torch.nn.functional as F


def dynamic_causal_conv(
    x: torch.Tensor,
    kernels: torch.Tensor,
    cu_seqlens: torch.Tensor,
    state_pool: torch.Tensor,
    state_indices: torch.Tensor,
    has_initial_state: torch.Tensor,
) -> torch.Tensor:
    """Prefill over packed sequences.

    Args:
        x: `[T, D]`; kernels: `[T, D, W]`; sequence i is `cu_seqlens[i]:cu_seqlens[i+1]`.
        state_pool: `[num_slots, W - 1, D]`; sequence i starts from
            `state_pool[state_indices[i]]` when `has_initial_state[i]` (else zeros) and
            its last W - 1 inputs are written back there.
    Returns:
        out `[T, D]` (SiLU applied) in x's dtype.
    """
    W = kernels.shape[-1]
    out = torch.empty_like(x)
    bounds = cu_seqlens.tolist()
    has_state = has_initial_state.tolist()
    for i, slot in enumerate(state_indices.tolist()):
        start, end = bounds[i], bounds[i + 1]
        history = state_pool[slot].to(x.dtype) if has_state[i] else x.new_zeros(W - 1, x.shape[1])
        padded = torch.cat([history, x[start:end]])  # [W - 1 + L, D]
        windows = padded.unfold(0, W, 1)  # [L, D, W]
        out[start:end] = F.silu(torch.einsum("ldw,ldw->ld", windows.float(), kernels[start:end].float())).to(x.dtype)
        state_pool[slot] = padded[padded.shape[0] - (W - 1):].to(state_pool.dtype)
    return out


def dynamic_causal_conv_step(
    x: torch.Tensor,
    kernels: torch.Tensor,
    state_pool: torch.Tensor,
    state_indices: torch.Tensor,
) -> torch.Tensor:
    """One decode token per sequence: x `[N, D]`, kernels `[N, D, W]`, slots `[N]`.
    Shifts each sequence's state by one token in place. Returns out `[N, D]`."""
    history = state_pool[state_indices].to(x.dtype)  # [N, W - 1, D]
    window = torch.cat([history, x[:, None]], dim=1)  # [N, W, D]
    out = F.silu(torch.einsum("nwd,ndw->nd", window.float(), kernels.float())).to(x.dtype)
    state_pool[state_indices] = window[:, 1:].to(state_pool.dtype)
    return out


def dynamic_causal_conv_spec_decode(
    x: torch.Tensor,
    kernels: torch.Tensor,
    cu_seqlens: torch.Tensor,
    state_pool: torch.Tensor,
    state_indices: torch.Tensor,
    num_accepted_tokens: torch.Tensor,
) -> torch.Tensor:
    """Speculative-decoding step: sequence i brings its tokens `cu_seqlens[i]:cu_seqlens[i+1]`
    (the last accepted token and new drafts) and keeps a wide history buffer
    `state_pool[state_indices[i]]` of `[W - 1 + num_spec, D]` inputs.

    The history of this step is the buffer's rows `a - 1 : a - 1 + W - 1`, a =
    `num_accepted_tokens[i]` (drafts of the previous step after the accepted ones are
    dropped); afterwards row j holds the W - 1 inputs ending at this step's token j,
    whichever of them the next step accepts (vLLM's conv-state convention).
    Returns out `[T, D]` (SiLU applied) in x's dtype.
    """
    W = kernels.shape[-1]
    out = torch.empty_like(x)
    bounds = cu_seqlens.tolist()
    accepted = num_accepted_tokens.tolist()
    for i, slot in enumerate(state_indices.tolist()):
        start, end = bounds[i], bounds[i + 1]
        buffer = state_pool[slot]  # [W - 1 + num_spec, D], a view into the pool
        offset = accepted[i] - 1
        history = buffer[offset: offset + W - 1].to(x.dtype)
        inputs = torch.cat([history, x[start:end]])  # [W - 1 + L, D]
        windows = inputs.unfold(0, W, 1)  # [L, D, W]
        out[start:end] = F.silu(torch.einsum("ldw,ldw->ld", windows.float(), kernels[start:end].float())).to(x.dtype)
        shifted = inputs[1:]  # row j: the W - 1 inputs ending at token j
        buffer[: shifted.shape[0]] = shifted.to(buffer.dtype)
    return out
