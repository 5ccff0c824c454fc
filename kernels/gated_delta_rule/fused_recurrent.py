"""Recurrent gated delta rule for decode on the CPU: a few tokens per sequence, states
updated in place in the pool, batched over sequences."""

import torch

from .naive import l2_normalize


def fused_recurrent_gated_delta_rule(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    state_pool: torch.Tensor,
    state_indices: torch.Tensor,
    scale: float | None = None,
    use_qk_l2norm: bool = True,
    num_accepted_tokens: torch.Tensor | None = None,
) -> torch.Tensor:
    """Args:
        q, k: `[N, L, H, K]`; v: `[N, L, H, V]`; g, beta: `[N, L, H]` for N sequences of L
            tokens each (L = 1 for plain decode).
        state_pool: `[num_slots, H, K, V]`.
        state_indices: `[N]` one slot per sequence (read, then overwritten with the state
            after its last token), or `[N, >= L]`: read from `[:, 0]`, the state after token
            j written to `[:, j]` (speculative decoding keeps every draft position).
        num_accepted_tokens: `[N]`, with per-token indices only: sequence n starts from slot
            `state_indices[n, num_accepted_tokens[n] - 1]`, the state after the last draft
            token the previous step accepted (vLLM's speculative-decoding layout).
    Returns:
        o `[N, L, H, V]` in v's dtype.
    """
    N, L, H, K = q.shape
    scale = K**-0.5 if scale is None else scale
    out_dtype = v.dtype
    q, k, v, g, beta = (x.float() for x in (q, k, v, g, beta))
    if use_qk_l2norm:
        q, k = l2_normalize(q), l2_normalize(k)
    q = q * scale
    per_token_slots = state_indices.dim() == 2
    if num_accepted_tokens is not None:
        if not per_token_slots:
            raise ValueError("num_accepted_tokens needs per-token state_indices [N, L], "
                             f"got {tuple(state_indices.shape)}")
        rows = torch.arange(N, device=state_indices.device)
        read_slots = state_indices[rows, num_accepted_tokens.long() - 1]
    else:
        read_slots = state_indices[:, 0] if per_token_slots else state_indices
    S = state_pool[read_slots].float()  # [N, H, K, V]
    outputs = []
    for t in range(L):
        S = S * g[:, t].exp()[..., None, None]
        v_new = v[:, t] - torch.einsum("nhkv,nhk->nhv", S, k[:, t])
        S = S + torch.einsum("nhk,nhv->nhkv", k[:, t] * beta[:, t, :, None], v_new)
        outputs.append(torch.einsum("nhkv,nhk->nhv", S, q[:, t]))
        if per_token_slots:
            state_pool[state_indices[:, t]] = S.to(state_pool.dtype)
    if not per_token_slots:
        state_pool[state_indices] = S.to(state_pool.dtype)
    return torch.stack(outputs, dim=1).to(out_dtype)
