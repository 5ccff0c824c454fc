"""Differentiable chunked gated delta rule for training, matching autograd through
`naive.naive_recurrent_gated_delta_rule`.

Forward: the Triton prefill kernel of triton_chunk.py (initial states as a pool of N
slots, final states written to a fresh float32 tensor).

Backward: PyTorch, not Triton. It recomputes the forward with the differentiable
chunked formulation of naive.py (`chunked_gated_delta_rule`: batched triangular solves per chunk,
sequential state hand-over between chunks) under autograd
and back-propagates through it. Correct on any device, at the memory of the PyTorch
chunked graph (per-chunk [C, C] and [C, K/V] tensors plus one [H, K, V] state per chunk)
and the speed of cuBLAS batched matmuls; a Triton chunked backward (as in
flash-linear-attention) would replace `_recompute` without changing the interface.
"""

import torch

from .naive import chunked_gated_delta_rule
from .triton_chunk import chunk_gated_delta_rule as chunk_gated_delta_rule_triton


def _recompute(q, k, v, g, beta, initial_state, bounds, chunk_size, batched_len):
    """Differentiable PyTorch forward on packed tokens q, k `[T, H, K]`, v `[T, H, V]`,
    g, beta `[T, H]`. Returns o `[T, H, V]` (float32) and final states `[N, H, K, V]`."""
    T, H, K = q.shape
    V = v.shape[-1]
    N = len(bounds) - 1
    if batched_len is not None:  # N sequences of batched_len tokens: [N * L, H, ...] -> [N, L, H, ...]
        o, ht = chunked_gated_delta_rule(*(x.reshape(N, batched_len, *x.shape[1:]) for x in (q, k, v, g, beta)),
                                         initial_state, chunk_size)
        return o.reshape(T, H, V), ht
    outputs, finals = [], []
    for i in range(N):  # one sequence at a time: [T_i, H, ...] -> [1, T_i, H, ...]
        start, end = bounds[i], bounds[i + 1]
        h_i = None if initial_state is None else initial_state[i:i + 1]
        if end > start:
            o_i, h_i = chunked_gated_delta_rule(*(x[None, start:end] for x in (q, k, v, g, beta)), h_i, chunk_size)
            outputs.append(o_i[0])
            finals.append(h_i[0])
        else:
            finals.append(q.new_zeros(H, K, V, dtype=torch.float32) if h_i is None else h_i[0].float())
    o = torch.cat(outputs) if outputs else q.new_zeros(0, H, V, dtype=torch.float32)
    return o, torch.stack(finals)


class ChunkGatedDeltaRuleFunction(torch.autograd.Function):
    """Packed tokens: q, k `[T, H, K]`, v `[T, H, V]`, g, beta `[T, H]`, cu_seqlens
    `[N + 1]`, initial state `[N, H, K, V]` or None. Returns (o `[T, H, V]` in v's dtype,
    final states `[N, H, K, V]` float32)."""

    @staticmethod
    def forward(ctx, q, k, v, g, beta, initial_state, cu_seqlens, chunk_size, batched_len):
        T, H, K = q.shape
        V = v.shape[-1]
        N = cu_seqlens.shape[0] - 1
        if initial_state is None:
            pool = torch.zeros(N, H, K, V, dtype=torch.float32, device=q.device)
        else:
            pool = initial_state.detach().float().clone()
        slots = torch.arange(N, dtype=torch.int32, device=q.device)
        has_initial_state = torch.full((N,), initial_state is not None, dtype=torch.bool, device=q.device)
        o = chunk_gated_delta_rule_triton(q, k, v, g, beta, cu_seqlens, pool, slots, has_initial_state,
                                          chunk_size)
        ctx.save_for_backward(q, k, v, g, beta, initial_state)
        ctx.bounds = cu_seqlens.tolist()
        ctx.options = (chunk_size, batched_len)
        return o, pool

    @staticmethod
    def backward(ctx, do, dht):
        q, k, v, g, beta, initial_state = ctx.saved_tensors
        chunk_size, batched_len = ctx.options
        inputs = [x.detach().requires_grad_(x.requires_grad) for x in (q, k, v, g, beta)]
        h0 = None
        if initial_state is not None:
            h0 = initial_state.detach().requires_grad_(initial_state.requires_grad)
        wanted = [x for x in inputs + [h0] if x is not None and x.requires_grad]
        grads = {}
        if wanted:
            with torch.enable_grad():
                o, ht = _recompute(*inputs, h0, ctx.bounds, chunk_size, batched_len)
                outs, grad_outs = [o], [do.float()]
                if dht is not None:
                    outs.append(ht)
                    grad_outs.append(dht.float())
                found = torch.autograd.grad(outs, wanted, grad_outs, allow_unused=True)
            grads = {id(x): gx for x, gx in zip(wanted, found)}
        result = [grads.get(id(x)) if x is not None else None for x in inputs + [h0]]
        return (*result, None, None, None)


def chunk_gated_delta_rule_autograd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    initial_state: torch.Tensor | None = None,
    cu_seqlens: torch.Tensor | None = None,
    chunk_size: int = 64,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Chunked gated delta rule with gradients (Triton forward, PyTorch backward).

    Args:
        q, k: `[B, T, H, K]`; v: `[B, T, H, V]`; g (log-decay), beta: `[B, T, H]`.
        initial_state: `[N, H, K, V]` or None (zeros); N = B, or the number of sequences
            with cu_seqlens.
        cu_seqlens: `[N + 1]` int, optional: with B = 1, the T tokens are N packed
            sequences `cu_seqlens[i]:cu_seqlens[i+1]`, each with its own state.
    Returns:
        o `[B, T, H, V]` in v's dtype and final states `[N, H, K, V]` float32, as
        `naive_recurrent_gated_delta_rule(..., output_final_state=True)` per sequence;
        gradients flow to q, k, v, g, beta and initial_state.
    """
    B, T, H, K = q.shape
    V = v.shape[-1]
    if k.shape != q.shape or v.shape[:3] != (B, T, H) or g.shape != (B, T, H) or beta.shape != (B, T, H):
        raise ValueError(f"chunk_gated_delta_rule_autograd: expected q, k [B, T, H, K], v [B, T, H, V], "
                         f"g, beta [B, T, H]; got q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}, "
                         f"g {tuple(g.shape)}, beta {tuple(beta.shape)}")
    if cu_seqlens is None:
        cu_seqlens = torch.arange(0, (B + 1) * T, T, dtype=torch.int32, device=q.device)
        batched_len = T
    else:
        if B != 1:
            raise ValueError(f"chunk_gated_delta_rule_autograd: cu_seqlens needs B = 1, got q {tuple(q.shape)}")
        cu_seqlens = cu_seqlens.to(device=q.device, dtype=torch.int32).contiguous()
        batched_len = None
    N = cu_seqlens.shape[0] - 1
    if initial_state is not None and initial_state.shape != (N, H, K, V):
        raise ValueError(f"chunk_gated_delta_rule_autograd: initial_state must be [{N}, {H}, {K}, {V}], "
                         f"got {tuple(initial_state.shape)}")
    # [B, T, H, D] -> [B * T, H, D]; [B, T, H] -> [B * T, H]
    o, final_state = ChunkGatedDeltaRuleFunction.apply(
        q.reshape(B * T, H, K), k.reshape(B * T, H, K), v.reshape(B * T, H, V),
        g.reshape(B * T, H), beta.reshape(B * T, H), initial_state, cu_seqlens,
        chunk_size, batched_len)
    return o.view(B, T, H, V), final_state
