"""The gated delta rule as its definition (one token at a time), and the same recurrence in
chunks under autograd, the form the converter trains with on the CPU and the GPU training
backward recomputes (triton_chunk_autograd.py).

Chunked form: within a chunk of C tokens with cumulative log-decay G and gamma = exp(G),
the delta-rule writes U solve a unit lower-triangular system (the WY form):

    (I + A) U = beta * V - (beta * gamma * K) S0,   A[s, r] = beta_s exp(G_s - G_r) k_s.k_r  (r < s)
    O  = (gamma * Q) S0 + (Q K^T * exp(G_t - G_s), s <= t) U
    S1 = exp(G_C) S0 + (K * exp(G_C - G))^T U

so with T = (I + A)^-1, U0 = T (beta V) and W = T (beta gamma K): U = U0 - W S0.
"""

import torch
import torch.nn.functional as F


def l2_normalize(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """x / max(||x||, eps) over the last dim (the q/k normalisation of the JetBlock)."""
    return F.normalize(x, p=2.0, dim=-1, eps=eps)


def normalized_qk(q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """q and k as the recurrence reads them: float32, L2-normalised, q scaled by K**-0.5."""
    return l2_normalize(q.float()) * q.shape[-1] ** -0.5, l2_normalize(k.float())


def naive_recurrent_gated_delta_rule(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Reference gated delta rule over padded batches (differentiable).

    Args:
        q, k: `[B, T, H, K]` (normalised here); v: `[B, T, H, V]`.
        g: `[B, T, H]` log-decay (<= 0); beta: `[B, T, H]` write strength in (0, 1).
        initial_state: `[B, H, K, V]` or None (zeros).
    Returns:
        o `[B, T, H, V]` in v's dtype, and the final state `[B, H, K, V]` (float32)
        when `output_final_state`.
    """
    B, T, H, K = q.shape
    V = v.shape[-1]
    out_dtype = v.dtype
    q, k = normalized_qk(q, k)
    v, g, beta = (x.float() for x in (v, g, beta))
    S = q.new_zeros(B, H, K, V) if initial_state is None else initial_state.float()
    outputs = []
    for t in range(T):
        S = S * g[:, t].exp()[..., None, None]
        k_t = k[:, t]  # [B, H, K]
        v_new = v[:, t] - torch.einsum("bhkv,bhk->bhv", S, k_t)
        S = S + torch.einsum("bhk,bhv->bhkv", k_t * beta[:, t, :, None], v_new)
        outputs.append(torch.einsum("bhkv,bhk->bhv", S, q[:, t]))
    o = torch.stack(outputs, dim=1) if outputs else v.new_zeros(B, 0, H, V)
    return o.to(out_dtype), (S if output_final_state else None)


def chunked_gated_delta_rule_sequence(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    state: torch.Tensor,
    chunk_size: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One sequence in chunks, without in-place updates (differentiable): q, k `[T, H, K]`
    (normalised, q scaled: `normalized_qk`), v `[T, H, V]`, g, beta `[T, H]`, state
    `[H, K, V]`, all float32. Returns o `[T, H, V]` and the final state."""
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


def chunked_gated_delta_rule(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    initial_state: torch.Tensor | None = None,
    chunk_size: int = 64,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`naive_recurrent_gated_delta_rule` in chunks, for B sequences of equal length:
    q, k `[B, T, H, K]` (normalised here), v `[B, T, H, V]`, g, beta `[B, T, H]`,
    initial_state `[B, H, K, V]` or None. Returns o `[B, T, H, V]` and the final states
    `[B, H, K, V]`, float32, differentiable."""
    B, T, H, K = q.shape
    V = v.shape[-1]
    q, k = normalized_qk(q, k)

    def fold(x):  # [B, T, H, ...] -> [T, B * H, ...]: the sequences become extra heads
        return x.float().transpose(0, 1).reshape(T, B * H, *x.shape[3:])

    h0 = q.new_zeros(B * H, K, V) if initial_state is None else initial_state.float().reshape(B * H, K, V)
    o, state = chunked_gated_delta_rule_sequence(fold(q), fold(k), fold(v), fold(g), fold(beta), h0, chunk_size)
    # [T, B * H, V] -> [B, T, H, V]
    return o.view(T, B, H, V).transpose(0, 1), state.view(B, H, K, V)
