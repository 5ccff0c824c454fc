"""The speculative-decoding step of the gated delta rule over packed sequences of different
lengths, on whichever fused-recurrent implementation the device runs (`cpu.py`'s or
`triton_fused_recurrent.py`'s, both taking N sequences of L tokens each).

vLLM packs the tokens of a speculative step back to back (`cu_seqlens`): per sequence the
last accepted token and its drafts, 1 to L tokens, L = the width of `state_indices`. They are
laid out as `[N, L]` (L from a shape, so no host sync); a position past a sequence's end has
g = 0 and beta = 0 and leaves the state as it is, so whatever slot it writes receives the
state after the last real token, and its output is dropped when the outputs are packed back.
"""

from collections.abc import Callable

import torch

from .gate import gated_delta_rule_gates


def varlen_spec_decode(
    recurrent: Callable[..., torch.Tensor],
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    A_log: torch.Tensor,
    dt_bias: torch.Tensor,
    cu_seqlens: torch.Tensor,
    state_pool: torch.Tensor,
    state_indices: torch.Tensor,
    num_accepted_tokens: torch.Tensor,
) -> torch.Tensor:
    """`kernels.dispatch.gated_delta_rule_spec_decode` (arguments and result there) by
    `recurrent`, a `fused_recurrent_gated_delta_rule` taking precomputed g, beta: the packed
    tokens `[T, ...]` are laid out as `[N, L, ...]`, run, and the outputs packed back."""
    T, H, K = q.shape
    N, L = state_indices.shape
    positions = torch.arange(L, device=q.device)
    rows = cu_seqlens[:N, None].long() + positions  # [N, L]
    real = rows < cu_seqlens[1: N + 1, None]
    src = torch.where(real, rows, 0)
    g, beta = gated_delta_rule_gates(a, b, A_log, dt_bias)  # float32 [T, H]
    # [T, ...] -> [N, L, ...]
    g, beta = (x[src].masked_fill_(~real[:, :, None], 0.0) for x in (g, beta))
    o = recurrent(q[src], k[src], v[src], g, beta, state_pool, state_indices,
                  num_accepted_tokens=num_accepted_tokens)
    out = torch.empty(T + 1, H, v.shape[-1], dtype=o.dtype, device=o.device)  # last row: sink for padding
    out.index_copy_(0, torch.where(real, rows, T).flatten(), o.flatten(0, 1))
    return out[:T]
