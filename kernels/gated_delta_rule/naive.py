"""The gated delta rule as its definition: one token at a time, float32."""

import torch
import torch.nn.functional as F


def l2_normalize(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """x / max(||x||, eps) over the last dim (the q/k normalisation of the JetBlock)."""
    return F.normalize(x, p=2.0, dim=-1, eps=eps)


def naive_recurrent_gated_delta_rule(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    scale: float | None = None,
    initial_state: torch.Tensor | None = None,
    output_final_state: bool = False,
    use_qk_l2norm: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Reference gated delta rule over padded batches (differentiable).

    Args:
        q, k: `[B, T, H, K]`; v: `[B, T, H, V]`.
        g: `[B, T, H]` log-decay (<= 0); beta: `[B, T, H]` write strength in (0, 1).
        scale: multiplies q; defaults to `K ** -0.5`.
        initial_state: `[B, H, K, V]` or None (zeros).
    Returns:
        o `[B, T, H, V]` in v's dtype, and the final state `[B, H, K, V]` (float32)
        when `output_final_state`.
    """
    B, T, H, K = q.shape
    V = v.shape[-1]
    scale = K**-0.5 if scale is None else scale
    out_dtype = v.dtype
    q, k, v, g, beta = (x.float() for x in (q, k, v, g, beta))
    if use_qk_l2norm:
        q, k = l2_normalize(q), l2_normalize(k)
    q = q * scale
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
