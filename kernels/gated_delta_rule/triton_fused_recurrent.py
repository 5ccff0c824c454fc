"""Recurrent gated delta rule for decode on the GPU (Triton), mirroring
`cpu.fused_recurrent_gated_delta_rule`: N sequences of L tokens each (L = 1
for plain decode, L > 1 for speculative decoding), states updated in place in the pool.

One program per (sequence x head, V-block) holds the state tile `S [BK, BV]` (float32)
and steps through the L tokens:

    S = exp(g_t) S;   S = S + beta_t k_t (v_t - S^T k_t)^T;   o_t = S^T (q_t * K**-0.5)   (q, k L2-normalised)

Variants are `tl.constexpr` flags: `FUSE_GATING` computes g = -exp(A_log) softplus(a +
dt_bias) and beta = sigmoid(b) from the raw projections inside the kernel;
`PER_TOKEN_SLOTS` writes the state after every token to its own slot (speculative
decoding); `USE_NUM_ACCEPTED` reads the initial state from the slot of the last accepted
token, as vLLM's spec decode lays out the states.

The routed entry points (`kernels.dispatch`, raw gates) are `gated_delta_rule_step` (the
fused gating, one token per sequence) and `gated_delta_rule_spec_decode` (packed sequences
of different lengths, laid out for `fused_recurrent_gated_delta_rule` by `spec_decode.py`).
"""

import torch
import triton
import triton.language as tl

from .spec_decode import varlen_spec_decode


