"""Chunked gated delta rule for prefill on the CPU (PyTorch, float32).

Within a chunk of C tokens with cumulative log-decay G and gamma = exp(G), the
delta-rule writes U solve a unit lower-triangular system (the WY form):

    (I + A) U = beta * V - (beta * gamma * K) S0,   A[s, r] = beta_s exp(G_s - G_r) k_s.k_r  (r < s)
    O  = (gamma * Q) S0 + (Q K^T * exp(G_t - G_s), s <= t) U
    S1 = exp(G_C) S0 + (K * exp(G_C - G))^T U

so with T = (I + A)^-1, U0 = T (beta V) and W = T (beta gamma K): U = U0 - W S0.

Schedule: the sequences of a batch run side by side, longest first, so that the ones
still running at chunk position j are a prefix of the batch. Chunk positions are taken a
wave at a time (a few positions of every running sequence, about `_WAVE_TOKENS` tokens,
so that the wave's intermediates stay in the CPU caches): the state-free work of a wave
(decay masks, T, U0, W) is one batched computation, then the state hands over from chunk
to chunk with three batched matrix products per position ([W; gamma Q] S0, (Q K^T ..) U
and K^T U). `chunked_gated_delta_rule_sequence` keeps the
plain differentiable form (one sequence, no in-place updates) for the training backward.
"""

import torch
import torch.nn.functional as F

# Tokens per wave, all running sequences together.
_WAVE_TOKENS = 256


