"""Differentiable dynamic causal convolution for training (Triton forward and backward),
matching autograd through `naive.dynamic_causal_conv_naive`.

Forward (the prefill kernels of triton_conv.py, with the initial states as a pool of N
slots and the final states written to a fresh tensor):

    pre_t[c] = sum_{w < W} kernel_t[c, w] * x_{t-W+1+w}[c]     out_t = silu(pre_t)
    final[j] = x_{T-W+1+j}                                      (history when T-W+1+j < 0)

Backward, two launches per sequence of positions, float32 throughout:

    1. dpre_t = dout_t * silu'(pre_t) (pre recomputed), dkernel_t[c, w] = dpre_t[c] * x_{t-W+1+w}[c]
    2. for every input position p in [-(W-1), T) (p < 0: initial-state row p + W - 1):
       dx_p = sum_w dpre_{p+W-1-w} * kernel_{p+W-1-w}[:, w]  (terms inside the sequence)
              + dfinal[p - T + W - 1]                         (when p >= T - W + 1)
"""

import torch
import triton
import triton.language as tl

from .triton_conv import dynamic_causal_conv_launch


@triton.jit
def dynamic_causal_conv_bwd_kernel_pre(
    x,  # [T, D] contiguous
    kernels,  # [T, D, W] contiguous
    initial_state,  # [N, W - 1, D] contiguous (dummy when USE_INITIAL_STATE is False)
    dout,  # [T, D] contiguous
    dpre,  # [T, D] float32 output
    dkernels,  # [T, D, W] output
    cu_seqlens,  # [N + 1]
    D,
    W: tl.constexpr,
    BT: tl.constexpr,
    BD: tl.constexpr,
    USE_INITIAL_STATE: tl.constexpr,
):
    i_t, i_d, i_n = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    bos = tl.load(cu_seqlens + i_n).to(tl.int64)
    seq_len = tl.load(cu_seqlens + i_n + 1).to(tl.int64) - bos
    if i_t * BT >= seq_len:
        return
    o_t = i_t * BT + tl.arange(0, BT)
    o_d = i_d * BD + tl.arange(0, BD)
    m_t = o_t < seq_len
    m_d = o_d < D
    m_td = m_t[:, None] & m_d[None, :]
    p_h0 = initial_state + i_n.to(tl.int64) * (W - 1) * D + o_d[None, :]  # [1, BD]

    b_pre = tl.zeros([BT, BD], dtype=tl.float32)
    for w in tl.static_range(W):
        src = o_t - (W - 1) + w
        b_in = tl.load(x + (bos + src)[:, None] * D + o_d[None, :],
                       mask=((src >= 0) & m_t)[:, None] & m_d[None, :], other=0.0).to(tl.float32)
        if USE_INITIAL_STATE:
            b_in += tl.load(p_h0 + (W - 1 + src)[:, None] * D, mask=((src < 0) & m_t)[:, None] & m_d[None, :],
                            other=0.0).to(x.dtype.element_ty).to(tl.float32)
        b_w = tl.load(kernels + ((bos + o_t)[:, None] * D + o_d[None, :]) * W + w, mask=m_td, other=0.0)
        b_pre += b_in * b_w.to(tl.float32)
    b_sig = tl.sigmoid(b_pre)
    b_do = tl.load(dout + (bos + o_t)[:, None] * D + o_d[None, :], mask=m_td, other=0.0).to(tl.float32)
    b_dpre = b_do * b_sig * (1.0 + b_pre * (1.0 - b_sig))
    tl.store(dpre + (bos + o_t)[:, None] * D + o_d[None, :], b_dpre, mask=m_td)

    for w in tl.static_range(W):
        src = o_t - (W - 1) + w
        b_in = tl.load(x + (bos + src)[:, None] * D + o_d[None, :],
                       mask=((src >= 0) & m_t)[:, None] & m_d[None, :], other=0.0).to(tl.float32)
        if USE_INITIAL_STATE:
            b_in += tl.load(p_h0 + (W - 1 + src)[:, None] * D, mask=((src < 0) & m_t)[:, None] & m_d[None, :],
                            other=0.0).to(x.dtype.element_ty).to(tl.float32)
        tl.store(dkernels + ((bos + o_t)[:, None] * D + o_d[None, :]) * W + w,
                 (b_dpre * b_in).to(dkernels.dtype.element_ty), mask=m_td)


