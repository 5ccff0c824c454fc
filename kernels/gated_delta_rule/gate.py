"""The JetBlock's gates from its raw projections: log-decay g and write strength beta."""

import torch
import torch.nn.functional as F


def gated_delta_rule_gates(
    a: torch.Tensor,
    b: torch.Tensor,
    A_log: torch.Tensor,
    dt_bias: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """a, b `[..., H]` raw projections, A_log, dt_bias `[H]`.
    Returns g = -exp(A_log) * softplus(a + dt_bias) and beta = sigmoid(b), float32."""
    g = -A_log.float().exp() * F.softplus(a.float() + dt_bias.float())
    return g, b.float().sigmoid()
