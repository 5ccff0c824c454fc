"""Chunked gated delta rule for prefill on the CPU (PyTorch, float32).

Within a chunk of C tokens with cumulative log-decay G and gamma = exp(G), the
delta-rule writes U solve a unit lower-triangular system (the WY form):

    (I + A) U = beta * V - (beta * gamma * K) S0,   A[s, r] = beta_s exp(G_s - G_r) k_s.k_r  (r < s)
    O  = (gamma * Q) S0 + (Q K^T * exp(G_t - G_s), s <= t) U
    S1 = exp(G_C) S0 + (K * exp(G_C - G))^T U

The triangular solves and all intra-chunk products run for every chunk of a sequence
at once; only the state hand-over between chunks is sequential.
"""

import torch
import torch.nn.functional as F

from .naive import l2_normalize


def _chunk_sequence(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    state: torch.Tensor,
    chunk_size: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One sequence: q, k `[T, H, K]`, v `[T, H, V]`, g, beta `[T, H]`, state `[H, K, V]`
    (all float32, q already scaled). Returns o `[T, H, V]` and the final state."""
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
    chunk_size: int = 64,
) -> torch.Tensor:
    """Varlen chunked gated delta rule reading and writing states in a pool.

    Args:
        q, k: `[T, H, K]`; v: `[T, H, V]`; g (log-decay), beta: `[T, H]`; tokens of all
            sequences packed back to back, sequence i is `cu_seqlens[i]:cu_seqlens[i+1]`.
        state_pool: `[num_slots, H, K, V]`; sequence i starts from
            `state_pool[state_indices[i]]` if `has_initial_state[i]` (else zeros) and its
            final state is written back there.
    Returns:
        o `[T, H, V]` in v's dtype.
    """
    K = q.shape[-1]
    scale = K**-0.5 if scale is None else scale
    out_dtype = v.dtype
    q, k, v, g, beta = (x.float() for x in (q, k, v, g, beta))
    if use_qk_l2norm:
        q, k = l2_normalize(q), l2_normalize(k)
    q = q * scale
    out = torch.empty(v.shape, dtype=torch.float32, device=v.device)
    bounds = cu_seqlens.tolist()
    slots = state_indices.tolist()
    has_state = has_initial_state.tolist()
    for i, slot in enumerate(slots):
        start, end = bounds[i], bounds[i + 1]
        state = state_pool[slot].float() if has_state[i] else q.new_zeros(state_pool.shape[1:])
        if end > start:
            out[start:end], state = _chunk_sequence(
                q[start:end], k[start:end], v[start:end], g[start:end], beta[start:end], state, chunk_size)
        state_pool[slot] = state.to(state_pool.dtype)
    return out.to(out_dtype)