@triton.jit
def dynamic_causal_conv_bwd_kernel_input(
    kernels,  # [T, D, W] contiguous
    dpre,  # [T, D] float32
    dfinal,  # [N, W - 1, D] contiguous
    dx,  # [T, D] output
    dinitial_state,  # [N, W - 1, D] output (dummy when USE_INITIAL_STATE is False)
    cu_seqlens,  # [N + 1]
    D,
    W: tl.constexpr,
    BT: tl.constexpr,
    BD: tl.constexpr,
    USE_INITIAL_STATE: tl.constexpr,
):
    i_t, i_d, i_n = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    bos = tl.load(cu_seqlens + i_n).to(tl.int64)
    seq_len = tl.load(cu_seqlens + i_n + 1).to(tl.int64) - bos
    if i_t * BT >= seq_len + W - 1:
        return
    pos = i_t * BT + tl.arange(0, BT) - (W - 1)  # input positions, < 0: initial state
    o_d = i_d * BD + tl.arange(0, BD)
    m_p = pos < seq_len
    m_d = o_d < D

    b_grad = tl.zeros([BT, BD], dtype=tl.float32)
    for w in tl.static_range(W):
        t = pos + (W - 1) - w  # output token that reads input p through tap w
        m = ((t >= 0) & (t < seq_len) & m_p)[:, None] & m_d[None, :]
        b_dpre = tl.load(dpre + (bos + t)[:, None] * D + o_d[None, :], mask=m, other=0.0)
        b_w = tl.load(kernels + ((bos + t)[:, None] * D + o_d[None, :]) * W + w, mask=m, other=0.0)
        b_grad += b_dpre * b_w.to(tl.float32)
    j = pos - seq_len + (W - 1)  # final-state row holding input p
    p_n = i_n.to(tl.int64) * (W - 1) * D
    b_grad += tl.load(dfinal + p_n + j[:, None] * D + o_d[None, :],
                      mask=((j >= 0) & m_p)[:, None] & m_d[None, :], other=0.0).to(tl.float32)

    tl.store(dx + (bos + pos)[:, None] * D + o_d[None, :], b_grad.to(dx.dtype.element_ty),
             mask=((pos >= 0) & m_p)[:, None] & m_d[None, :])
    if USE_INITIAL_STATE:
        tl.store(dinitial_state + p_n + (pos + W - 1)[:, None] * D + o_d[None, :],
                 b_grad.to(dinitial_state.dtype.element_ty), mask=((pos < 0) & m_p)[:, None] & m_d[None, :])


