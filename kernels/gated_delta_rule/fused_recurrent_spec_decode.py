"""Recurrent gated delta rule for speculative decoding on the CPU (PyTorch): the
`fused_recurrent.fused_recurrent_gated_delta_rule` step with the initial state read from
the slot of each sequence's last accepted token, and its variant taking the raw gate
projections. These are the references of the Triton decode kernel's extra options."""

import torch
import torch.nn.functional as F

from .fused_recurrent import fused_recurrent_gated_delta_rule
from .naive import l2_normalize


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


def fused_recurrent_gated_delta_rule_spec_decode(
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
        q, k: `[N, L, H, K]`; v: `[N, L, H, V]`; g, beta: `[N, L, H]`.
        state_pool: `[num_slots, H, K, V]`, updated in place.
        state_indices: `[N]` or `[N, L]` as in `fused_recurrent_gated_delta_rule`.
        num_accepted_tokens: `[N]`, only with `[N, L]` indices: sequence n starts from
            `state_pool[state_indices[n, num_accepted_tokens[n] - 1]]` (vLLM's spec-decode
            layout); the state after token j is still written to `state_indices[n, j]`.
            None: exactly `fused_recurrent_gated_delta_rule`.
    Returns:
        o `[N, L, H, V]` in v's dtype.
    """
    if num_accepted_tokens is None:
        return fused_recurrent_gated_delta_rule(q, k, v, g, beta, state_pool, state_indices, scale, use_qk_l2norm)
    if state_indices.dim() != 2:
        raise ValueError("fused_recurrent_gated_delta_rule_spec_decode: num_accepted_tokens needs "
                         f"per-token state_indices [N, L], got {tuple(state_indices.shape)}")
    N, L, H, K = q.shape
    scale = K**-0.5 if scale is None else scale
    out_dtype = v.dtype
    q, k, v, g, beta = (x.float() for x in (q, k, v, g, beta))
    if use_qk_l2norm:
        q, k = l2_normalize(q), l2_normalize(k)
    q = q * scale
    rows = torch.arange(N, device=state_indices.device)
    read_slots = state_indices[rows, num_accepted_tokens.to(state_indices.device).long() - 1]
    S = state_pool[read_slots].float()  # [N, H, K, V]
    outputs = []
    for t in range(L):
        S = S * g[:, t].exp()[..., None, None]
        v_new = v[:, t] - torch.einsum("nhkv,nhk->nhv", S, k[:, t])
        S = S + torch.einsum("nhk,nhv->nhkv", k[:, t] * beta[:, t, :, None], v_new)
        outputs.append(torch.einsum("nhkv,nhk->nhv", S, q[:, t]))
        state_pool[state_indices[:, t]] = S.to(state_pool.dtype)
    return torch.stack(outputs, dim=1).to(out_dtype)


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
    """`fused_recurrent_gated_delta_rule_spec_decode` taking the raw gate projections
    a, b `[N, L, H]` and A_log, dt_bias `[H]` (see `gated_delta_rule_gates`)."""
    g, beta = gated_delta_rule_gates(a, b, A_log, dt_bias)
    return fused_recurrent_gated_delta_rule_spec_decode(
        q, k, v, g, beta, state_pool, state_indices, scale, use_qk_l2norm, num_accepted_tokens)
