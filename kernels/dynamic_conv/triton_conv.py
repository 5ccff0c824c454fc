"""Dynamic causal convolution on the GPU (Triton), mirroring `cpu.dynamic_causal_conv`
(varlen prefill) and `cpu.dynamic_causal_conv_step` (one decode token per sequence):

    out_t[c] = silu( sum_{w < W} kernel_t[c, w] * x_{t-W+1+w}[c] )   (x before the start = state)

Conv states are time-first `[num_slots, W - 1, D]` with any strides (vLLM's dim-first
cache is passed as a transposed view). Accumulation is float32; the history is rounded
to x's dtype first, as the CPU path concatenates it with x.

Prefill is two launches so that no program reads a slot another one writes: the output
kernel (one program per token block, channel block and sequence) reads the initial
states, then the state kernel writes each sequence's last W - 1 inputs.
"""

import torch
import triton
import triton.language as tl


@triton.jit
def dynamic_causal_conv_fwd_kernel(
    x,  # [T, D], row stride stride_x_t
    kernels,  # [T, D, W] contiguous
    out,  # [T, D] contiguous
    cu_seqlens,  # [N + 1]
    state_pool,  # [num_slots, W - 1, D], any strides (None when no sequence has a state)
    state_indices,  # [N]
    has_initial_state,  # [N] int32
    stride_x_t,
    stride_pool_slot,
    stride_pool_t,
    stride_pool_d,
    D,
    W: tl.constexpr,
    BT: tl.constexpr,
    BD: tl.constexpr,
):
    i_t, i_d, i_n = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    bos = tl.load(cu_seqlens + i_n).to(tl.int64)
    seq_len = tl.load(cu_seqlens + i_n + 1).to(tl.int64) - bos
    if i_t * BT >= seq_len:
        return
    slot = tl.load(state_indices + i_n).to(tl.int64)
    # channels to read from the state: D, or 0 without one (keeps masks tensors)
    d_read = tl.where((tl.load(has_initial_state + i_n) != 0) & (slot >= 0), D, 0)

    o_t = i_t * BT + tl.arange(0, BT)  # positions in the sequence
    o_d = i_d * BD + tl.arange(0, BD)
    m_t = o_t < seq_len
    m_d = o_d < D
    m_td = m_t[:, None] & m_d[None, :]

    b_acc = tl.zeros([BT, BD], dtype=tl.float32)
    for w in tl.static_range(W):
        src = o_t - (W - 1) + w  # [BT] input position, negative: history row W - 1 + src
        b_x = tl.load(x + (bos + src)[:, None] * stride_x_t + o_d[None, :],
                      mask=((src >= 0) & m_t)[:, None] & m_d[None, :], other=0.0)
        b_hist = tl.load(state_pool + slot * stride_pool_slot + (W - 1 + src)[:, None] * stride_pool_t
                         + o_d[None, :] * stride_pool_d,
                         mask=((src < 0) & m_t)[:, None] & (o_d < d_read)[None, :], other=0.0)
        b_in = b_x.to(tl.float32) + b_hist.to(x.dtype.element_ty).to(tl.float32)
        b_w = tl.load(kernels + ((bos + o_t)[:, None] * D + o_d[None, :]) * W + w, mask=m_td, other=0.0)
        b_acc += b_in * b_w.to(tl.float32)
    b_out = b_acc * tl.sigmoid(b_acc)
    tl.store(out + (bos + o_t)[:, None] * D + o_d[None, :], b_out.to(out.dtype.element_ty), mask=m_td)