class DynamicCausalConvFunction(torch.autograd.Function):
    """Packed sequences: x `[T, D]`, kernels `[T, D, W]`, cu_seqlens `[N + 1]`, initial
    state `[N, W - 1, D]` or None. Returns (out `[T, D]`, final state `[N, W - 1, D]`)."""

    @staticmethod
    def forward(ctx, x, kernels, initial_state, cu_seqlens, max_len: int):
        T, D = x.shape
        W = kernels.shape[-1]
        N = cu_seqlens.shape[0] - 1
        slots = torch.arange(N, dtype=torch.int32, device=x.device)
        final_state = torch.empty(N, W - 1, D, dtype=x.dtype, device=x.device)
        has_initial_state = torch.full((N,), initial_state is not None, dtype=torch.int32, device=x.device)
        out = dynamic_causal_conv_launch(x, kernels, cu_seqlens, max_len, initial_state, slots,
                                         has_initial_state, final_state, slots)
        ctx.save_for_backward(x, kernels, initial_state, cu_seqlens)
        ctx.max_len = max_len
        return out, final_state

    @staticmethod
    def backward(ctx, dout, dfinal):
        x, kernels, initial_state, cu_seqlens = ctx.saved_tensors
        T, D = x.shape
        W = kernels.shape[-1]
        N = cu_seqlens.shape[0] - 1
        use_initial_state = initial_state is not None
        dout = dout.contiguous()
        dfinal = dfinal.contiguous() if dfinal is not None else x.new_zeros(N, W - 1, D)
        dpre = torch.empty(T, D, dtype=torch.float32, device=x.device)
        dkernels = torch.empty_like(kernels)
        dx = torch.empty_like(x)
        dh0 = torch.empty_like(initial_state) if use_initial_state else None
        BD = min(128, triton.next_power_of_2(D))
        BT = min(64, triton.next_power_of_2(max(ctx.max_len, 1)))
        if ctx.max_len > 0:
            dynamic_causal_conv_bwd_kernel_pre[(triton.cdiv(ctx.max_len, BT), triton.cdiv(D, BD), N)](
                x, kernels, initial_state if use_initial_state else x, dout, dpre, dkernels, cu_seqlens, D,
                W=W, BT=BT, BD=BD, USE_INITIAL_STATE=use_initial_state)
        BT = min(64, triton.next_power_of_2(ctx.max_len + W - 1))
        dynamic_causal_conv_bwd_kernel_input[(triton.cdiv(ctx.max_len + W - 1, BT), triton.cdiv(D, BD), N)](
            kernels, dpre, dfinal, dx, dh0 if use_initial_state else dx, cu_seqlens, D,
            W=W, BT=BT, BD=BD, USE_INITIAL_STATE=use_initial_state)
        return dx, dkernels, dh0, None, None


def dynamic_causal_conv_autograd(
    x: torch.Tensor,
    kernels: torch.Tensor,
    initial_state: torch.Tensor | None = None,
    cu_seqlens: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic causal conv with gradients (Triton forward and backward).

    Args:
        x: `[B, T, D]` inputs; kernels: `[B, T, D, W]` per-token filters (tap W - 1 is
            the current token).
        initial_state: `[N, W - 1, D]`, the inputs before each sequence's first token
            (None: zeros), N = B, or the number of sequences with cu_seqlens.
        cu_seqlens: `[N + 1]` int, optional: with B = 1, the T tokens are N packed
            sequences `cu_seqlens[i]:cu_seqlens[i+1]`, each convolved on its own.
    Returns:
        out `[B, T, D]` (SiLU applied, x's dtype) and final states `[N, W - 1, D]` (the last
        W - 1 inputs of each sequence, x's dtype), as `dynamic_causal_conv_naive` per
        sequence; gradients flow to x, kernels and initial_state.
    """
    B, T, D = x.shape
    W = kernels.shape[-1]
    if kernels.shape != (B, T, D, W):
        raise ValueError(f"dynamic_causal_conv_autograd: kernels must be [{B}, {T}, {D}, W], "
                         f"got {tuple(kernels.shape)}")
    if cu_seqlens is None:
        cu_seqlens = torch.arange(0, (B + 1) * T, T, dtype=torch.int32, device=x.device)
        max_len = T
    else:
        if B != 1:
            raise ValueError(f"dynamic_causal_conv_autograd: cu_seqlens needs x [1, T, D], got {tuple(x.shape)}")
        cu_seqlens = cu_seqlens.to(device=x.device, dtype=torch.int32).contiguous()
        max_len = int((cu_seqlens[1:] - cu_seqlens[:-1]).max().item()) if cu_seqlens.numel() > 1 else 0
    N = cu_seqlens.shape[0] - 1
    if initial_state is not None:
        if initial_state.shape != (N, W - 1, D):
            raise ValueError(f"dynamic_causal_conv_autograd: initial_state must be [{N}, {W - 1}, {D}], "
                             f"got {tuple(initial_state.shape)}")
        initial_state = initial_state.contiguous()
    # [B, T, D] -> [B * T, D]; [B, T, D, W] -> [B * T, D, W]
    out, final_state = DynamicCausalConvFunction.apply(
        x.reshape(B * T, D).contiguous(), kernels.reshape(B * T, D, W).contiguous(),
        initial_state, cu_seqlens, max_len)
    return out.view(B, T, D), final_state