def chunked_gated_delta_rule_sequence(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    state: torch.Tensor,
    chunk_size: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One sequence: q, k `[T, H, K]`, v `[T, H, V]`, g, beta `[T, H]`, state `[H, K, V]`
    (all float32, q already scaled). Returns o `[T, H, V]` and the final state.

    The differentiable formulation (no in-place updates), recomputed under autograd by
    the training backward (triton_chunk_autograd.py); inference runs `_run_wave`."""
    T, H, K = q.shape
    V = v.shape[-1]
    C = chunk_size
    N = -(-T // C)
    pad = N * C - T
    # Padding tokens have k = v = q = 0 and g = 0: no write, no decay, no output.
    # [T, H, D] -> [H, N, C, D]
    q, k, v = (F.pad(x, (0, 0, 0, 0, 0, pad)).view(N, C, H, -1).permute(2, 0, 1, 3) for x in (q, k, v))
    # [T, H] -> [H, N, C]
    g, beta = (F.pad(x, (0, 0, 0, pad)).view(N, C, H).permute(2, 0, 1) for x in (g, beta))

    G = g.cumsum(-1)  # [H, N, C]
    causal = torch.ones(C, C, dtype=torch.bool, device=q.device).tril()
    # decay[t, s] = exp(G_t - G_s) for s <= t, else 0: [H, N, C, C]
    decay = (G[..., :, None] - G[..., None, :]).masked_fill(~causal, float("-inf")).exp()

    k_beta = k * beta[..., None]
    A = (k_beta @ k.transpose(-1, -2) * decay).tril(-1)  # strictly lower
    eye = torch.eye(C, dtype=q.dtype, device=q.device)
    lower = eye + A
    U0 = torch.linalg.solve_triangular(lower, v * beta[..., None], upper=False, unitriangular=True)
    W = torch.linalg.solve_triangular(lower, k_beta * G.exp()[..., None], upper=False, unitriangular=True)
    qk = q @ k.transpose(-1, -2) * decay  # [H, N, C, C]
    q_decayed = q * G.exp()[..., None]
    k_to_end = k * (G[..., -1:] - G).exp()[..., None]
    chunk_decay = G[..., -1].exp()  # [H, N]

    out = torch.empty(H, N, C, V, dtype=q.dtype, device=q.device)
    for n in range(N):
        U = U0[:, n] - W[:, n] @ state  # [H, C, V]
        out[:, n] = q_decayed[:, n] @ state + qk[:, n] @ U
        state = state * chunk_decay[:, n, None, None] + k_to_end[:, n].transpose(-1, -2) @ U
    # [H, N, C, V] -> [T, H, V]
    return out.permute(1, 2, 0, 3).reshape(N * C, H, V)[:T], state


def _gather_wave(x: torch.Tensor, src: torch.Tensor) -> torch.Tensor:
    """Rows `src` `[P, S, C]` of x `[T, H, *D]` as float32 `[P * S * H, C, *D]` (contiguous)."""
    P, S, C = src.shape
    rows = x.index_select(0, src.flatten()).view(P, S, C, *x.shape[1:])
    # [P, S, C, H, *D] -> [P, S, H, C, *D]
    rows = rows.transpose(2, 3)
    out = torch.empty(rows.shape, dtype=torch.float32, device=x.device).copy_(rows)
    # [P, S, H, C, *D] -> [P * S * H, C, *D]
    return out.view(-1, *out.shape[3:])


def _run_wave(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    state: torch.Tensor,
    scale: float,
    use_qk_l2norm: bool,
) -> torch.Tensor:
    """P chunk positions of S sequences, batched over (position, sequence, head):
    q, k `[P * S * H, C, K]`, v `[P * S * H, C, V]`, g, beta `[P * S * H, C]` (float32,
    g = beta = 0 on padding tokens); state `[S, H, K, V]` float32, updated in place.
    Returns o `[P, S * H, C, V]` float32.

    The L2 norms and the scale enter as per-row factors of the products they feed
    (q_hat k_hat^T = diag(rq) Q K^T diag(rk)) rather than as passes over q and k."""
    batch, C, K = q.shape
    V = v.shape[-1]
    SH = state.shape[0] * state.shape[1]
    P = batch // SH
    if use_qk_l2norm:  # 1 / max(||x||, eps), as `naive.l2_normalize`
        rq = torch.linalg.vector_norm(q, dim=-1).clamp_min_(1e-6).reciprocal_().mul_(scale)  # [batch, C]
        rk = torch.linalg.vector_norm(k, dim=-1).clamp_min_(1e-6).reciprocal_()
    else:
        rq, rk = torch.full_like(g, scale), torch.ones_like(g)
    G = g.cumsum(-1)  # [batch, C]
    gamma = G.exp()
    causal = torch.ones(C, C, dtype=torch.bool, device=q.device).tril()
    # decay[t, s] = exp(G_t - G_s) rk_s for s <= t, else 0: [batch, C, C]
    decay = (G[:, :, None] - G[:, None, :]).masked_fill_(~causal, float("-inf")).exp_().mul_(rk[:, None, :])
    A = torch.bmm(k, k.transpose(-1, -2)).mul_(decay).mul_((beta * rk)[:, :, None])
    # T = (I + strictly lower part of A)^-1 (a unit-triangular solve ignores the diagonal)
    eye = torch.eye(C, dtype=q.dtype, device=q.device).expand(batch, C, C)
    T = torch.linalg.solve_triangular(A, eye, upper=False, unitriangular=True)
    T.mul_(beta[:, None, :])  # T diag(beta)
    U0 = torch.bmm(T, v)  # [batch, C, V]
    qk = torch.bmm(q, k.transpose(-1, -2)).mul_(decay).mul_(rq[:, :, None])  # [batch, C, C]
    # the two products read against the state, stacked: [W; gamma q_hat] [batch, 2C, K]
    WQ = torch.empty(batch, 2 * C, K, dtype=q.dtype, device=q.device)
    torch.bmm(T.mul_((gamma * rk)[:, None, :]), k, out=WQ[:, :C])  # W
    torch.mul(q, (gamma * rq)[:, :, None], out=WQ[:, C:])
    k_to_end = k.mul_(((G[:, -1:] - G).exp_() * rk)[:, :, None])
    chunk_decay = G[:, -1].exp()

    # [P * S * H, ...] -> [P, S * H, ...]: one position at a time, batched over sequences and heads
    U0, WQ, k_to_end, qk = (x.view(P, SH, *x.shape[1:]) for x in (U0, WQ, k_to_end, qk))
    chunk_decay = chunk_decay.view(P, SH, 1, 1)
    # [S, H, K, V] -> [S * H, K, V] (a view: the caller's states are updated)
    state = state.view(SH, K, V)
    out = torch.empty(P, SH, C, V, dtype=torch.float32, device=q.device)
    for p in range(P):
        WQS = torch.bmm(WQ[p], state)  # [S * H, 2C, V]: W S, gamma q_hat S
        U = torch.sub(U0[p], WQS[:, :C])  # [S * H, C, V]
        torch.baddbmm(WQS[:, C:], qk[p], U, out=out[p])
        state.mul_(chunk_decay[p])
        state.baddbmm_(k_to_end[p].transpose(-1, -2), U)
    return out


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
    chunk_size: int = 32,
) -> torch.Tensor:
    """Varlen chunked gated delta rule reading and writing states in a pool.

    Args:
        q, k: `[T, H, K]`; v: `[T, H, V]`; g (log-decay), beta: `[T, H]`; tokens of all
            sequences packed back to back, sequence i is `cu_seqlens[i]:cu_seqlens[i+1]`.
        state_pool: `[num_slots, H, K, V]`; sequence i starts from
            `state_pool[state_indices[i]]` if `has_initial_state[i]` (else zeros) and its
            final state is written back there; a negative index (PAD_SLOT_ID) is neither
            read nor written.
        chunk_size: tokens per chunk (32: the fastest on CPUs measured, bench/kernels_cpu.py).
    Returns:
        o `[T, H, V]` in v's dtype.
    """
    T_total, H, K = q.shape
    V = v.shape[-1]
    C = chunk_size
    scale = K**-0.5 if scale is None else scale
    device = q.device
    bounds = cu_seqlens.tolist()
    num_seqs = len(bounds) - 1
    lengths = [bounds[i + 1] - bounds[i] for i in range(num_seqs)]
    order = sorted(range(num_seqs), key=lambda i: -lengths[i])  # longest first
    num_chunks = [-(-lengths[i] // C) for i in order]
    order_t = torch.tensor(order, dtype=torch.long, device=device)
    slots = state_indices.to(device=device, dtype=torch.long)[order_t]
    padded = slots < 0  # PAD_SLOT_ID: neither read nor written
    has_state = has_initial_state.to(device=device, dtype=torch.bool)[order_t] & ~padded
    # states of the sequences, longest first: [num_seqs, H, K, V] float32
    states = torch.where(has_state[:, None, None, None], state_pool[slots.clamp_min(0)].float(), 0.0)
    starts = torch.tensor([bounds[i] for i in order], dtype=torch.long, device=device)
    ends = torch.tensor([bounds[i + 1] for i in order], dtype=torch.long, device=device)
    out = torch.empty(T_total + 1, H, V, dtype=v.dtype, device=device)  # last row: sink for padding

    position = 0
    while num_seqs > 0 and position < num_chunks[0]:
        running = sum(n > position for n in num_chunks)
        width = max(1, min(num_chunks[0] - position, _WAVE_TOKENS // (running * C)))
        # token row of chunk position (position + p) of sequence s, offset c: [P, S, C]
        chunk_starts = starts[:running] + position * C + C * torch.arange(width, device=device)[:, None]
        rows = chunk_starts[:, :, None] + torch.arange(C, device=device)
        valid = rows < ends[:running, None]
        src = torch.minimum(rows, ends[:running, None] - 1)  # padding reads a real row; g = beta = 0 there
        dst = torch.where(valid, rows, T_total)
        # [P, S, C] -> [P * S * H, C], the layout of the gathered gates
        padding = ~valid[:, :, None, :].expand(-1, -1, H, -1).reshape(-1, C)
        o = _run_wave(
            _gather_wave(q, src), _gather_wave(k, src), _gather_wave(v, src),
            _gather_wave(g, src).masked_fill_(padding, 0.0), _gather_wave(beta, src).masked_fill_(padding, 0.0),
            states[:running], scale, use_qk_l2norm)
        # [P, S * H, C, V] -> [P, S, C, H, V] -> [P * S * C, H, V]
        o = o.view(width, running, H, C, V).transpose(2, 3)
        o = torch.empty(o.shape, dtype=out.dtype, device=device).copy_(o).view(-1, H, V)
        out.index_copy_(0, dst.flatten(), o)
        position += width
    state_pool[slots[~padded]] = states[~padded].to(state_pool.dtype)
    return out[:T_total]
