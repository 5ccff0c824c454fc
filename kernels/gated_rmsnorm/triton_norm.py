"""Gated RMSNorm on the GPU (Triton), mirroring `naive.gated_rmsnorm_naive`:

    out = x * rsqrt(mean(x^2) + eps) * weight * silu(z)   (per row of V, float32 math)

One program per block of BR rows, each row whole in one tile (BV = next power of 2 >= V).
"""

import torch
import triton
import triton.language as tl


@triton.jit
def gated_rmsnorm_fwd_kernel(
    x,  # [R, V] contiguous
    z,  # [R, V] contiguous
    weight,  # [V]
    out,  # [R, V] contiguous
    R,
    eps,
    V: tl.constexpr,
    BR: tl.constexpr,
    BV: tl.constexpr,
):
    i_r = tl.program_id(0)
    o_r = (i_r * BR + tl.arange(0, BR)).to(tl.int64)
    o_v = tl.arange(0, BV)
    m_v = o_v < V
    m = (o_r < R)[:, None] & m_v[None, :]
    offsets = o_r[:, None] * V + o_v[None, :]  # [BR, BV]
    b_x = tl.load(x + offsets, mask=m, other=0.0).to(tl.float32)
    b_z = tl.load(z + offsets, mask=m, other=0.0).to(tl.float32)
    b_w = tl.load(weight + o_v, mask=m_v, other=0.0).to(tl.float32)
    b_rstd = 1.0 / tl.sqrt(tl.sum(b_x * b_x, axis=1) / V + eps)  # [BR]
    b_out = b_x * b_rstd[:, None] * b_w[None, :] * (b_z * tl.sigmoid(b_z))
    tl.store(out + offsets, b_out.to(out.dtype.element_ty), mask=m)


def gated_rmsnorm(x: torch.Tensor, z: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x, z: `[..., V]` (same shape); weight: `[V]`. Computes in float32, returns x's dtype."""
    V = x.shape[-1]
    if z.shape != x.shape or weight.shape != (V,):
        raise ValueError(f"gated_rmsnorm: expected x, z [..., V] of one shape and weight [V]; got "
                         f"x {tuple(x.shape)}, z {tuple(z.shape)}, weight {tuple(weight.shape)}")
    # [..., V] -> [R, V]
    x2, z2 = x.reshape(-1, V).contiguous(), z.reshape(-1, V).contiguous()
    R = x2.shape[0]
    out = torch.empty(R, V, dtype=x.dtype, device=x.device)
    if R > 0:
        BV = triton.next_power_of_2(V)
        BR = max(1, min(16, 4096 // BV))
        gated_rmsnorm_fwd_kernel[(triton.cdiv(R, BR),)](
            x2, z2, weight.contiguous(), out, R, float(eps), V=V, BR=BR, BV=BV)
    return out.view(x.shape)