@triton.jit
def dynamic_causal_conv_final_state_kernel(
    x,  # [T, D], row stride stride_x_t
    cu_seqlens,  # [N + 1]
    src_pool,  # [*, W - 1, D] initial states (may alias dst_pool)
    src_indices,  # [N]
    has_initial_state,  # [N] int32
    dst_pool,  # [*, W - 1, D] final states
    dst_indices,  # [N]
    stride_x_t,
    stride_src_slot,
    stride_src_t,
    stride_src_d,
    stride_dst_slot,
    stride_dst_t,
    stride_dst_d,
    D,
    W: tl.constexpr,
    BW: tl.constexpr,
    BD: tl.constexpr,
):
    """Final state row j = input at position seq_len - (W - 1) + j (history when < 0)."""
    i_d, i_n = tl.program_id(0), tl.program_id(1)
    bos = tl.load(cu_seqlens + i_n).to(tl.int64)
    seq_len = tl.load(cu_seqlens + i_n + 1).to(tl.int64) - bos
    src_slot = tl.load(src_indices + i_n).to(tl.int64)
    dst_slot = tl.load(dst_indices + i_n).to(tl.int64)
    d_read = tl.where((tl.load(has_initial_state + i_n) != 0) & (src_slot >= 0), D, 0)
    d_write = tl.where(dst_slot >= 0, D, 0)

    o_j = tl.arange(0, BW)
    o_d = i_d * BD + tl.arange(0, BD)
    m_j = o_j < W - 1
    m_d = o_d < D
    pos = seq_len - (W - 1) + o_j  # [BW]
    b_x = tl.load(x + (bos + pos)[:, None] * stride_x_t + o_d[None, :],
                  mask=((pos >= 0) & m_j)[:, None] & m_d[None, :], other=0.0)
    b_hist = tl.load(src_pool + src_slot * stride_src_slot + (W - 1 + pos)[:, None] * stride_src_t
                     + o_d[None, :] * stride_src_d,
                     mask=((pos < 0) & m_j)[:, None] & (o_d < d_read)[None, :], other=0.0)
    # one of the two is 0; the history is rounded to x's dtype as the CPU path does
    b_state = b_x.to(tl.float32) + b_hist.to(x.dtype.element_ty).to(tl.float32)
    # every thread has read its rows before any row of an aliased pool is overwritten
    tl.debug_barrier()
    tl.store(dst_pool + dst_slot * stride_dst_slot + o_j[:, None] * stride_dst_t + o_d[None, :] * stride_dst_d,
             b_state.to(dst_pool.dtype.element_ty), mask=m_j[:, None] & (o_d < d_write)[None, :])


@triton.jit
def dynamic_causal_conv_step_kernel(
    x,  # [N, D], row stride stride_x_n
    kernels,  # [N, D, W] contiguous
    out,  # [N, D] contiguous
    state_pool,  # [num_slots, W - 1, D], any strides
    state_indices,  # [N]
    stride_x_n,
    stride_pool_slot,
    stride_pool_t,
    stride_pool_d,
    D,
    W: tl.constexpr,
    BW: tl.constexpr,
    BD: tl.constexpr,
):
    i_d, i_n = tl.program_id(0), tl.program_id(1).to(tl.int64)
    slot = tl.load(state_indices + i_n).to(tl.int64)
    d_valid = tl.where(slot >= 0, D, 0)  # PAD slot: zero history, no write
    o_j = tl.arange(0, BW)
    o_d = i_d * BD + tl.arange(0, BD)
    m_d = o_d < D
    p_row = state_pool + slot * stride_pool_slot + o_d[None, :] * stride_pool_d  # [1, BD]
    p_x = x + i_n * stride_x_n + o_d[None, :]  # [1, BD]

    # window rows j < W: history row j for j < W - 1, the new input at j = W - 1
    b_win = tl.load(p_row + o_j[:, None] * stride_pool_t,
                    mask=(o_j < W - 1)[:, None] & (o_d < d_valid)[None, :], other=0.0)
    b_win = b_win.to(x.dtype.element_ty).to(tl.float32) + tl.load(
        p_x + o_j[:, None] * 0, mask=(o_j == W - 1)[:, None] & m_d[None, :], other=0.0).to(tl.float32)
    b_w = tl.load(kernels + (i_n * D + o_d[None, :]) * W + o_j[:, None],
                  mask=(o_j < W)[:, None] & m_d[None, :], other=0.0)
    b_acc = tl.sum(b_win * b_w.to(tl.float32), axis=0)  # [BD]
    tl.store(out + i_n * D + o_d, (b_acc * tl.sigmoid(b_acc)).to(out.dtype.element_ty), mask=m_d)

    # new state row j = window row j + 1
    b_next = tl.load(p_row + (o_j + 1)[:, None] * stride_pool_t,
                     mask=(o_j + 1 < W - 1)[:, None] & (o_d < d_valid)[None, :], other=0.0)
    b_next = b_next.to(x.dtype.element_ty).to(tl.float32) + tl.load(
        p_x + o_j[:, None] * 0, mask=(o_j + 1 == W - 1)[:, None] & m_d[None, :], other=0.0).to(tl.float32)
    tl.debug_barrier()  # all rows read before any is overwritten
    tl.store(p_row + o_j[:, None] * stride_pool_t, b_next.to(state_pool.dtype.element_ty),
             mask=(o_j < W - 1)[:, None] & (o_d < d_valid)[None, :])


