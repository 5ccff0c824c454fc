"""Chunked gated delta rule for prefill on the GPU (Triton), mirroring `cpu.chunk_gated_delta_rule`;
`gated_delta_rule_prefill` is the routed entry point (`kernels.dispatch`, raw gates).

One program per (V-block, head, sequence) walks its sequence in chunks of BT tokens,
keeping the state tile `S [BK, BV]` (float32) in registers. Within a chunk with
cumulative log-decay G (gamma = exp(G)), the delta-rule writes U solve the unit
lower-triangular system of the WY form (see naive.py):

    T  = (I + A)^-1,   A[s, r] = beta_s exp(G_s - G_r) k_s.k_r   (r < s)
    U  = T (beta * V) - T (beta * gamma * K) S
    O  = (gamma * Q) S + (Q K^T * exp(G_t - G_s), s <= t) U
    S' = exp(G_last) S + (K * exp(G_last - G))^T U

T is built by forward substitution, one row per step, on the [BT, BT] tile. The whole
key dimension sits in one tile (BK = next power of 2 >= K, at least 16, masked), so the
L2 norms of q and k are taken inside the kernel; V is split into blocks of BV.
"""

import torch
import triton
import triton.language as tl

from .gate import gated_delta_rule_gates

# Tokens per chunk BT of the prefill.
CHUNK_SIZE = 64

# fp32 dots in full precision: the states carry over thousands of tokens and the
# references are float32 ("tf32" would trade ~1e-3 relative error for speed).
DOT_PRECISION = "ieee"