@triton.jit
def fused_recurrent_gated_delta_rule_fwd_kernel(
    q,  # [N, L, H, K]
    k,  # [N, L, H, K]
    v,  # [N, L, H, V]
    g,  # [N, L, H] log-decay (unused with FUSE_GATING)
    beta,  # [N, L, H] (unused with FUSE_GATING)
    a,  # [N, L, H] raw decay projection (FUSE_GATING only)
    b,  # [N, L, H] raw write-strength projection (FUSE_GATING only)
    A_log,  # [H] (FUSE_GATING only)
    dt_bias,  # [H] (FUSE_GATING only)
    o,  # [N, L, H, V] output
    state_pool,  # [num_slots, H, K, V], any strides
    state_indices,  # [N] or [N, L]
    num_accepted_tokens,  # [N] (USE_NUM_ACCEPTED only)
    stride_pool_slot,
    stride_pool_h,
    stride_pool_k,
    stride_pool_v,
    stride_indices_n,
    stride_indices_l,
    scale,
    L,
    H: tl.constexpr,
    K: tl.constexpr,
    V: tl.constexpr,
    BK: tl.constexpr,
    BV: tl.constexpr,
    FUSE_GATING: tl.constexpr,
    PER_TOKEN_SLOTS: tl.constexpr,
    USE_NUM_ACCEPTED: tl.constexpr,
):
    i_nh, i_v = tl.program_id(0), tl.program_id(1)  # N * H on axis 0: CUDA caps axis 1 at 65535
    i_n, i_h = i_nh // H, i_nh % H
    i_n = i_n.to(tl.int64)

    o_k = tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    m_k = o_k < K
    m_v = o_v < V
    p_tile = i_h * stride_pool_h + o_k[:, None] * stride_pool_k + o_v[None, :] * stride_pool_v  # [BK, BV]

    if PER_TOKEN_SLOTS:
        if USE_NUM_ACCEPTED:
            i_read = tl.load(num_accepted_tokens + i_n).to(tl.int64) - 1
        else:
            i_read = 0
        read_slot = tl.load(state_indices + i_n * stride_indices_n + i_read * stride_indices_l).to(tl.int64)
    else:
        read_slot = tl.load(state_indices + i_n * stride_indices_n).to(tl.int64)
    # A negative slot (PAD_SLOT_ID) reads zeros and is never written: the bound on the
    # key rows becomes 0 (bool scalars are folded into bounds to keep masks tensors).
    k_read = tl.where(read_slot >= 0, K, 0)
    b_h = tl.load(state_pool + read_slot * stride_pool_slot + p_tile,
                  mask=(o_k[:, None] < k_read) & m_v[None, :], other=0.0).to(tl.float32)

    if FUSE_GATING:
        b_A = tl.exp(tl.load(A_log + i_h).to(tl.float32))
        b_dt_bias = tl.load(dt_bias + i_h).to(tl.float32)

    for i_t in range(0, L):
        tok = i_n * L + i_t  # flat token index
        b_q = tl.load(q + (tok * H + i_h) * K + o_k, mask=m_k, other=0.0).to(tl.float32)
        b_k = tl.load(k + (tok * H + i_h) * K + o_k, mask=m_k, other=0.0).to(tl.float32)
        b_v = tl.load(v + (tok * H + i_h) * V + o_v, mask=m_v, other=0.0).to(tl.float32)
        if FUSE_GATING:
            x = tl.load(a + tok * H + i_h).to(tl.float32) + b_dt_bias
            # softplus with torch's threshold: x for x > 20
            softplus = tl.where(x > 20.0, x, tl.log(1.0 + tl.exp(tl.minimum(x, 20.0))))
            b_g = -b_A * softplus
            b_beta = tl.sigmoid(tl.load(b + tok * H + i_h).to(tl.float32))
        else:
            b_g = tl.load(g + tok * H + i_h).to(tl.float32)
            b_beta = tl.load(beta + tok * H + i_h).to(tl.float32)
        b_q = b_q / tl.maximum(tl.sqrt(tl.sum(b_q * b_q)), 1e-6)
        b_k = b_k / tl.maximum(tl.sqrt(tl.sum(b_k * b_k)), 1e-6)
        b_q = b_q * scale  # K**-0.5

        b_h = b_h * tl.exp(b_g)
        b_v_new = b_v - tl.sum(b_h * b_k[:, None], axis=0)  # [BV]
        b_h = b_h + b_k[:, None] * (b_beta * b_v_new)[None, :]
        b_o = tl.sum(b_h * b_q[:, None], axis=0)  # [BV]
        tl.store(o + (tok * H + i_h) * V + o_v, b_o.to(o.dtype.element_ty), mask=m_v)

        if PER_TOKEN_SLOTS:
            write_slot = tl.load(state_indices + i_n * stride_indices_n + i_t * stride_indices_l).to(tl.int64)
            k_write = tl.where(write_slot >= 0, K, 0)
            tl.store(state_pool + write_slot * stride_pool_slot + p_tile, b_h.to(state_pool.dtype.element_ty),
                     mask=(o_k[:, None] < k_write) & m_v[None, :])

    if not PER_TOKEN_SLOTS:
        k_write = tl.where(read_slot >= 0, K, 0)
        tl.store(state_pool + read_slot * stride_pool_slot + p_tile, b_h.to(state_pool.dtype.element_ty),
                 mask=(o_k[:, None] < k_write) & m_v[None, :])