def _row_major(x: torch.Tensor) -> torch.Tensor:
    """x with unit stride on its last dim (rows may keep any stride)."""
    return x if x.stride(-1) == 1 else x.contiguous()


def _check_pool(state_pool: torch.Tensor, W: int, D: int, caller: str) -> None:
    if state_pool.dim() != 3 or state_pool.shape[1:] != (W - 1, D):
        raise ValueError(f"{caller}: state_pool must be [num_slots, {W - 1}, {D}] (time first), "
                         f"got {tuple(state_pool.shape)}")


def dynamic_causal_conv_launch(
    x: torch.Tensor,
    kernels: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_len: int,
    src_pool: torch.Tensor | None,
    src_indices: torch.Tensor,
    has_initial_state: torch.Tensor,
    dst_pool: torch.Tensor | None,
    dst_indices: torch.Tensor | None,
    block_t: int = 64,
    block_d: int = 128,
) -> torch.Tensor:
    """Output of the varlen conv (x `[T, D]` unit last-dim stride, kernels `[T, D, W]`
    contiguous) from initial states in `src_pool`; then, when `dst_pool` is given, the
    last W - 1 inputs of sequence i written to `dst_pool[dst_indices[i]]`. Shared by the
    vLLM prefill (src = dst = the pool) and the training autograd function."""
    T, D = x.shape
    W = kernels.shape[-1]
    N = cu_seqlens.shape[0] - 1
    out = torch.empty(T, D, dtype=x.dtype, device=x.device)
    if N == 0:
        return out
    has = has_initial_state.to(device=x.device, dtype=torch.int32)
    if src_pool is None:  # no history anywhere: a dummy pointer behind all-false masks
        src_pool, has = x, torch.zeros_like(has)
        src_strides = (0, 0, 0)
    else:
        src_strides = src_pool.stride()
    BD = min(block_d, triton.next_power_of_2(D))
    if max_len > 0:
        BT = min(block_t, triton.next_power_of_2(max_len))
        dynamic_causal_conv_fwd_kernel[(triton.cdiv(max_len, BT), triton.cdiv(D, BD), N)](
            x, kernels, out, cu_seqlens, src_pool, src_indices, has,
            x.stride(0), *src_strides, D, W=W, BT=BT, BD=BD)
    if dst_pool is not None and W > 1:
        dynamic_causal_conv_final_state_kernel[(triton.cdiv(D, BD), N)](
            x, cu_seqlens, src_pool, src_indices, has, dst_pool, dst_indices,
            x.stride(0), *src_strides, *dst_pool.stride(), D,
            W=W, BW=triton.next_power_of_2(W - 1), BD=BD)
    return out