@triton.jit
def chunk_gated_delta_rule_fwd_kernel(
    q,  # [T, H, K]
    k,  # [T, H, K]
    v,  # [T, H, V]
    g,  # [T, H] log-decay
    beta,  # [T, H]
    o,  # [T, H, V] output
    cu_seqlens,  # [N + 1]
    state_pool,  # [num_slots, H, K, V], any strides
    state_indices,  # [N]
    has_initial_state,  # [N] int32
    stride_pool_slot,
    stride_pool_h,
    stride_pool_k,
    stride_pool_v,
    scale,
    H: tl.constexpr,
    K: tl.constexpr,
    V: tl.constexpr,
    BT: tl.constexpr,
    BK: tl.constexpr,
    BV: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    i_v, i_h, i_n = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    bos = tl.load(cu_seqlens + i_n).to(tl.int64)
    eos = tl.load(cu_seqlens + i_n + 1).to(tl.int64)
    seq_len = eos - bos
    slot = tl.load(state_indices + i_n).to(tl.int64)
    # Rows of the key dim to read / write: K, or 0 to skip (bool scalars are folded
    # into the bound so every mask stays a plain tensor comparison).
    k_read = tl.where((tl.load(has_initial_state + i_n) != 0) & (slot >= 0), K, 0)
    k_write = tl.where(slot >= 0, K, 0)

    o_t = tl.arange(0, BT)
    o_k = tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    m_k = o_k < K
    m_v = o_v < V

    # [BK, BV] tile of this sequence's state in its slot
    p_state = (state_pool + slot * stride_pool_slot + i_h * stride_pool_h
               + o_k[:, None] * stride_pool_k + o_v[None, :] * stride_pool_v)
    b_h = tl.load(p_state, mask=(o_k[:, None] < k_read) & m_v[None, :], other=0.0).to(tl.float32)

    causal = o_t[:, None] >= o_t[None, :]  # s <= t
    strictly_lower = o_t[:, None] > o_t[None, :]  # r < s
    eye = (o_t[:, None] == o_t[None, :]).to(tl.float32)

    for i_c in range(0, tl.cdiv(seq_len, BT)):
        pos = bos + i_c * BT + o_t  # [BT] token rows (int64)
        m_t = (i_c * BT + o_t) < seq_len
        m_tk = m_t[:, None] & m_k[None, :]
        m_tv = m_t[:, None] & m_v[None, :]
        # Padding rows load q = k = v = 0, g = beta = 0: no write, no decay, no output.
        b_q = tl.load(q + (pos[:, None] * H + i_h) * K + o_k[None, :], mask=m_tk, other=0.0).to(tl.float32)
        b_k = tl.load(k + (pos[:, None] * H + i_h) * K + o_k[None, :], mask=m_tk, other=0.0).to(tl.float32)
        b_v = tl.load(v + (pos[:, None] * H + i_h) * V + o_v[None, :], mask=m_tv, other=0.0).to(tl.float32)
        b_g = tl.load(g + pos * H + i_h, mask=m_t, other=0.0).to(tl.float32)
        b_beta = tl.load(beta + pos * H + i_h, mask=m_t, other=0.0).to(tl.float32)
        b_q = b_q / tl.maximum(tl.sqrt(tl.sum(b_q * b_q, axis=1)), 1e-6)[:, None]
        b_k = b_k / tl.maximum(tl.sqrt(tl.sum(b_k * b_k, axis=1)), 1e-6)[:, None]
        b_q = b_q * scale  # K**-0.5

        b_G = tl.cumsum(b_g, axis=0)  # [BT]
        b_G_last = tl.sum(tl.where(o_t == BT - 1, b_G, 0.0), axis=0)  # padding adds 0
        # decay[t, s] = exp(G_t - G_s) for s <= t, else 0: [BT, BT]
        b_decay = tl.where(causal, tl.exp(tl.where(causal, b_G[:, None] - b_G[None, :], 0.0)), 0.0)

        # T = (I + A)^-1 by forward substitution: b_T holds -A, then row i becomes
        # (T - I)[i] = -A[i] - sum_{j<i} A[i, j] (T - I)[j] once rows < i are done.
        b_kk = tl.dot(b_k, tl.trans(b_k), input_precision=DOT_PRECISION)  # [BT, BT]
        b_T = -tl.where(strictly_lower, b_kk * b_decay * b_beta[:, None], 0.0)
        for i in range(1, BT):
            m_i = o_t == i
            b_a = tl.sum(tl.where(m_i[:, None], b_T, 0.0), axis=0)  # row i: [BT]
            b_a = b_a + tl.sum(b_a[:, None] * b_T, axis=0) * (o_t < i)
            b_T = tl.where(m_i[:, None], b_a[None, :], b_T)
        b_T = b_T + eye

        b_gamma = tl.exp(b_G)  # [BT]
        b_w = tl.dot(b_T, b_k * (b_beta * b_gamma)[:, None], input_precision=DOT_PRECISION)  # [BT, BK]
        b_u = tl.dot(b_T, b_v * b_beta[:, None], input_precision=DOT_PRECISION)  # [BT, BV]
        b_u = b_u - tl.dot(b_w, b_h, input_precision=DOT_PRECISION)
        b_qk = tl.dot(b_q, tl.trans(b_k), input_precision=DOT_PRECISION) * b_decay  # [BT, BT]
        b_o = tl.dot(b_q * b_gamma[:, None], b_h, input_precision=DOT_PRECISION)
        b_o = b_o + tl.dot(b_qk, b_u, input_precision=DOT_PRECISION)  # [BT, BV]
        tl.store(o + (pos[:, None] * H + i_h) * V + o_v[None, :], b_o.to(o.dtype.element_ty), mask=m_tv)

        b_k_to_end = b_k * tl.exp(b_G_last - b_G)[:, None]  # [BT, BK]
        b_h = b_h * tl.exp(b_G_last) + tl.dot(tl.trans(b_k_to_end), b_u, input_precision=DOT_PRECISION)

    tl.store(p_state, b_h.to(state_pool.dtype.element_ty), mask=(o_k[:, None] < k_write) & m_v[None, :])


def block_sizes(K: int, V: int) -> tuple[int, int]:
    """(BK, BV): the whole key dim in one tile, V in blocks; both >= 16 for tl.dot."""
    BK = max(16, triton.next_power_of_2(K))
    BV = max(16, min(triton.next_power_of_2(V), 64 if BK <= 128 else 32))
    return BK, BV


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
    chunk_size: int = CHUNK_SIZE,
) -> torch.Tensor:
    """Varlen chunked gated delta rule reading and writing states in a pool (Triton).

    Args:
        q, k: `[T, H, K]`; v: `[T, H, V]`; g (log-decay), beta: `[T, H]`; tokens of all
            sequences packed back to back, sequence i is `cu_seqlens[i]:cu_seqlens[i+1]`
            (`cu_seqlens` `[N + 1]`).
        state_pool: `[num_slots, H, K, V]` (any strides, any float dtype); sequence i
            starts from `state_pool[state_indices[i]]` if `has_initial_state[i]` (else
            zeros) and its final state is written back there. A negative slot (vLLM's
            PAD_SLOT_ID) is neither read nor written.
        chunk_size: tokens per chunk BT, a power of 2 >= 16.
    Returns:
        o `[T, H, V]` in v's dtype (float32 accumulation).
    """
    T, H, K = q.shape
    V = v.shape[-1]
    if k.shape != q.shape or v.shape[:2] != (T, H) or g.shape != (T, H) or beta.shape != (T, H):
        raise ValueError(f"chunk_gated_delta_rule: expected q, k [T, H, K], v [T, H, V], g, beta [T, H]; "
                         f"got q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}, "
                         f"g {tuple(g.shape)}, beta {tuple(beta.shape)}")
    if state_pool.shape[1:] != (H, K, V):
        raise ValueError(f"chunk_gated_delta_rule: state_pool must be [num_slots, {H}, {K}, {V}], "
                         f"got {tuple(state_pool.shape)}")
    if chunk_size < 16 or chunk_size & (chunk_size - 1):
        raise ValueError(f"chunk_gated_delta_rule: chunk_size must be a power of 2 >= 16, got {chunk_size}")
    N = state_indices.shape[0]
    q, k, v, g, beta = (x.contiguous() for x in (q, k, v, g, beta))
    o = torch.empty_like(v)
    if N == 0:
        return o
    BK, BV = block_sizes(K, V)
    grid = (triton.cdiv(V, BV), H, N)
    chunk_gated_delta_rule_fwd_kernel[grid](
        q, k, v, g, beta, o,
        cu_seqlens.contiguous(), state_pool, state_indices.contiguous(),
        has_initial_state.to(torch.int32),
        *state_pool.stride(),
        K**-0.5,
        H=H, K=K, V=V, BT=chunk_size, BK=BK, BV=BV,
        DOT_PRECISION=DOT_PRECISION,
    )
    return o


def gated_delta_rule_prefill(
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
    has_initial_state: torch.Tensor,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """`kernels.dispatch.gated_delta_rule_prefill` on the GPU: the gates (PyTorch, float32),
    then `chunk_gated_delta_rule` (chunks of `CHUNK_SIZE` tokens unless `chunk_size` is given)."""
    g, beta = gated_delta_rule_gates(a, b, A_log, dt_bias)
    return chunk_gated_delta_rule(q, k, v, g, beta, cu_seqlens, state_pool, state_indices, has_initial_state,
                                  chunk_size=CHUNK_SIZE if chunk_size is None else chunk_size)
