import torch
import torch.nn.functional as F


def gated_rmsnorm_naive(x: torch.Tensor, z: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x, z: `[..., V]`; weight: `[V]`. Computes in float32, returns x's dtype."""
    xf = x.float()
    normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return (normed * weight.float() * F.silu(z.float())).to(x.dtype)