def _launch(q, k, v, g, beta, a, b, A_log, dt_bias, state_pool, state_indices,
            num_accepted_tokens, fuse_gating: bool, caller: str) -> torch.Tensor:
    N, L, H, K = q.shape
    V = v.shape[-1]
    if k.shape != q.shape or v.shape[:3] != (N, L, H):
        raise ValueError(f"{caller}: expected q, k [N, L, H, K] and v [N, L, H, V]; got q {tuple(q.shape)}, "
                         f"k {tuple(k.shape)}, v {tuple(v.shape)}")
    if state_pool.shape[1:] != (H, K, V):
        raise ValueError(f"{caller}: state_pool must be [num_slots, {H}, {K}, {V}], got {tuple(state_pool.shape)}")
    if state_indices.dim() not in (1, 2) or state_indices.shape[0] != N or (
            state_indices.dim() == 2 and state_indices.shape[1] < L):
        raise ValueError(f"{caller}: state_indices must be [{N}] or [{N}, {L}], got {tuple(state_indices.shape)}")
    per_token_slots = state_indices.dim() == 2
    if num_accepted_tokens is not None and not per_token_slots:
        raise ValueError(f"{caller}: num_accepted_tokens needs per-token state_indices [N, L]")
    q, k, v = (x.contiguous() for x in (q, k, v))
    o = torch.empty_like(v)
    if N == 0 or L == 0:
        return o
    BK = triton.next_power_of_2(K)
    BV = min(triton.next_power_of_2(V), 32)
    if state_indices.dim() == 1:
        stride_indices_n, stride_indices_l = state_indices.stride(0), 0
    else:
        stride_indices_n, stride_indices_l = state_indices.stride()
    grid = (N * H, triton.cdiv(V, BV))
    fused_recurrent_gated_delta_rule_fwd_kernel[grid](
        q, k, v, g, beta, a, b, A_log, dt_bias, o,
        state_pool, state_indices, num_accepted_tokens,
        *state_pool.stride(), stride_indices_n, stride_indices_l,
        K**-0.5, L,
        H=H, K=K, V=V, BK=BK, BV=BV,
        FUSE_GATING=fuse_gating,
        PER_TOKEN_SLOTS=per_token_slots, USE_NUM_ACCEPTED=num_accepted_tokens is not None,
    )
    return o


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
    """Decode steps of the gated delta rule with states in a pool (Triton).

    Args:
        q, k: `[N, L, H, K]`; v: `[N, L, H, V]`; g (log-decay), beta: `[N, L, H]` for N
            sequences of L tokens each (L = 1 for plain decode).
        state_pool: `[num_slots, H, K, V]` (any strides, any float dtype), updated in place.
        state_indices: `[N]` one slot per sequence (read, then overwritten with the state
            after its last token), or `[N, L]`: read from `[:, 0]`, the state after token j
            written to `[:, j]` (speculative decoding keeps every draft position). A
            negative slot (PAD_SLOT_ID) reads zeros and is not written.
        num_accepted_tokens: `[N]`, only with `[N, L]` indices: read the initial state from
            `state_indices[n, num_accepted_tokens[n] - 1]` instead of `[n, 0]`.
    Returns:
        o `[N, L, H, V]` in v's dtype.
    """
    g, beta = g.contiguous(), beta.contiguous()
    return _launch(q, k, v, g, beta, None, None, None, None, state_pool, state_indices,
                   num_accepted_tokens, False, "fused_recurrent_gated_delta_rule")


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
    """`fused_recurrent_gated_delta_rule` with the JetBlock gating fused in: takes the raw
    projections a, b `[N, L, H]` and the parameters A_log, dt_bias `[H]`, and computes
    g = -exp(A_log) * softplus(a + dt_bias) and beta = sigmoid(b) in float32 inside the
    kernel. Other arguments and the result as in `fused_recurrent_gated_delta_rule`."""
    a, b, A_log, dt_bias = (x.contiguous() for x in (a, b, A_log, dt_bias))
    return _launch(q, k, v, None, None, a, b, A_log, dt_bias, state_pool, state_indices,
                   num_accepted_tokens, True, "fused_recurrent_gated_delta_rule_from_gates")


def gated_delta_rule_step(
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
    """`kernels.dispatch.gated_delta_rule_step` on the GPU:
    `fused_recurrent_gated_delta_rule_from_gates` one token per sequence."""
    # [N, ...] -> [N, 1, ...] (one token per sequence) and back
    return fused_recurrent_gated_delta_rule_from_gates(
        q[:, None], k[:, None], v[:, None], a[:, None], b[:, None], A_log, dt_bias, state_pool,
        state_indices)[:, 0]


def gated_delta_rule_spec_decode(
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
    """`kernels.dispatch.gated_delta_rule_spec_decode` on the GPU: the packed sequences laid
    out for `fused_recurrent_gated_delta_rule` (`spec_decode.varlen_spec_decode`)."""
    return varlen_spec_decode(fused_recurrent_gated_delta_rule, q, k, v, a, b, A_log, dt_bias, cu_seqlens,
                              state_pool, state_indices, num_accepted_tokens)