def dynamic_causal_conv(
    x: torch.Tensor,
    kernels: torch.Tensor,
    cu_seqlens: torch.Tensor,
    state_pool: torch.Tensor,
    state_indices: torch.Tensor,
    has_initial_state: torch.Tensor,
    max_seqlen: int | None = None,
) -> torch.Tensor:
    """Prefill over packed sequences (Triton).

    Args:
        x: `[T, D]` (rows may be strided); kernels: `[T, D, W]` per-token filters (tap
            W - 1 is the current token); sequence i is `cu_seqlens[i]:cu_seqlens[i+1]`.
        state_pool: `[num_slots, W - 1, D]` (time first, any strides); sequence i starts
            from `state_pool[state_indices[i]]` when `has_initial_state[i]` (else zeros)
            and its last W - 1 inputs are written back there. A negative slot
            (PAD_SLOT_ID) is neither read nor written.
        max_seqlen: the longest sequence's length or a bound on it (it sizes the grid);
            None: read from `cu_seqlens`, a host sync on a GPU.
    Returns:
        out `[T, D]` (SiLU applied) in x's dtype.
    """
    T, D = x.shape
    W = kernels.shape[-1]
    if kernels.shape != (T, D, W):
        raise ValueError(f"dynamic_causal_conv: kernels must be [{T}, {D}, W], got {tuple(kernels.shape)}")
    _check_pool(state_pool, W, D, "dynamic_causal_conv")
    N = state_indices.shape[0]
    if N == 0:
        max_len = 0
    elif max_seqlen is None:
        max_len = int((cu_seqlens[1:] - cu_seqlens[:-1]).max().item())
    else:
        max_len = min(max_seqlen, T)
    return dynamic_causal_conv_launch(
        _row_major(x), kernels.contiguous(), cu_seqlens.contiguous(), max_len,
        state_pool, state_indices.contiguous(), has_initial_state, state_pool, state_indices.contiguous())


def dynamic_causal_conv_step(
    x: torch.Tensor,
    kernels: torch.Tensor,
    state_pool: torch.Tensor,
    state_indices: torch.Tensor,
) -> torch.Tensor:
    """One decode token per sequence (Triton): x `[N, D]`, kernels `[N, D, W]`, slots
    `[N]`; state_pool `[num_slots, W - 1, D]` (any strides) is shifted by one token in
    place. A negative slot reads a zero history and is not written. Returns out `[N, D]`."""
    N, D = x.shape
    W = kernels.shape[-1]
    if kernels.shape != (N, D, W):
        raise ValueError(f"dynamic_causal_conv_step: kernels must be [{N}, {D}, W], got {tuple(kernels.shape)}")
    _check_pool(state_pool, W, D, "dynamic_causal_conv_step")
    x, kernels = _row_major(x), kernels.contiguous()
    out = torch.empty(N, D, dtype=x.dtype, device=x.device)
    if N == 0:
        return out
    BD = min(128, triton.next_power_of_2(D))
    dynamic_causal_conv_step_kernel[(triton.cdiv(D, BD), N)](
        x, kernels, out, state_pool, state_indices.contiguous(),
        x.stride(0), *state_pool.stride(), D,
        W=W, BW=triton.next_power_of_2(W), BD=BD)
    return out


