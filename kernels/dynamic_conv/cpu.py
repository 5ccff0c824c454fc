"""Dynamic causal convolution for vLLM on the CPU: varlen prefill and decode steps
with conv states kept in a pool (time-first `[num_slots, W - 1 (+ drafts), D]`, any
strides). A negative state index (vLLM's PAD_SLOT_ID) is neither read nor written.

Two pieces are compiled on first use, each with an eager PyTorch fallback: the prefill
convolution (Inductor) and the decode update (`cpu_update.cpp`, a small C++ op built by
`torch.utils.cpp_extension`, updating the pool in place in one pass)."""

import functools
import logging
import os
from pathlib import Path

import torch
import torch.nn.functional as F

logger = logging.getLogger(__name__)

# "0" keeps the CPU convolution in eager PyTorch (no Inductor, no C++ build).
COMPILE_ENV = "JETNEMOTRON_CPU_CONV_COMPILE"


# Bytes of filters per block of the prefill (float32): the block's filters and
# accumulator stay in the CPU's L2 cache while the W taps are added.
_BLOCK_BYTES = 3 << 19
# Products of these are exact in float32: a fused multiply-add rounds like mul then add.
_EXACT_PRODUCT_DTYPES = (torch.bfloat16, torch.float16)


def _convolve_packed(x: torch.Tensor, kernels: torch.Tensor) -> torch.Tensor:
    """SiLU of the causal dynamic conv of x `[T, D]` as one sequence after W - 1 zero
    inputs, float32 accumulation in tap order, in x's dtype. Written for Inductor, which
    fuses it into one pass; used for 16-bit inputs only (their products are exact in
    float32, so a fused multiply-add rounds like a multiply then an add)."""
    T, W = x.shape[0], kernels.shape[-1]
    padded = F.pad(x.float(), (0, 0, W - 1, 0))  # [W - 1 + T, D]
    acc = kernels[:, :, 0].float() * padded[:T]
    for w in range(1, W):
        acc = acc + kernels[:, :, w].float() * padded[w: w + T]
    return F.silu(acc).to(x.dtype)


# Shorter batches gain little from the compiled pass (and a length of 1 cannot be traced
# as a dynamic size).
_MIN_COMPILED_TOKENS = 16


@functools.cache
def _compiled_convolve_packed():
    """`_convolve_packed` under Inductor (a one-item list, emptied if compilation fails),
    or an empty list when turned off (`COMPILE_ENV`)."""
    if os.environ.get(COMPILE_ENV, "1") == "0":
        return []
    # Dynamic in the number of tokens only: with symbolic D or W the loops do not vectorize.
    return [torch.compile(_convolve_packed, dynamic=False)]


def _convolve_packed_fast(x: torch.Tensor, kernels: torch.Tensor) -> torch.Tensor | None:
    """The compiled pass, or None where it does not apply or cannot run here (no C++
    compiler, for one: then it is turned off for the process, with a warning)."""
    compiled = _compiled_convolve_packed()
    if not compiled or x.device.type != "cpu" or x.shape[0] < _MIN_COMPILED_TOKENS:
        return None
    torch._dynamo.mark_dynamic(x, 0)
    torch._dynamo.mark_dynamic(kernels, 0)
    try:
        return compiled[0](x, kernels)
    except Exception as error:  # noqa: BLE001 - any compiler failure: stay eager from now on
        logger.warning("dynamic conv: Inductor compilation failed (%s); using the eager path", error)
        compiled.clear()
        return None


def dynamic_causal_conv(
    x: torch.Tensor,
    kernels: torch.Tensor,
    cu_seqlens: torch.Tensor,
    state_pool: torch.Tensor,
    state_indices: torch.Tensor,
    has_initial_state: torch.Tensor,
    max_seqlen: int | None = None,
) -> torch.Tensor:
    """Prefill over packed sequences.

    Args:
        x: `[T, D]`; kernels: `[T, D, W]`; sequence i is `cu_seqlens[i]:cu_seqlens[i+1]`.
        state_pool: `[num_slots, W - 1, D]`; sequence i starts from
            `state_pool[state_indices[i]]` when `has_initial_state[i]` (else zeros) and
            its last W - 1 inputs are written back there.
        max_seqlen: not needed here (the packed tokens are convolved as one sequence); part
            of the operation's signature (`dispatch.dynamic_conv_prefill`).
    Returns:
        out `[T, D]` (SiLU applied) in x's dtype.

    The packed tokens are convolved as one sequence: for 16-bit inputs by one compiled
    pass (`_convolve_packed`), else tap by tap (W shifted multiply-adds on contiguous
    `[T, D]` rows, float32 accumulation), block by block; then the first W - 1 tokens of
    every sequence, whose windows reach into the history, are recomputed from the
    sequence's own history.
    """
    exact_products = x.dtype in _EXACT_PRODUCT_DTYPES and kernels.dtype in _EXACT_PRODUCT_DTYPES
    out = _convolve_packed_fast(x, kernels) if exact_products else None
    if out is None:
        out = _convolve_packed_eager(x, kernels, exact_products)
    return _finish_sequence_edges(out, x, kernels, cu_seqlens, state_pool, state_indices, has_initial_state)


