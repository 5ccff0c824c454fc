"""Dynamic causal convolution by its definition (unfold over the time axis)."""

import torch
import torch.nn.functional as F


def dynamic_causal_conv_naive(
    x: torch.Tensor,
    kernels: torch.Tensor,
    initial_state: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Args:
        x: `[B, T, D]` inputs; kernels: `[B, T, D, W]` per-token filters (tap W-1 is the
            current token); initial_state: `[B, W - 1, D]`, the inputs before the first
            token (None: zeros).
    Returns:
        out `[B, T, D]` (SiLU applied, x's dtype), final state `[B, W - 1, D]` (the last
        W - 1 inputs, x's dtype).
    """
    B, T, D = x.shape
    W = kernels.shape[-1]
    if initial_state is None:
        initial_state = x.new_zeros(B, W - 1, D)
    padded = torch.cat([initial_state.to(x.dtype), x], dim=1)  # [B, W - 1 + T, D]
    windows = padded.unfold(1, W, 1)  # [B, T, D, W]
    out = F.silu((windows.float() * kernels.float()).sum(-1))
    return out.to(x.dtype), padded[:, T:]
