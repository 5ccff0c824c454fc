"""Recurrent gated delta rule for decode on the CPU: a few tokens per sequence, states
updated in place in the pool, batched over sequences.

Also the JetBlock's gating (`gated_delta_rule_gates`) and the decode step taking the raw
gate projections (`fused_recurrent_gated_delta_rule_from_gates`), the reference of the
Triton kernel's variant that computes the gates inside."""

import torch
import torch.nn.functional as F

from .naive import l2_normalize

# Bytes of float32 states updated together: a block of sequences whose states stay in the
# CPU's L2 cache between the steps of one token (gather, products, decay, write, scatter).
_BLOCK_BYTES = 3 << 19


def gated_delta_rule_gates(
    a: torch.Tensor,
    b: torch.Tensor,
    A_log: torch.Tensor,
    dt_bias: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """JetBlock gating: a, b `[..., H]` raw projections, A_log, dt_bias `[H]`.
    Returns g = -exp(A_log) * softplus(a + dt_bias) and beta = sigmoid(b), float32."""
    g = -A_log.float().exp() * F.softplus(a.float() + dt_bias.float())
    return g, b.float().sigmoid()


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
            j written to `[:, j]` (speculative decoding keeps every draft position). A
            negative slot (PAD_SLOT_ID) is neither read (zeros instead) nor written.
        num_accepted_tokens: `[N]`, with per-token indices only: sequence n starts from slot
            `state_indices[n, num_accepted_tokens[n] - 1]`, the state after the last draft
            token the previous step accepted (vLLM's speculative-decoding layout).
    Returns:
        o `[N, L, H, V]` in v's dtype.

    Per token, with d = exp(g) and the state S before it:
        u = beta (v - d S^T k),  o = d S^T q + (q.k) u,  S <- d S + k u^T
    (the definition's order of operations, regrouped so that S is read once for both
    products).
    """
    N, L, H, K = q.shape
    V = v.shape[-1]
    scale = K**-0.5 if scale is None else scale
    out_dtype = v.dtype
    q, k, v, g, beta = (x.float() for x in (q, k, v, g, beta))
    if use_qk_l2norm:
        q, k = l2_normalize(q), l2_normalize(k)
    q = q * scale
    per_token_slots = state_indices.dim() == 2
    state_indices = state_indices.to(device=q.device, dtype=torch.long)
    if num_accepted_tokens is not None:
        if not per_token_slots:
            raise ValueError("num_accepted_tokens needs per-token state_indices [N, L], "
                             f"got {tuple(state_indices.shape)}")
        rows = torch.arange(N, device=q.device)
        read_slots = state_indices[rows, num_accepted_tokens.to(q.device).long() - 1]
    else:
        read_slots = state_indices[:, 0] if per_token_slots else state_indices
    write_slots = state_indices if per_token_slots else state_indices[:, None]  # [N, 1 or >= L]

    decay = g.exp()  # [N, L, H]
    # [k; q] per token and head, the two vectors S is read against: [N, L, H, 2, K]
    kq = torch.stack([k, q], dim=-2)
    qk_dot = (q * k).sum(-1)  # [N, L, H]
    out = torch.empty(N, L, H, V, dtype=torch.float32, device=q.device)
    block = max(1, _BLOCK_BYTES // (4 * H * K * V))
    for n0 in range(0, N, block):
        n1 = min(n0 + block, N)
        BH = (n1 - n0) * H
        reads = read_slots[n0:n1]
        # [n, H, K, V] -> [n * H, K, V]; a padded sequence (negative slot) starts from zeros
        S = state_pool.index_select(0, reads.clamp_min(0)).float()
        S = torch.where((reads >= 0)[:, None, None, None], S, 0.0).view(BH, K, V)
        for t in range(L):
            d = decay[n0:n1, t].reshape(BH, 1)
            proj = torch.bmm(kq[n0:n1, t].reshape(BH, 2, K), S)  # [n * H, 2, V]: S^T k, S^T q
            u = (v[n0:n1, t].reshape(BH, V) - d * proj[:, 0]).mul_(beta[n0:n1, t].reshape(BH, 1))
            out[n0:n1, t] = (d * proj[:, 1] + qk_dot[n0:n1, t].reshape(BH, 1) * u).view(n1 - n0, H, V)
            S.mul_(d[:, :, None]).baddbmm_(k[n0:n1, t].reshape(BH, K, 1), u[:, None])
            if per_token_slots or t == L - 1:
                # [n * H, K, V] -> [n, H, K, V]
                column = t if per_token_slots else 0
                writes = write_slots[n0:n1, column]
                kept = (writes >= 0).nonzero()[:, 0]  # padded slots are not written
                state_pool.index_copy_(0, writes[kept], S.view(n1 - n0, H, K, V)[kept].to(state_pool.dtype))
    return out.to(out_dtype)


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
    scale: float | None = None,
    use_qk_l2norm: bool = True,
    num_accepted_tokens: torch.Tensor | None = None,
) -> torch.Tensor:
    """`fused_recurrent_gated_delta_rule` taking the raw gate projections a, b `[N, L, H]`
    and A_log, dt_bias `[H]` (see `gated_delta_rule_gates`)."""
    g, beta = gated_delta_rule_gates(a, b, A_log, dt_bias)
    return fused_recurrent_gated_delta_rule(
        q, k, v, g, beta, state_pool, state_indices, scale, use_qk_l2norm, num_accepted_tokens)