@triton.jit
def dynamic_causal_conv_spec_decode_kernel(
    x,  # [T, D], row stride stride_x_n
    kernels,  # [T, D, W] contiguous
    out,  # [T, D] contiguous
    state_pool,  # [num_slots, R, D] history buffers (R = W - 1 + drafts), any strides
    state_indices,  # [N]
    query_start_loc,  # [N + 1]
    num_accepted_tokens,  # [N]
    stride_x_n,
    stride_pool_slot,
    stride_pool_t,
    stride_pool_d,
    D,
    W: tl.constexpr,
    MAX_LEN: tl.constexpr,  # most tokens of one sequence (R - W + 2)
    BR: tl.constexpr,  # >= W - 1 + MAX_LEN
    BD: tl.constexpr,
):
    i_d, i_n = tl.program_id(0), tl.program_id(1).to(tl.int64)
    slot = tl.load(state_indices + i_n).to(tl.int64)
    d_valid = tl.where(slot >= 0, D, 0)  # PAD slot: zero history, no write
    start = tl.load(query_start_loc + i_n).to(tl.int64)
    L = tl.load(query_start_loc + i_n + 1).to(tl.int64) - start
    h = tl.load(num_accepted_tokens + i_n).to(tl.int64) - 1  # first history row of this step
    o_r = tl.arange(0, BR)  # input index: < W - 1 history, then this step's tokens
    o_d = i_d * BD + tl.arange(0, BD)
    m_d = o_d < D
    p_pool = state_pool + slot * stride_pool_slot + o_d[None, :] * stride_pool_d  # [1, BD]
    p_x = x + start * stride_x_n + o_d[None, :]  # [1, BD]

    history_rows = (o_r < W - 1)[:, None] & (o_d < d_valid)[None, :]
    x_rows = ((o_r >= W - 1) & (o_r < W - 1 + L))[:, None] & m_d[None, :]
    b_in = tl.load(p_pool + (h + o_r)[:, None] * stride_pool_t, mask=history_rows, other=0.0)
    b_in = b_in.to(x.dtype.element_ty).to(tl.float32) + tl.load(
        p_x + (o_r - (W - 1))[:, None] * stride_x_n, mask=x_rows, other=0.0).to(tl.float32)
    for t in range(MAX_LEN):
        # out_t = sum_w kernels_t[:, w] * in[t + w]: the taps laid on input rows t .. t + W - 1
        # token t beyond this sequence's L: no taps, no store (scalar conditions folded
        # into bounds so that masks stay tensors)
        d_active = tl.where(t < L, D, 0)
        taps = (o_r >= t) & (o_r < t + W)
        b_k = tl.load(kernels + ((start + t) * D + o_d[None, :]) * W + (o_r - t)[:, None],
                      mask=taps[:, None] & (o_d < d_active)[None, :], other=0.0).to(tl.float32)
        b_acc = tl.sum(b_in * b_k, axis=0)  # [BD]
        tl.store(out + (start + t) * D + o_d, (b_acc * tl.sigmoid(b_acc)).to(out.dtype.element_ty),
                 mask=o_d < d_active)

    # afterwards buffer row r = in[r + 1], r < W - 2 + L
    nxt = o_r + 1
    b_next = tl.load(p_pool + (h + nxt)[:, None] * stride_pool_t,
                     mask=(nxt < W - 1)[:, None] & (o_d < d_valid)[None, :], other=0.0)
    b_next = b_next.to(x.dtype.element_ty).to(tl.float32) + tl.load(
        p_x + (nxt - (W - 1))[:, None] * stride_x_n,
        mask=((nxt >= W - 1) & (nxt < W - 1 + L))[:, None] & m_d[None, :], other=0.0).to(tl.float32)
    tl.debug_barrier()  # all rows read before any is overwritten
    tl.store(p_pool + o_r[:, None] * stride_pool_t, b_next.to(state_pool.dtype.element_ty),
             mask=(o_r < W - 2 + L)[:, None] & (o_d < d_valid)[None, :])


def dynamic_causal_conv_spec_decode(
    x: torch.Tensor,
    kernels: torch.Tensor,
    cu_seqlens: torch.Tensor,
    state_pool: torch.Tensor,
    state_indices: torch.Tensor,
    num_accepted_tokens: torch.Tensor,
) -> torch.Tensor:
    """Speculative-decoding step (Triton), the semantics of
    `cpu.dynamic_causal_conv_spec_decode`: x `[T, D]`, kernels `[T, D, W]`, sequence i is
    `cu_seqlens[i]:cu_seqlens[i+1]`, its history buffer `state_pool[state_indices[i]]`
    `[W - 1 + num_spec, D]` read from row `num_accepted_tokens[i] - 1`. No host sync:
    the most tokens per sequence is the buffer's `num_spec + 1`. Returns out `[T, D]`."""
    T, D = x.shape
    W = kernels.shape[-1]
    N = state_indices.shape[0]
    R = state_pool.shape[1]
    if kernels.shape != (T, D, W) or state_pool.dim() != 3 or state_pool.shape[2] != D or R < W - 1:
        raise ValueError(f"dynamic_causal_conv_spec_decode: expected kernels [{T}, {D}, W] and state_pool "
                         f"[num_slots, >= W - 1, {D}]; got {tuple(kernels.shape)}, {tuple(state_pool.shape)}")
    x, kernels = _row_major(x), kernels.contiguous()
    out = torch.empty(T, D, dtype=x.dtype, device=x.device)
    if N == 0:
        return out
    max_len = R - W + 2
    BD = min(64, triton.next_power_of_2(D))
    dynamic_causal_conv_spec_decode_kernel[(triton.cdiv(D, BD), N)](
        x, kernels, out, state_pool, state_indices.contiguous(), cu_seqlens.contiguous(),
        num_accepted_tokens.contiguous(), x.stride(0), *state_pool.stride(), D,
        W=W, MAX_LEN=max_len, BR=triton.next_power_of_2(W - 1 + max_len), BD=BD)
    return out