def _convolve_packed_eager(x: torch.Tensor, kernels: torch.Tensor, exact_products: bool) -> torch.Tensor:
    """`_convolve_packed` tap by tap, block by block, in eager PyTorch (any dtype)."""
    T, D = x.shape
    W = kernels.shape[-1]
    out = torch.empty_like(x)
    accumulate_in_out = out.dtype == torch.float32
    block = max(1, _BLOCK_BYTES // (4 * D * W))
    taps = x.new_empty(min(block, T), W, D, dtype=torch.float32)
    inputs = x.new_zeros(min(block, T) + W - 1, D, dtype=torch.float32)
    scratch = x.new_empty(min(block, T), D, dtype=torch.float32)
    for start in range(0, T, block):
        end = min(start + block, T)
        n = end - start
        # the block's filters tap-major, float32: [n, D, W] -> [n, W, D]
        taps[:n].copy_(kernels[start:end].transpose(1, 2))
        # its inputs and the W - 1 before (zeros before the batch), float32: [W - 1 + n, D]
        lo = max(start - (W - 1), 0)
        inputs[lo - (start - (W - 1)): W - 1 + n].copy_(x[lo:end])
        # out[t] = sum_w taps[t, w] * x[t - (W - 1) + w], w in the definition's order
        acc = out[start:end] if accumulate_in_out else scratch.new_empty(n, D)
        torch.mul(taps[:n, 0], inputs[:n], out=acc)
        for w in range(1, W):
            if exact_products:
                acc.addcmul_(taps[:n, w], inputs[w: w + n])
            else:  # float32 products rounded before the sum, as in the definition
                acc.add_(torch.mul(taps[:n, w], inputs[w: w + n], out=scratch[:n]))
        F.silu(acc, inplace=True)
        if not accumulate_in_out:
            out[start:end] = acc
    return out


def _finish_sequence_edges(out, x, kernels, cu_seqlens, state_pool, state_indices, has_initial_state):
    """Recompute each sequence's first W - 1 outputs from its own history (out holds the
    packed convolution) and write its last W - 1 inputs to its state slot."""
    T, D = x.shape
    W = kernels.shape[-1]
    num_seqs = cu_seqlens.numel() - 1
    if num_seqs == 0 or W == 1:  # W = 1: no history to read or keep
        return out
    starts = cu_seqlens[:-1].to(device=x.device, dtype=torch.long)
    lengths = cu_seqlens[1:].to(device=x.device, dtype=torch.long) - starts
    slots = state_indices.to(device=x.device, dtype=torch.long)
    padded = slots < 0  # neither read nor written
    has_state = has_initial_state.to(device=x.device, dtype=torch.bool) & ~padded
    # [B, W - 1, D]
    history = torch.where(has_state[:, None, None], state_pool[slots.clamp_min(0)].to(x.dtype), 0.0)

    def inputs_at(positions: torch.Tensor) -> torch.Tensor:
        """Inputs at sequence-relative positions `[B, n]` (>= -(W - 1); negative: history)
        as `[B, n, D]`."""
        n = positions.shape[1]
        in_x = (starts[:, None] + positions).clamp(0, max(T - 1, 0))
        from_x = x.index_select(0, in_x.flatten()).view(num_seqs, n, D) if T > 0 else x.new_zeros(num_seqs, n, D)
        # history row of position p < 0: W - 1 + p
        in_history = (positions + (W - 1)).clamp(0, W - 2)
        from_history = history.gather(1, in_history[:, :, None].expand(-1, -1, D))
        return torch.where((positions >= 0)[:, :, None], from_x, from_history)

    # Heads: token j < W - 1 of each sequence, window positions j - (W - 1) + w.
    j = torch.arange(W - 1, device=x.device)
    window_positions = (j[:, None] - (W - 1) + torch.arange(W, device=x.device)).flatten()  # [(W - 1) * W]
    windows = inputs_at(window_positions.expand(num_seqs, -1)).view(num_seqs, W - 1, W, D)
    head_rows = starts[:, None] + j  # [B, W - 1]
    in_sequence = j < lengths[:, None]
    head_rows, windows = head_rows[in_sequence], windows[in_sequence]  # [R], [R, W, D]
    head_kernels = kernels.index_select(0, head_rows)  # [R, D, W]
    # [R, W, D] -> [R, D, W]
    head = (windows.transpose(1, 2).float() * head_kernels.float()).sum(-1)
    out[head_rows] = F.silu(head).to(out.dtype)

    # New states: the last W - 1 inputs of each sequence (history rows when it is shorter).
    tail_positions = lengths[:, None] - (W - 1) + j  # [B, W - 1]
    tails = inputs_at(tail_positions).to(state_pool.dtype)
    state_pool[slots[~padded]] = tails[~padded]
    return out


@functools.cache
def conv_update_op():
    """`torch.ops.jetnemotron.dynamic_conv_update` (built from cpu_update.cpp on first
    use, then cached by torch), or None where it cannot be built or is turned off
    (`COMPILE_ENV`): then the eager PyTorch update runs, with a warning."""
    if os.environ.get(COMPILE_ENV, "1") == "0":
        return None
    try:
        from torch.utils import cpp_extension

        cpp_extension.load(
            name="jetnemotron_dynamic_conv_cpu",
            sources=[str(Path(__file__).with_name("cpu_update.cpp"))],
            extra_cflags=["-O3", "-march=native", "-fopenmp"],
            extra_ldflags=["-fopenmp"],
            is_python_module=False,
        )
        return torch.ops.jetnemotron.dynamic_conv_update
    except Exception as error:  # noqa: BLE001 - no compiler, no ninja, ...: stay eager
        logger.warning("dynamic conv: the C++ decode update could not be built (%s); "
                       "using the eager PyTorch update", error)
        return None


def _update_in_cpp(x, kernels, state_pool, state_indices, query_start_loc, num_accepted_tokens):
    """The decode update by the C++ op (plain steps: no `query_start_loc`), or None where
    it does not apply: not built, not a CPU tensor, or layouts and dtypes it does not take."""
    op = conv_update_op()
    if not (op is not None and x.device.type == "cpu" and x.stride(-1) == 1 and kernels.is_contiguous()
            and x.dtype in (torch.float32, torch.bfloat16, torch.float16) and kernels.dtype == x.dtype
            and state_pool.dtype in (x.dtype, torch.float32)):
        return None
    out = torch.empty(x.shape, dtype=x.dtype)
    op(x, kernels, state_pool, state_indices, query_start_loc, num_accepted_tokens, out)
    return out


def dynamic_causal_conv_step(
    x: torch.Tensor,
    kernels: torch.Tensor,
    state_pool: torch.Tensor,
    state_indices: torch.Tensor,
) -> torch.Tensor:
    """One decode token per sequence: x `[N, D]`, kernels `[N, D, W]`, slots `[N]`,
    state_pool `[num_slots, >= W - 1, D]` (its first W - 1 rows are the history). Shifts
    each sequence's history by one token in place. Returns out `[N, D]`."""
    out = _update_in_cpp(x, kernels, state_pool, state_indices, None, None)
    if out is not None:
        return out
    W = kernels.shape[-1]
    slots = state_indices.long()
    valid = slots >= 0
    # [N, W - 1, D]; a padded sequence starts from zeros
    history = torch.where(valid[:, None, None], state_pool[slots.clamp_min(0), : W - 1].to(x.dtype), 0.0)
    window = torch.cat([history, x[:, None]], dim=1)  # [N, W, D]
    out = F.silu(torch.einsum("nwd,ndw->nd", window.float(), kernels.float())).to(x.dtype)
    state_pool[slots[valid], : W - 1] = window[valid, 1:].to(state_pool.dtype)
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
    out = _update_in_cpp(x, kernels, state_pool, state_indices, cu_seqlens, num_accepted_tokens)
    if out is not None:
        return out
    W = kernels.shape[-1]
    out = torch.empty_like(x)
    bounds = cu_seqlens.tolist()
    accepted = num_accepted_tokens.tolist()
    for i, slot in enumerate(state_indices.tolist()):
        start, end = bounds[i], bounds[i + 1]
        buffer = state_pool[slot] if slot >= 0 else None  # [W - 1 + num_spec, D], a view into the pool
        offset = accepted[i] - 1
        history = (buffer[offset: offset + W - 1].to(x.dtype) if buffer is not None
                   else x.new_zeros(W - 1, x.shape[1]))  # padded: zero history, nothing written
        inputs = torch.cat([history, x[start:end]])  # [W - 1 + L, D]
        windows = inputs.unfold(0, W, 1)  # [L, D, W]
        out[start:end] = F.silu(torch.einsum("ldw,ldw->ld", windows.float(), kernels[start:end].float())).to(x.dtype)
        if buffer is not None:
            shifted = inputs[1:]  # row j: the W - 1 inputs ending at token j
            buffer[: shifted.shape[0]] = shifted.to(buffer.dtype)
    return out
