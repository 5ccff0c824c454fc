"""Correctness checks of the JetBlock's Triton kernels, on any device.

Two oracles:

* the PyTorch definitions of `kernels/*/naive.py` (token-by-token gated delta rule,
  unfold conv, plain gated RMSNorm): the `*_vs_definition` checks, which
  tests/test_triton_kernels.py runs at its small shapes (CPU tensors under
  TRITON_INTERPRET=1) and bench/gpu_check.py on a chosen device at any shape;
* vLLM's bundled flash-linear-attention ops (`vllm_fla.load()`), an implementation of the
  same gated delta rule written by other people, called the way vLLM's own GDN layer
  calls them: states `[H, V, K]` (transposed from this project's `[H, K, V]`), the
  initial states of a prefill gathered from the pool and the final ones scattered back,
  decode and speculative steps updating the pool in place through `ssm_state_indices`.

Used by tests/test_triton_kernels.py and tests/test_triton_vs_vllm_fla.py (CPU tensors
under TRITON_INTERPRET=1, small shapes) and by bench/gpu_check.py (CUDA; the interpreter
grid plus the Jet-Nemotron 2B and 4B head shapes and long varlen batches). Every check
returns its figures (largest absolute error and that error relative to the largest
reference value, per compared tensor) and raises `CheckFailed` (an AssertionError)
naming what disagreed.

Conventions that differ between the implementations, and how the checks deal with them:

* Padded batch rows. This project marks them with a negative slot (vLLM's PAD_SLOT_ID,
  -1): not read (zero state), not written, output computed from the zero state. vLLM's
  FLA kernels skip every slot <= 0 (slot 0 is vLLM's null block, NULL_BLOCK_ID) and
  write no output for such rows. So a padded row is -1 on our side and 0 on vLLM's;
  real rows use slots >= 1; only real rows' outputs are compared, and every pool row
  that is not a real row's slot must come out bit-for-bit unchanged on both sides.
* q/k L2 norm. Ours: x / max(||x||, 1e-6) (`naive.l2_normalize`). vLLM's FLA:
  x / sqrt(||x||^2 + 1e-6). They differ by a factor sqrt(1 + 1e-6 / ||x||^2), i.e. by
  less than 1e-8 relative for the random inputs here (||x||^2 ~ K >= 16); so inputs are
  plain randn and the tolerances need no allowance for it. `l2norm_vs_fla` checks both
  conventions explicitly, including on tiny vectors, where they do differ.
* Precision. vLLM's chunked prefill keeps its intermediates (normalised q/k, the WY
  factors, the per-chunk states) in the input dtype and refuses float32 input; ours
  computes in float32 from the loaded values. So in 16-bit the comparison tolerance is a
  multiple of the dtype's resolution, and both are also measured against the float32
  definition: ours must not be worse than vLLM's by more than a factor of 2 (plus one
  rounding of the output). On the interpreter, float32 prefill goes through vLLM's
  autograd Function directly (the op computes float32 fine; only its wrapper refuses).
"""

from __future__ import annotations

import inspect
from contextlib import contextmanager

import torch
import torch.nn.functional as F


class CheckFailed(AssertionError):
    """A kernel's result differs from its oracle beyond the tolerance."""


# Resolution of each dtype: the unit of the tolerances below.
EPS = {torch.float32: 2.0**-23, torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7}

# Ours against the float32 definition on the same (already rounded) inputs: float32 is
# summation order only; 16-bit outputs are one rounding apart (the interpreter truncates
# float32 -> bf16 where PyTorch rounds to nearest, hence 2 ulp for bf16).
DEFINITION_TOL = {torch.float32: dict(atol=5e-5, rtol=5e-5), torch.float16: dict(atol=2e-3, rtol=2e-3),
                  torch.bfloat16: dict(atol=1e-2, rtol=1.6e-2)}
GRAD_TOL = {torch.float32: dict(atol=1e-4, rtol=1e-4), torch.float16: dict(atol=4e-3, rtol=4e-3),
            torch.bfloat16: dict(atol=2e-2, rtol=2e-2)}


# ----- comparing ------------------------------------------------------------------------------


def compare(what: str, actual: torch.Tensor, expected: torch.Tensor, atol: float, rtol: float,
            relative_atol: bool = False) -> dict:
    """Elementwise |actual - expected| <= atol + rtol |expected| (with `relative_atol`,
    atol is a fraction of the largest |expected|). Returns the figures; raises CheckFailed."""
    a, e = actual.detach().float(), expected.detach().float()
    if a.shape != e.shape:
        raise CheckFailed(f"{what}: shape {tuple(a.shape)}, expected {tuple(e.shape)}")
    if a.numel() == 0:
        return {"max_abs_err": 0.0, "max_rel_err": 0.0}
    if not torch.isfinite(a).all():
        raise CheckFailed(f"{what}: {int((~torch.isfinite(a)).sum())} non-finite values")
    if not torch.isfinite(e).all():
        raise CheckFailed(f"{what}: {int((~torch.isfinite(e)).sum())} non-finite values in the reference")
    diff = (a - e).abs()
    max_abs = float(diff.max())
    scale = float(e.abs().max())
    bound = (atol * scale if relative_atol else atol) + rtol * e.abs()
    bad = diff > bound
    if bad.any():
        first = tuple(bad.nonzero()[0].tolist())
        atol_text = f"{atol} x max|ref|" if relative_atol else f"{atol}"
        raise CheckFailed(
            f"{what}: {int(bad.sum())} of {bad.numel()} values off (atol {atol_text}, "
            f"rtol {rtol}); largest error {max_abs:.3g} (largest |reference| {scale:.3g}); first at {first}: "
            f"{float(a[first]):.6g} vs {float(e[first]):.6g}")
    return {"max_abs_err": max_abs, "max_rel_err": max_abs / scale if scale else 0.0}


def unchanged(what: str, actual: torch.Tensor, before: torch.Tensor) -> None:
    if not torch.equal(actual, before):
        rows = sorted({int(i) for i in (actual != before).nonzero()[:, 0].tolist()})
        raise CheckFailed(f"{what}: rows {rows[:8]} changed")


def dtype_and_shape(what: str, actual: torch.Tensor, dtype, shape) -> None:
    if actual.dtype != dtype or actual.shape != shape:
        raise CheckFailed(f"{what}: {actual.dtype} {tuple(actual.shape)}, expected {dtype} {tuple(shape)}")


class Figures(dict):
    """name -> {max_abs_err, max_rel_err}, keeping the largest over repeated names."""

    def add(self, name: str, fig: dict) -> dict:
        old = self.get(name)
        self[name] = fig if old is None else {k: max(old[k], fig[k]) for k in fig}
        return fig


# ----- inputs ---------------------------------------------------------------------------------


def generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def gdn_inputs(shape: tuple, H: int, K: int, V: int, dtype, gen, device):
    """q, k `[*shape, H, K]`, v `[*shape, H, V]` in dtype; g (log-decay, as the JetBlock's
    -exp(A_log) softplus(.) lands: mostly -0.1 .. -1), beta `[*shape, H]` float32."""
    q = torch.randn(*shape, H, K, generator=gen).to(dtype)
    k = torch.randn(*shape, H, K, generator=gen).to(dtype)
    v = torch.randn(*shape, H, V, generator=gen).to(dtype)
    g = F.logsigmoid(torch.randn(*shape, H, generator=gen) + 1.0)
    beta = torch.rand(*shape, H, generator=gen)
    return tuple(x.to(device) for x in (q, k, v, g, beta))


def gate_inputs(shape: tuple, H: int, dtype, gen, device):
    """Raw gate projections a, b `[*shape, H]` (a reaches softplus' linear range) and the
    parameters A_log, dt_bias `[H]` float32."""
    a = (4 * torch.randn(*shape, H, generator=gen)).to(dtype)
    b = torch.randn(*shape, H, generator=gen).to(dtype)
    A_log = torch.empty(H).uniform_(1, 16, generator=gen).log()
    dt_bias = torch.randn(H, generator=gen)
    return tuple(x.to(device) for x in (a, b, A_log, dt_bias))


def random_pool(num_slots: int, H: int, K: int, V: int, gen, device, dtype=torch.float32,
                strided: bool = False) -> torch.Tensor:
    """`[num_slots, H, K, V]` states; `strided`: a transposed view of a `[.., V, K]` buffer."""
    if strided:
        return random_pool(num_slots, H, V, K, gen, device, dtype).transpose(-1, -2)
    return (0.5 * torch.randn(num_slots, H, K, V, generator=gen)).to(dtype).to(device)


def cu_seqlens(lengths, device) -> torch.Tensor:
    return torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32, device=device)


def naive_sequence(q, k, v, g, beta, h0=None, **kwargs):
    """Definition on one packed sequence `[T, ...]` -> (o `[T, H, V]`, state `[H, K, V]`)."""
    from vllm_jetnemotron.kernels.gated_delta_rule.naive import naive_recurrent_gated_delta_rule

    o, s = naive_recurrent_gated_delta_rule(q[None], k[None], v[None], g[None], beta[None],
                                            initial_state=None if h0 is None else h0[None],
                                            output_final_state=True, **kwargs)
    return o[0], s[0]


def naive_per_token(q, k, v, g, beta, h0):
    """Definition over `[N, L, ...]` from states h0 `[N, H, K, V]`: o `[N, L, H, V]` and the
    state after every token `[N, L, H, K, V]` (float32)."""
    from vllm_jetnemotron.kernels.gated_delta_rule.naive import naive_recurrent_gated_delta_rule

    states, o = [], []
    S = h0
    for j in range(q.shape[1]):
        o_j, S = naive_recurrent_gated_delta_rule(q[:, j:j + 1], k[:, j:j + 1], v[:, j:j + 1], g[:, j:j + 1],
                                                  beta[:, j:j + 1], initial_state=S, output_final_state=True)
        o.append(o_j)
        states.append(S)
    return torch.cat(o, dim=1), torch.stack(states, dim=1)


# ----- vLLM's FLA ops, called as vLLM's GDN layer calls them -------------------------------------


def fla_chunk(fla, q, k, v, g, beta, initial_state, cu, scale=None):
    """vLLM's chunked prefill on packed `[1, T, ...]` inputs with initial states
    `[N, H, V, K]`; returns (o `[1, T, H, V]`, final states `[N, H, V, K]` float32)."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    if q.dtype != torch.float32:
        return fla.chunk.chunk_gated_delta_rule(q, k, v, g, beta, scale=scale, initial_state=initial_state,
                                                output_final_state=True, cu_seqlens=cu,
                                                use_qk_l2norm_in_kernel=True)
    # float32: the public wrapper refuses it (shared memory on GPUs); the op computes it
    fn = fla.chunk.ChunkGatedDeltaRuleFunction
    values = dict(q=q, k=k, v=v, g=g, beta=beta, scale=scale, initial_state=initial_state, output_final_state=True,
                  cu_seqlens=cu, use_qk_l2norm_in_kernel=True)
    params = list(inspect.signature(fn.forward).parameters.values())[1:]  # without ctx
    args = [values[p.name] if p.name in values else (None if p.default is inspect.Parameter.empty else p.default)
            for p in params]
    return fn.apply(*args)


def to_fla_layout(pool: torch.Tensor) -> torch.Tensor:
    """`[S, H, K, V]` -> contiguous `[S, H, V, K]` (vLLM's GDN state layout)."""
    return pool.transpose(-1, -2).contiguous()


def from_fla_layout(pool: torch.Tensor) -> torch.Tensor:
    return pool.transpose(-1, -2)


# ----- our kernels against the definitions -------------------------------------------------------


def _chunking(chunk_size):
    return {} if chunk_size is None else {"chunk_size": chunk_size}


def chunk_vs_definition(device, H, K, V, lengths, dtype, slots, has_state, num_slots, chunk_size=None,
                        strided_pool=False, pool_dtype=torch.float32, seed=0, tol_scale=1.0) -> dict:
    """Varlen Triton prefill reading/writing a pool, per sequence against the token loop.
    `strided_pool`: a transposed view of a `[.., V, K]` buffer; `pool_dtype`: the states'."""
    from vllm_jetnemotron.kernels.gated_delta_rule import triton_chunk

    gen = generator(seed)
    cu = cu_seqlens(lengths, device)
    q, k, v, g, beta = gdn_inputs((sum(lengths),), H, K, V, dtype, gen, device)
    pool = random_pool(num_slots, H, K, V, gen, device, pool_dtype, strided=strided_pool)
    before = pool.clone()
    o = triton_chunk.chunk_gated_delta_rule(q, k, v, g, beta, cu, pool,
                                            torch.tensor(slots, dtype=torch.int32, device=device),
                                            torch.tensor(has_state, device=device), **_chunking(chunk_size))
    dtype_and_shape("o", o, v.dtype, v.shape)
    tol = {name: value * tol_scale for name, value in DEFINITION_TOL[dtype].items()}
    figures = Figures()
    for i, slot in enumerate(slots):
        s, e = int(cu[i]), int(cu[i + 1])
        h0 = before[slot] if has_state[i] and slot >= 0 else None
        o_ref, state_ref = naive_sequence(q[s:e], k[s:e], v[s:e], g[s:e], beta[s:e], h0)
        figures.add("o", compare(f"o of sequence {i} (length {e - s})", o[s:e], o_ref, **tol))
        if slot >= 0:
            figures.add("state", compare(f"final state of sequence {i} (length {e - s})", pool[slot], state_ref,
                                         **tol))
    others = [j for j in range(num_slots) if j not in {s for s in slots if s >= 0}]
    unchanged("pool rows of no sequence (or of padded ones)", pool[others], before[others])
    return dict(figures)


def recurrent_vs_definition(device, N, L, H, K, V, dtype, spec=False, gates=False, pad=True, slots=None,
                            num_slots=None, zero_slots=(), num_accepted="random", pool_dtype=torch.float32,
                            strided_pool=False, implementation="triton", seed=0) -> dict:
    """Decode steps of L tokens per sequence (one slot each, the final state written) or
    speculative ones (`spec`: per-token slots `[N, L]`), optionally from the raw gates,
    states in a pool, against the token loop.

    `slots`: explicit slots (`[N]`, `[N, L]` with `spec`; a row of negative slots is a
    padded one) in a pool of `num_slots` (default N * width + 3) instead of random ones
    with row N // 2 padded (`pad`); `zero_slots`: pool rows zeroed first (sequences
    starting from no state); `num_accepted` (with `spec`): "random" (1 to L per
    sequence), a list, or None (no num_accepted_tokens: every sequence reads its first
    slot); `strided_pool`: a transposed view of a `[.., V, K]` buffer; `pool_dtype`: the
    states'; `implementation`: "triton" or "cpu" (kernels/gated_delta_rule/cpu.py, the
    PyTorch route)."""
    if implementation == "triton":
        from vllm_jetnemotron.kernels.gated_delta_rule import triton_fused_recurrent as tr
    elif implementation == "cpu":
        from vllm_jetnemotron.kernels.gated_delta_rule import cpu as tr
    else:
        raise ValueError(f"implementation: 'triton' or 'cpu', not {implementation!r}")
    from vllm_jetnemotron.kernels.gated_delta_rule.gate import gated_delta_rule_gates

    gen = generator(seed)
    q, k, v, g, beta = gdn_inputs((N, L), H, K, V, dtype, gen, device)
    if gates:
        a, b, A_log, dt_bias = gate_inputs((N, L), H, dtype, gen, device)
        g, beta = gated_delta_rule_gates(a, b, A_log, dt_bias)
    width = L if spec else 1
    if num_slots is None:
        num_slots = N * width + 3
    pool = random_pool(num_slots, H, K, V, gen, device, pool_dtype, strided=strided_pool)
    for slot in zero_slots:
        pool[slot].zero_()
    before = pool.clone()
    if slots is None:
        slots = (torch.randperm(num_slots - 1, generator=gen)[:N * width] + 1).view(N, width).to(device)
        padded = [N // 2] if pad and N > 1 else []
        slots[padded] = -1
    else:
        if max(torch.tensor(slots).flatten().tolist()) >= num_slots:
            raise ValueError(f"slots {slots}: num_slots {num_slots} is not above the largest")
        slots = torch.tensor(slots, device=device).view(N, width)
        padded = [n for n in range(N) if int(slots[n].max()) < 0]
    accepted = None
    if spec:
        if num_accepted == "random":
            accepted = torch.randint(1, L + 1, (N,), generator=gen).to(device)
        elif num_accepted is not None:
            accepted = torch.tensor(num_accepted, device=device)
        read = slots[:, 0] if accepted is None else slots[torch.arange(N, device=device), accepted - 1]
    else:
        slots, read = slots[:, 0], slots[:, 0]
    h0 = torch.where((read >= 0)[:, None, None, None], before[read.clamp(min=0)], torch.zeros_like(before[:1]))
    o_ref, states_ref = naive_per_token(q, k, v, g, beta, h0)
    if gates:
        o = tr.fused_recurrent_gated_delta_rule_from_gates(q, k, v, a, b, A_log, dt_bias, pool, slots,
                                                           num_accepted_tokens=accepted)
    else:
        o = tr.fused_recurrent_gated_delta_rule(q, k, v, g, beta, pool, slots, num_accepted_tokens=accepted)
    tol = DEFINITION_TOL[dtype]
    figures = Figures()
    figures.add("o", compare("o", o, o_ref, **tol))
    real = [n for n in range(N) if n not in padded]
    if spec:
        figures.add("state", compare("per-token states", pool[slots[real]], states_ref[real], **tol))
        written = slots[real].flatten().tolist()
    else:
        figures.add("state", compare("final states", pool[slots[real]], states_ref[real, -1], **tol))
        written = slots[real].tolist()
    others = [j for j in range(num_slots) if j not in written]
    unchanged("pool rows of no sequence (or of padded ones)", pool[others], before[others])
    return dict(figures)


def conv_vs_definition(device, D, W, lengths, dtype, slots, has_state, num_slots, seed=0) -> dict:
    from vllm_jetnemotron.kernels.dynamic_conv import triton_conv
    from vllm_jetnemotron.kernels.dynamic_conv.naive import dynamic_causal_conv_naive

    gen = generator(seed)
    cu = cu_seqlens(lengths, device)
    T = sum(lengths)
    x = torch.randn(T, 2 * D, generator=gen).to(dtype).to(device)[:, :D]  # strided rows, as a projection split
    kernels = torch.randn(T, D, W, generator=gen).to(dtype).to(device)
    # [num_slots, W - 1, D] time-first view of a dim-first cache
    pool = torch.randn(num_slots, D, W - 1, generator=gen).to(dtype).to(device).transpose(1, 2)
    before = pool.clone()
    out = triton_conv.dynamic_causal_conv(x, kernels, cu, pool, torch.tensor(slots, dtype=torch.int32, device=device),
                                          torch.tensor(has_state, device=device))
    dtype_and_shape("out", out, dtype, x.shape)
    figures = Figures()
    for i, slot in enumerate(slots):
        s, e = int(cu[i]), int(cu[i + 1])
        h0 = before[slot][None] if has_state[i] and slot >= 0 else None
        out_ref, state_ref = dynamic_causal_conv_naive(x[None, s:e], kernels[None, s:e], h0)
        figures.add("out", compare(f"out of sequence {i}", out[s:e], out_ref[0], **DEFINITION_TOL[dtype]))
        if slot >= 0:
            figures.add("state", compare(f"state of sequence {i}", pool[slot], state_ref[0], **DEFINITION_TOL[dtype]))
    others = [j for j in range(num_slots) if j not in {s for s in slots if s >= 0}]
    unchanged("conv pool rows of no sequence", pool[others], before[others])
    return dict(figures)


def conv_step_vs_definition(device, N, D, W, steps, dtype, seed=0) -> dict:
    from vllm_jetnemotron.kernels.dynamic_conv import triton_conv
    from vllm_jetnemotron.kernels.dynamic_conv.naive import dynamic_causal_conv_naive

    gen = generator(seed)
    num_slots = N + 3
    pool = torch.randn(num_slots, D, W - 1, generator=gen).to(dtype).to(device).transpose(1, 2)
    slots = (torch.randperm(num_slots, generator=gen)[:N]).to(device)
    x = torch.randn(N, steps, D, generator=gen).to(dtype).to(device)
    kernels = torch.randn(N, steps, D, W, generator=gen).to(dtype).to(device)
    out_ref, state_ref = dynamic_causal_conv_naive(x, kernels, pool[slots].clone())
    before = pool.clone()
    figures = Figures()
    for t in range(steps):
        out = triton_conv.dynamic_causal_conv_step(x[:, t], kernels[:, t], pool, slots)
        figures.add("out", compare(f"out of step {t}", out, out_ref[:, t], **DEFINITION_TOL[dtype]))
    figures.add("state", compare("states after the steps", pool[slots], state_ref, **DEFINITION_TOL[dtype]))
    others = [j for j in range(num_slots) if j not in slots.tolist()]
    unchanged("conv pool rows of no sequence", pool[others], before[others])
    return dict(figures)


def conv_spec_vs_definition(device, lengths, num_spec, D, W, dtype, pad=True, accepted=None, seed=0) -> dict:
    """Triton speculative-decoding conv step: each sequence (at most 1 + num_spec tokens)
    reads its W - 1 history rows from its buffer `[W - 1 + num_spec, D]` at row
    num_accepted - 1 and leaves row j = the W - 1 inputs ending at its token j (the rows
    after them unchanged). `accepted`: num_accepted per sequence (default: random, 1 to
    1 + num_spec). Slots and counts are int32, as vLLM passes them."""
    from vllm_jetnemotron.kernels.dynamic_conv import triton_conv
    from vllm_jetnemotron.kernels.dynamic_conv.naive import dynamic_causal_conv_naive

    gen = generator(seed)
    N = len(lengths)
    cu = cu_seqlens(lengths, device)
    T = sum(lengths)
    x = torch.randn(T, D, generator=gen).to(dtype).to(device)
    kernels = torch.randn(T, D, W, generator=gen).to(dtype).to(device)
    num_slots = N + 2
    pool = torch.randn(num_slots, W - 1 + num_spec, D, generator=gen).to(dtype).to(device)
    before = pool.clone()
    slots = (torch.randperm(num_slots, generator=gen)[:N]).to(torch.int32).to(device)
    padded = [N // 2] if pad and N > 1 else []
    slots[padded] = -1
    if accepted is None:
        accepted = torch.randint(1, num_spec + 2, (N,), generator=gen)
    accepted = torch.as_tensor(accepted).to(torch.int32).to(device)
    out = triton_conv.dynamic_causal_conv_spec_decode(x, kernels, cu, pool, slots, accepted)
    figures = Figures()
    for i in range(N):
        s, e, slot, a = int(cu[i]), int(cu[i + 1]), int(slots[i]), int(accepted[i])
        history = before[slot, a - 1:a - 1 + W - 1] if slot >= 0 else torch.zeros(W - 1, D, dtype=dtype,
                                                                                   device=device)
        out_ref, _ = dynamic_causal_conv_naive(x[None, s:e], kernels[None, s:e], history[None])
        figures.add("out", compare(f"out of sequence {i} (length {e - s}, accepted {a})", out[s:e], out_ref[0],
                                   **DEFINITION_TOL[dtype]))
        if slot >= 0:
            rows = torch.cat([history.to(dtype), x[s:e]])[1:]  # row j: the W - 1 inputs ending at token j
            expected = torch.cat([rows, before[slot, rows.shape[0]:]])
            figures.add("buffer", compare(f"history buffer of sequence {i}", pool[slot], expected, atol=0.0,
                                          rtol=0.0))
    others = [j for j in range(num_slots) if j not in slots.tolist()]
    unchanged("conv buffers of no sequence", pool[others], before[others])
    return dict(figures)


def rmsnorm_vs_definition(device, rows, H, V, dtype, eps=1e-5, seed=0) -> dict:
    from vllm_jetnemotron.kernels.gated_rmsnorm import triton_norm
    from vllm_jetnemotron.kernels.gated_rmsnorm.naive import gated_rmsnorm_naive

    gen = generator(seed)
    x = torch.randn(rows, H, V, generator=gen).to(dtype).to(device)
    z = torch.randn(rows, H, 2 * V, generator=gen).to(dtype).to(device)[..., :V]  # strided, as a split
    weight = torch.randn(V, generator=gen).to(dtype).to(device)
    out = triton_norm.gated_rmsnorm(x, z, weight, eps)
    dtype_and_shape("gated rmsnorm", out, dtype, x.shape)
    return {"out": compare("gated rmsnorm", out, gated_rmsnorm_naive(x, z, weight, eps), **DEFINITION_TOL[dtype])}


def _grads(fn, leaves, grad_outputs):
    for x in leaves:
        x.grad = None
    outputs = fn()
    torch.autograd.backward(outputs, grad_outputs)
    return outputs, [x.grad.clone() for x in leaves]


def _batch(B, T, lengths, device):
    """cu_seqlens (None for B separate sequences) and the number of sequences."""
    if lengths is None:
        return None, B
    if B != 1 or T != sum(lengths):
        raise ValueError(f"packed sequences {lengths}: B = 1 and T = {sum(lengths)}, not B = {B}, T = {T}")
    return cu_seqlens(lengths, device), len(lengths)


def _per_sequence(fn, cu, tensors, h0):
    """fn over each packed sequence of `tensors` `[1, T, ...]` (h0: one row per sequence),
    outputs concatenated along the tokens and the final states along the sequences."""
    outs = [fn(*(t[:, s:e] for t in tensors), None if h0 is None else h0[i:i + 1])
            for i, (s, e) in enumerate(zip(cu[:-1].tolist(), cu[1:].tolist()))]
    return torch.cat([o for o, _ in outs], dim=1), torch.cat([state for _, state in outs])


def chunk_autograd_vs_definition(device, B, T, H, K, V, dtype, with_initial_state=True, lengths=None,
                                 seed=0) -> dict:
    """Training: Triton forward + PyTorch backward against autograd through the token loop.
    `lengths`: B = 1 and T = sum(lengths) tokens of packed sequences (cu_seqlens), each
    with its own initial state."""
    from vllm_jetnemotron.kernels.gated_delta_rule.naive import naive_recurrent_gated_delta_rule
    from vllm_jetnemotron.kernels.gated_delta_rule.triton_chunk_autograd import chunk_gated_delta_rule_autograd

    cu, N = _batch(B, T, lengths, device)
    gen = generator(seed)
    q, k, v, g, beta = gdn_inputs((B, T), H, K, V, dtype, gen, device)
    h0 = (0.5 * torch.randn(N, H, K, V, generator=gen)).to(device) if with_initial_state else None
    leaves = [x.requires_grad_() for x in (q, k, v, g, beta) + ((h0,) if with_initial_state else ())]
    do = torch.randn(B, T, H, V, generator=gen).to(dtype).to(device)
    dht = torch.randn(N, H, K, V, generator=gen).to(device)

    def naive(q, k, v, g, beta, h0):
        return naive_recurrent_gated_delta_rule(q, k, v, g, beta, initial_state=h0, output_final_state=True)

    (o, ht), grads = _grads(lambda: chunk_gated_delta_rule_autograd(q, k, v, g, beta, h0, cu_seqlens=cu), leaves,
                            [do, dht])
    (o_ref, ht_ref), grads_ref = _grads(
        lambda: naive(q, k, v, g, beta, h0) if cu is None else _per_sequence(naive, cu, (q, k, v, g, beta), h0),
        leaves, [do, dht])
    figures = {"o": compare("o", o, o_ref, **DEFINITION_TOL[dtype]),
               "state": compare("final state", ht, ht_ref, **DEFINITION_TOL[dtype])}
    for name, gr, gr_ref in zip(["dq", "dk", "dv", "dg", "dbeta", "dh0"], grads, grads_ref):
        figures[name] = compare(name, gr, gr_ref, **GRAD_TOL[dtype])
    return figures


def conv_autograd_vs_definition(device, B, T, D, W, dtype, with_initial_state=True, lengths=None, seed=0) -> dict:
    """Training: Triton forward and backward against autograd through the unfold conv.
    `lengths`: B = 1 and T = sum(lengths) tokens of packed sequences (cu_seqlens), each
    with its own initial state."""
    from vllm_jetnemotron.kernels.dynamic_conv.naive import dynamic_causal_conv_naive
    from vllm_jetnemotron.kernels.dynamic_conv.triton_conv_autograd import dynamic_causal_conv_autograd

    cu, N = _batch(B, T, lengths, device)
    gen = generator(seed)
    x = torch.randn(B, T, D, generator=gen).to(dtype).to(device)
    kernels = torch.randn(B, T, D, W, generator=gen).to(dtype).to(device)
    h0 = torch.randn(N, W - 1, D, generator=gen).to(dtype).to(device) if with_initial_state else None
    leaves = [t.requires_grad_() for t in (x, kernels) + ((h0,) if with_initial_state else ())]
    dout = torch.randn(B, T, D, generator=gen).to(dtype).to(device)
    dfinal = torch.randn(N, W - 1, D, generator=gen).to(dtype).to(device)
    (out, final), grads = _grads(lambda: dynamic_causal_conv_autograd(x, kernels, h0, cu_seqlens=cu), leaves,
                                 [dout, dfinal])
    (out_ref, final_ref), grads_ref = _grads(
        lambda: (dynamic_causal_conv_naive(x, kernels, h0) if cu is None
                 else _per_sequence(dynamic_causal_conv_naive, cu, (x, kernels), h0)),
        leaves, [dout, dfinal])
    figures = {"out": compare("out", out, out_ref, **DEFINITION_TOL[dtype]),
               "state": compare("final state", final, final_ref, atol=0.0, rtol=0.0)}
    for name, gr, gr_ref in zip(["dx", "dkernels", "dh0"], grads, grads_ref):
        figures[name] = compare(name, gr, gr_ref, **GRAD_TOL[dtype])
    return figures


# ----- our kernels against vLLM's FLA ---------------------------------------------------------------


def chunk_vs_fla(fla, device, H, K, V, lengths, dtype, slots, has_state, num_slots, chunk_size=None, seed=0) -> dict:
    """Varlen prefill with initial states from a pool (some sequences without one, a
    negative slot = padded sequence): ours on the pool, vLLM's on the gathered states
    (zeros where a sequence has none), as vLLM's GDN layer runs it. Compares outputs and
    final states with each other, and both with the float32 definition."""
    from vllm_jetnemotron.kernels.gated_delta_rule import triton_chunk

    gen = generator(seed)
    cu = cu_seqlens(lengths, device)
    q, k, v, g, beta = gdn_inputs((sum(lengths),), H, K, V, dtype, gen, device)
    pool = random_pool(num_slots, H, K, V, gen, device)
    before = pool.clone()
    o = triton_chunk.chunk_gated_delta_rule(q, k, v, g, beta, cu, pool,
                                            torch.tensor(slots, dtype=torch.int32, device=device),
                                            torch.tensor(has_state, device=device), **_chunking(chunk_size))
    reads = [h and s >= 0 for s, h in zip(slots, has_state)]
    h0 = torch.stack([before[s] if r else torch.zeros_like(before[0]) for s, r in zip(slots, reads)])
    o_fla, ht_fla = fla_chunk(fla, q[None], k[None], v[None], g[None], beta[None], to_fla_layout(h0), cu)
    o_fla, ht_fla = o_fla[0], from_fla_layout(ht_fla)
    if dtype == torch.float32:
        tol = dict(atol=5e-5, rtol=5e-5, relative_atol=False)
    else:  # vLLM rounds its intermediates to the input dtype: a few of its ulps
        tol = dict(atol=8 * EPS[dtype], rtol=8 * EPS[dtype], relative_atol=True)
    figures = Figures()
    # largest |error| against the float32 definition, ours and vLLM's, and largest |reference|
    vs_definition = {name: [0.0, 0.0, 0.0] for name in ("o", "state")}
    for i, slot in enumerate(slots):
        s, e = int(cu[i]), int(cu[i + 1])
        what = f"sequence {i} (length {e - s}, slot {slot}, {'with' if reads[i] else 'without'} initial state)"
        figures.add("o vs vllm", compare(f"o of {what} vs vLLM", o[s:e], o_fla[s:e], **tol))
        if slot >= 0:
            figures.add("state vs vllm", compare(f"final state of {what} vs vLLM", pool[slot], ht_fla[i], **tol))
        o_ref, state_ref = naive_sequence(q[s:e], k[s:e], v[s:e], g[s:e], beta[s:e], h0[i] if reads[i] else None)
        pairs = {"o": (o[s:e], o_fla[s:e], o_ref)}
        if slot >= 0:
            pairs["state"] = (pool[slot], ht_fla[i], state_ref)
        for name, (mine, theirs, ref) in pairs.items():
            errors = vs_definition[name]
            errors[0] = max(errors[0], float((mine.float() - ref).abs().max()))
            errors[1] = max(errors[1], float((theirs.float() - ref).abs().max()))
            errors[2] = max(errors[2], float(ref.abs().max()))
    others = [j for j in range(num_slots) if j not in {s for s in slots if s >= 0}]
    unchanged("pool rows of no sequence (or of the padded one)", pool[others], before[others])
    for name, (err_ours, err_fla, scale) in vs_definition.items():
        figures[f"{name} vs definition"] = {"ours_max_abs_err": err_ours, "vllm_max_abs_err": err_fla,
                                            "max_abs_ref": scale}
        if err_ours > 2 * err_fla + 2 * EPS[dtype] * scale:
            raise CheckFailed(f"{name}: ours is {err_ours:.3g} from the float32 definition, vLLM's {err_fla:.3g} "
                              f"(allowed: twice vLLM's plus 2 ulp of {dtype})")
    return dict(figures)


def recurrent_vs_fla(fla, device, N, L, H, K, V, dtype, spec=False, gates=False, pad=True, pool_dtype=torch.float32,
                     seed=0) -> dict:
    """Decode (L = 1), several tokens per sequence (L > 1, one slot each) or speculative
    decoding (`spec`: per-token slots `[N, L]` and num_accepted_tokens); from g/beta
    (vLLM's `fused_recurrent_gated_delta_rule`) or from the raw gates (`gates`: vLLM's
    `fused_sigmoid_gating_delta_rule_update` against our `..._from_gates`). vLLM's ops get
    packed tokens `[1, N * L, ...]` with cu_seqlens and update the `[H, V, K]` pool in
    place (except L > 1 without `spec`: per-token final states, since vLLM writes a state
    after every token to the slot list). After the step the two pools must agree
    everywhere (rows of no real sequence unchanged on both sides). `pool_dtype`: the
    states' dtype (vLLM keeps them in the model dtype unless told float32)."""
    from vllm_jetnemotron.kernels.gated_delta_rule import triton_fused_recurrent as tr
    from vllm_jetnemotron.kernels.gated_delta_rule.gate import gated_delta_rule_gates

    gen = generator(seed)
    q, k, v, g, beta = gdn_inputs((N, L), H, K, V, dtype, gen, device)
    if gates:
        a, b, A_log, dt_bias = gate_inputs((N, L), H, dtype, gen, device)
        g, beta = gated_delta_rule_gates(a, b, A_log, dt_bias)
    width = L if spec else 1
    num_slots = N * width + 3
    pool = random_pool(num_slots, H, K, V, gen, device, pool_dtype)
    before = pool.clone()
    # real rows get slots >= 1; a padded row is -1 here and vLLM's null block 0 there
    slots = (torch.randperm(num_slots - 1, generator=gen)[:N * width] + 1).view(N, width).to(device)
    padded = [N // 2] if pad and N > 1 else []
    real = [n for n in range(N) if n not in padded]
    slots_fla = slots.clone()
    slots[padded], slots_fla[padded] = -1, 0
    accepted = torch.randint(1, L + 1, (N,), generator=gen).to(device) if spec else None
    if not spec:
        slots, slots_fla = slots[:, 0].contiguous(), slots_fla[:, 0].contiguous()

    if gates:
        o = tr.fused_recurrent_gated_delta_rule_from_gates(q, k, v, a, b, A_log, dt_bias, pool, slots,
                                                           num_accepted_tokens=accepted)
    else:
        o = tr.fused_recurrent_gated_delta_rule(q, k, v, g, beta, pool, slots, num_accepted_tokens=accepted)

    pool_fla = to_fla_layout(before)
    pool_fla_before = pool_fla.clone()
    inplace = spec or L == 1
    cu = (torch.arange(N + 1, dtype=torch.int32) * L).to(device)

    def packed(x):  # [N, L, ...] -> [1, N * L, ...]
        return x.reshape(1, N * L, *x.shape[2:]).contiguous()

    common = dict(initial_state=pool_fla, inplace_final_state=inplace, cu_seqlens=cu, ssm_state_indices=slots_fla,
                  num_accepted_tokens=accepted, use_qk_l2norm_in_kernel=True, scale=K**-0.5)
    if gates:
        o_fla, ht_fla = fla.fused_sigmoid_gating.fused_sigmoid_gating_delta_rule_update(
            A_log, a.reshape(N * L, H).contiguous(), b.reshape(N * L, H).contiguous(), dt_bias,
            packed(q), packed(k), packed(v), beta=1.0, threshold=20.0, **common)
    else:
        o_fla, ht_fla = fla.fused_recurrent.fused_recurrent_gated_delta_rule(
            packed(q), packed(k), packed(v), packed(g), packed(beta), **common)
    o_fla = o_fla.view(N, L, H, V)

    tol = dict(atol=4 * EPS[dtype] if dtype != torch.float32 else 1e-5, rtol=4 * EPS[dtype] if dtype != torch.float32
               else 1e-5, relative_atol=True)
    # states stored in 16 bits: the same float32 value rounded on both sides, at most an ulp apart
    state_tol = tol if pool_dtype == torch.float32 else dict(atol=2 * EPS[pool_dtype], rtol=2 * EPS[pool_dtype],
                                                               relative_atol=True)
    figures = Figures()
    figures.add("o vs vllm", compare("o of the real rows vs vLLM", o[real], o_fla[real], **tol))
    if inplace:
        figures.add("pool vs vllm", compare("the whole state pool after the step vs vLLM's", pool,
                                            from_fla_layout(pool_fla), **state_tol))
        if padded or spec:
            written = set(slots[real].flatten().tolist())
            others = [j for j in range(num_slots) if j not in written]
            unchanged("vLLM's pool rows of no real sequence", pool_fla[others], pool_fla_before[others])
    else:
        last = (torch.tensor(real, device=device) + 1) * L - 1
        figures.add("state vs vllm", compare("final states vs vLLM's", pool[slots[real]],
                                             from_fla_layout(ht_fla[last]), **state_tol))
        unchanged("vLLM's pool (not in place)", pool_fla, pool_fla_before)
    written = set(slots[real].flatten().tolist())
    others = [j for j in range(num_slots) if j not in written]
    unchanged("our pool rows of no real sequence", pool[others], before[others])
    if padded:  # ours computes padded rows from a zero state; vLLM writes nothing for them
        zero = torch.zeros(len(padded), H, K, V, device=device)
        o_ref, _ = naive_per_token(q[padded], k[padded], v[padded], g[padded], beta[padded], zero)
        figures.add("o of padded rows vs definition", compare("o of the padded row (zero state)", o[padded], o_ref,
                                                              **DEFINITION_TOL[dtype]))
    return dict(figures)


def varlen_spec_vs_fla(fla, device, lengths, L, H, K, V, dtype, route=None, seed=0) -> dict:
    """The speculative-decoding step as the JetBlock runs it: `kernels.dispatch.
    gated_delta_rule_spec_decode` (sequences of different lengths, at most L
    tokens, packed; per-token slots `[N, L]`, num_accepted_tokens; raw gates) against
    vLLM's `fused_sigmoid_gating_delta_rule_update` on the same packed tokens. One
    sequence is padded (slots -1 / 0). `route`: "triton" or "cpu" forces the dispatch's
    choice (default: by device).

    Where they differ by design: ours also writes the slots past a sequence's end (with
    the state after its last token); vLLM leaves them. Both are checked as such."""
    from unittest import mock

    from vllm_jetnemotron.kernels import dispatch

    gen = generator(seed)
    N, T = len(lengths), sum(lengths)
    cu = cu_seqlens(lengths, device)
    q, k, v, _, _ = gdn_inputs((T,), H, K, V, dtype, gen, device)
    a, b, A_log, dt_bias = gate_inputs((T,), H, dtype, gen, device)
    num_slots = N * L + 2
    pool = random_pool(num_slots, H, K, V, gen, device)
    before = pool.clone()
    slots = (torch.randperm(num_slots - 1, generator=gen)[:N * L] + 1).view(N, L).to(torch.int32).to(device)
    padded = [N // 2] if N > 1 else []
    real = [n for n in range(N) if n not in padded]
    slots_fla = slots.clone()
    slots[padded], slots_fla[padded] = -1, 0
    accepted = torch.randint(1, L + 1, (N,), generator=gen).to(torch.int32).to(device)
    forced = {} if route is None else {"_on_gpu": lambda t: route == "triton"}
    with mock.patch.multiple(dispatch, **forced) if forced else _nothing():
        o = dispatch.gated_delta_rule_spec_decode(q, k, v, a, b, A_log, dt_bias, cu, pool, slots, accepted)
    pool_fla = to_fla_layout(before)
    o_fla, _ = fla.fused_sigmoid_gating.fused_sigmoid_gating_delta_rule_update(
        A_log, a.contiguous(), b.contiguous(), dt_bias, q[None], k[None], v[None], beta=1.0, threshold=20.0,
        scale=K**-0.5, initial_state=pool_fla, inplace_final_state=True, cu_seqlens=cu, ssm_state_indices=slots_fla,
        num_accepted_tokens=accepted, use_qk_l2norm_in_kernel=True)
    o_fla = o_fla[0]
    tol = dict(atol=4 * EPS[dtype] if dtype != torch.float32 else 1e-5,
               rtol=4 * EPS[dtype] if dtype != torch.float32 else 1e-5, relative_atol=True)
    figures = Figures()
    tokens = torch.cat([torch.arange(int(cu[n]), int(cu[n + 1])) for n in real]).to(device)
    figures.add("o vs vllm", compare("o of the real sequences' tokens vs vLLM", o[tokens], o_fla[tokens], **tol))
    theirs = from_fla_layout(pool_fla)
    written = set()
    for n in real:
        length = int(cu[n + 1] - cu[n])
        inside = slots[n, :length].long()
        figures.add("states vs vllm", compare(f"per-token states of sequence {n}", pool[inside], theirs[inside],
                                              **tol))
        past = slots[n, length:].long()
        if past.numel():
            unchanged(f"vLLM's slots past the end of sequence {n}", theirs[past], before[past])
            figures.add("slots past the end (ours: the last state)", compare(
                f"our slots past the end of sequence {n}", pool[past], pool[inside[-1]].expand_as(pool[past]),
                atol=0.0, rtol=0.0))
        written.update(slots[n].tolist())
    others = [j for j in range(num_slots) if j not in written]
    unchanged("our pool rows of no real sequence", pool[others], before[others])
    unchanged("vLLM's pool rows of no real sequence", theirs[others], before[others])
    return dict(figures)


@contextmanager
def _nothing():
    yield


def rmsnorm_vs_fla(fla, device, rows, H, V, dtype, eps=1e-5, seed=0) -> dict:
    """Our gated RMSNorm against vLLM's `rmsnorm_fn(x, w, z=z, norm_before_gate=True)`
    (rmsnorm(x) * w * silu(z), the JetBlock's output norm) on `[rows * H, V]`."""
    from vllm_jetnemotron.kernels.gated_rmsnorm import triton_norm

    gen = generator(seed)
    x = torch.randn(rows, H, V, generator=gen).to(dtype).to(device)
    z = torch.randn(rows, H, V, generator=gen).to(dtype).to(device)
    weight = torch.randn(V, generator=gen).to(dtype).to(device)
    out = triton_norm.gated_rmsnorm(x, z, weight, eps)
    out_fla = fla.layernorm_guard.rmsnorm_fn(x.reshape(-1, V), weight, None, z=z.reshape(-1, V), eps=eps,
                                             group_size=None, norm_before_gate=True).view(rows, H, V)
    # both compute in float32 from the same values; 16-bit outputs one rounding apart
    # (2 ulp: the interpreter truncates to bf16 where the GPU rounds)
    ulps = 0.0 if dtype == torch.float32 else 2 * EPS[dtype]
    return {"out vs vllm": compare("gated rmsnorm vs vLLM", out, out_fla, atol=1e-6 + ulps, rtol=1e-5 + ulps)}


def l2norm_vs_fla(fla, device, K, dtype=torch.float32, seed=0) -> dict:
    """q/k normalisation: ours x / max(||x||, 1e-6), vLLM's x / sqrt(||x||^2 + 1e-6).
    Rows at the norms the kernels see (randn, ||x|| ~ sqrt(K)) agree to float32 rounding;
    tiny rows (||x|| = 1e-4) follow each convention exactly, and differ from each other."""
    from vllm_jetnemotron.kernels.gated_delta_rule.naive import l2_normalize

    gen = generator(seed)
    x = torch.randn(64, K, generator=gen).to(dtype).to(device)
    ours, theirs = l2_normalize(x.float()), fla.l2norm.l2norm_fwd(x, eps=1e-6).float()
    figures = {"typical rows": compare("l2norm of randn rows vs vLLM", ours, theirs, atol=1e-6, rtol=1e-5)}
    tiny = x.float()[:8] / x.float()[:8].norm(dim=-1, keepdim=True) * 1e-4  # ||x|| = 1e-4
    theirs_tiny = fla.l2norm.l2norm_fwd(tiny.contiguous(), eps=1e-6).float()
    compare("vLLM's l2norm of rows with norm 1e-4 (x / sqrt(1e-8 + 1e-6))", theirs_tiny,
            tiny / (1e-8 + 1e-6) ** 0.5, atol=1e-6, rtol=1e-4)
    compare("our l2norm of rows with norm 1e-4 (unit rows)", l2_normalize(tiny), tiny / 1e-4, atol=1e-6, rtol=1e-5)
    figures["rows of norm 1e-4"] = {"ours_norm": float(l2_normalize(tiny).norm(dim=-1).mean()),
                                    "vllm_norm": float(theirs_tiny.norm(dim=-1).mean())}
    return figures



# ----- the grids gpu_check runs ---------------------------------------------------------------------
#
# A case is (name, function, keyword arguments); `device` (and `fla`) are added by the
# runner. "smoke": one small case per check, for a CPU dry run under the interpreter.
# "full": for a CUDA device: the grid of tests/test_triton_kernels.py, the Jet-Nemotron
# 2B (H = 12, K = 96, V = 256) and 4B (H = 16, K = 128, V = 256) heads at serving batch
# sizes, and long varlen prefills (about 31K tokens).

F32, BF16, F16 = torch.float32, torch.bfloat16, torch.float16
HEADS = {"2B": (12, 96, 256), "4B": (16, 128, 256)}
# the packed prefill of tests/test_triton_kernels.py: chunk boundaries at 64 and 128 tokens
TEST_SEQ_LENS, TEST_SLOTS, TEST_HAS_STATE = [65, 1, 130, 5, 64], [5, 0, 3, 7, 2], [True, False, True, True, False]
TEST_NUM_SLOTS = 9
SERVE_LENS, SERVE_SLOTS, SERVE_HAS = [1000, 1, 64, 300, 2500], [4, 1, -1, 6, 2], [True, False, True, True, True]
LONG_LENS, LONG_SLOTS, LONG_HAS = [8192, 1, 3001, 20000], [3, -1, 1, 2], [True, True, False, True]
SPEC_LENS = [1 + i % 4 for i in range(64)]  # speculative step: 1 + 0 to 3 drafts per sequence


def _name(x) -> str:
    return {F32: "fp32", BF16: "bf16", F16: "fp16"}.get(x, str(x))


def definition_cases(scale: str) -> list[tuple[str, object, dict]]:
    if scale == "smoke":
        return [
            ("chunk prefill K16 V32 fp32, pad slot", chunk_vs_definition,
             dict(H=2, K=16, V=32, lengths=[65, 1, 5], dtype=F32, slots=[2, -1, 0], has_state=[True, True, False],
                  num_slots=4)),
            ("decode K16 V32 bf16, pad slot", recurrent_vs_definition, dict(N=3, L=1, H=2, K=16, V=32, dtype=BF16)),
            ("spec decode from gates K16 V32 fp32", recurrent_vs_definition,
             dict(N=3, L=3, H=2, K=16, V=32, dtype=F32, spec=True, gates=True)),
            ("dynamic conv prefill D24 W4 fp32", conv_vs_definition,
             dict(D=24, W=4, lengths=[5, 1, 66], dtype=F32, slots=[1, -1, 3], has_state=[True, True, False],
                  num_slots=5)),
            ("dynamic conv step D24 W4 bf16", conv_step_vs_definition, dict(N=3, D=24, W=4, steps=2, dtype=BF16)),
            ("dynamic conv spec decode D24 W4 fp32", conv_spec_vs_definition,
             dict(lengths=[3, 1, 2], num_spec=2, D=24, W=4, dtype=F32)),
            ("gated rmsnorm V96 fp32", rmsnorm_vs_definition, dict(rows=4, H=2, V=96, dtype=F32)),
            ("chunk autograd T20 fp32", chunk_autograd_vs_definition, dict(B=1, T=20, H=2, K=16, V=32, dtype=F32)),
            ("conv autograd T20 fp32", conv_autograd_vs_definition, dict(B=1, T=20, D=16, W=4, dtype=F32)),
        ]
    cases = []
    for K, V in ((16, 32), (32, 64)):
        for dtype in (F32, BF16):
            for with_state in (False, True):
                cases.append((f"chunk prefill K{K} V{V} {_name(dtype)} {'with' if with_state else 'no'} initial state",
                              chunk_vs_definition,
                              dict(H=2, K=K, V=V, lengths=TEST_SEQ_LENS, dtype=dtype, slots=TEST_SLOTS,
                                   has_state=TEST_HAS_STATE if with_state else [False] * 5, num_slots=TEST_NUM_SLOTS)))
            for L in (1, 3):
                cases.append((f"decode K{K} V{V} {_name(dtype)} L{L}", recurrent_vs_definition,
                              dict(N=3, L=L, H=2, K=K, V=V, dtype=dtype)))
    cases += [
        ("chunk prefill K96 V256 fp32", chunk_vs_definition,
         dict(H=2, K=96, V=256, lengths=TEST_SEQ_LENS, dtype=F32, slots=TEST_SLOTS, has_state=TEST_HAS_STATE,
              num_slots=TEST_NUM_SLOTS)),
        ("chunk prefill 16-token chunks, strided pool", chunk_vs_definition,
         dict(H=2, K=16, V=32, lengths=TEST_SEQ_LENS, dtype=F32, slots=TEST_SLOTS, has_state=TEST_HAS_STATE,
              num_slots=TEST_NUM_SLOTS, chunk_size=16, strided_pool=True)),
    ]
    for dtype in (F32, BF16):
        cases += [(f"spec decode K16 V32 {_name(dtype)}", recurrent_vs_definition,
                   dict(N=3, L=4, H=2, K=16, V=32, dtype=dtype, spec=True)),
                  (f"decode from gates K32 V64 {_name(dtype)}", recurrent_vs_definition,
                   dict(N=3, L=2, H=2, K=32, V=64, dtype=dtype, gates=True))]
        for W in (4, 3):
            for with_state in (False, True):
                cases.append((f"dynamic conv prefill D48 W{W} {_name(dtype)} {'with' if with_state else 'no'} state",
                              conv_vs_definition,
                              dict(D=48, W=W, lengths=TEST_SEQ_LENS, dtype=dtype, slots=TEST_SLOTS,
                                   has_state=TEST_HAS_STATE if with_state else [False] * 5, num_slots=TEST_NUM_SLOTS)))
        cases.append((f"dynamic conv step D40 {_name(dtype)}", conv_step_vs_definition,
                      dict(N=3, D=40, W=4, steps=3, dtype=dtype)))
        cases.append((f"dynamic conv spec decode D40 {_name(dtype)}", conv_spec_vs_definition,
                      dict(lengths=[3, 1, 2, 4], num_spec=3, D=40, W=4, dtype=dtype)))
        for V in (32, 96, 256):
            cases.append((f"gated rmsnorm V{V} {_name(dtype)}", rmsnorm_vs_definition,
                          dict(rows=7, H=2, V=V, dtype=dtype)))
        for with_state in (False, True):
            cases.append((f"chunk autograd T70 {_name(dtype)} {'with' if with_state else 'no'} initial state",
                          chunk_autograd_vs_definition,
                          dict(B=2, T=70, H=2, K=16, V=32, dtype=dtype, with_initial_state=with_state)))
        cases.append((f"conv autograd T70 {_name(dtype)}", conv_autograd_vs_definition,
                      dict(B=2, T=70, D=24, W=4, dtype=dtype)))
    for model, (H, K, V) in HEADS.items():
        for dtype in (BF16, F32):
            cases.append((f"{model} chunk prefill {_name(dtype)}, {sum(SERVE_LENS)} tokens in 5 sequences",
                          chunk_vs_definition,
                          dict(H=H, K=K, V=V, lengths=SERVE_LENS, dtype=dtype, slots=SERVE_SLOTS, has_state=SERVE_HAS,
                               num_slots=8)))
        cases += [
            (f"{model} decode from gates bf16, batch 256", recurrent_vs_definition,
             dict(N=256, L=1, H=H, K=K, V=V, dtype=BF16, gates=True)),
            (f"{model} spec decode bf16, batch 64, 1 + 3 drafts", recurrent_vs_definition,
             dict(N=64, L=4, H=H, K=K, V=V, dtype=BF16, spec=True)),
            (f"{model} dynamic conv prefill bf16, D {H * V}", conv_vs_definition,
             dict(D=H * V, W=4, lengths=SERVE_LENS, dtype=BF16, slots=SERVE_SLOTS, has_state=SERVE_HAS, num_slots=8)),
            (f"{model} dynamic conv step bf16, batch 256", conv_step_vs_definition,
             dict(N=256, D=H * V, W=4, steps=2, dtype=BF16)),
            (f"{model} dynamic conv spec decode bf16, 64 sequences of 1 to 4 tokens", conv_spec_vs_definition,
             dict(lengths=SPEC_LENS, num_spec=3, D=H * V, W=4, dtype=BF16)),
            (f"{model} gated rmsnorm bf16, 4096 tokens", rmsnorm_vs_definition, dict(rows=4096, H=H, V=V, dtype=BF16)),
            (f"{model} chunk autograd bf16, 2 x 1024 tokens", chunk_autograd_vs_definition,
             dict(B=2, T=1024, H=H, K=K, V=V, dtype=BF16)),
        ]
    for model, (H, K, V) in HEADS.items():
        for dtype in ((BF16, F32) if model == "4B" else (BF16,)):
            cases.append((f"{model} long chunk prefill {_name(dtype)}, {sum(LONG_LENS)} tokens ({LONG_LENS})",
                          chunk_vs_definition,
                          dict(H=H, K=K, V=V, lengths=LONG_LENS, dtype=dtype, slots=LONG_SLOTS, has_state=LONG_HAS,
                               num_slots=5, tol_scale=2.0)))
    cases += [
        ("2B conv autograd bf16, 2 x 1024 tokens", conv_autograd_vs_definition,
         dict(B=2, T=1024, D=3072, W=4, dtype=BF16)),
        # the decode grid is (V blocks, N * H) and CUDA allows at most 65535 programs on
        # grid axes 1 and 2 (small K and V: this is about the launch, not the math)
        ("decode batch 5462 x 12 heads (N * H = 65544 programs on grid axis 1)", recurrent_vs_definition,
         dict(N=5462, L=1, H=12, K=16, V=32, dtype=BF16, pad=False)),
    ]
    return cases


def fla_cases(scale: str) -> list[tuple[str, object, dict]]:
    if scale == "smoke":
        # 16-bit chunk runs in float16: the interpreter's bf16 tl.dot is wrong (see the test module)
        return [
            ("chunk prefill vs vLLM K16 V32 fp16, pad slot", chunk_vs_fla,
             dict(H=2, K=16, V=32, lengths=[65, 1, 5], dtype=F16, slots=[2, -1, 1], has_state=[True, True, False],
                  num_slots=4)),
            ("decode vs vLLM K16 V32 fp32, pad slot", recurrent_vs_fla, dict(N=3, L=1, H=2, K=16, V=32, dtype=F32)),
            ("spec decode from gates vs vLLM K16 V32 fp32", recurrent_vs_fla,
             dict(N=3, L=3, H=2, K=16, V=32, dtype=F32, spec=True, gates=True)),
            ("varlen spec decode step vs vLLM K16 V32 fp32", varlen_spec_vs_fla,
             dict(lengths=[3, 1, 2, 1], L=3, H=2, K=16, V=32, dtype=F32)),
            ("gated rmsnorm vs vLLM V32 fp32", rmsnorm_vs_fla, dict(rows=4, H=2, V=32, dtype=F32)),
            ("l2norm conventions K16", l2norm_vs_fla, dict(K=16)),
        ]
    cases = []
    for model, (H, K, V) in HEADS.items():
        for dtype in (BF16, F16):
            cases.append((f"{model} chunk prefill vs vLLM {_name(dtype)}, {sum(SERVE_LENS)} tokens", chunk_vs_fla,
                          dict(H=H, K=K, V=V, lengths=SERVE_LENS, dtype=dtype, slots=SERVE_SLOTS, has_state=SERVE_HAS,
                               num_slots=8)))
        cases += [
            (f"{model} decode vs vLLM bf16, batch 256", recurrent_vs_fla, dict(N=256, L=1, H=H, K=K, V=V, dtype=BF16)),
            (f"{model} decode vs vLLM bf16, bf16 state pool, batch 256", recurrent_vs_fla,
             dict(N=256, L=1, H=H, K=K, V=V, dtype=BF16, pool_dtype=BF16)),
            (f"{model} decode vs vLLM fp32, batch 64, 3 tokens each", recurrent_vs_fla,
             dict(N=64, L=3, H=H, K=K, V=V, dtype=F32)),
            (f"{model} spec decode vs vLLM bf16, batch 64, 1 + 3 drafts", recurrent_vs_fla,
             dict(N=64, L=4, H=H, K=K, V=V, dtype=BF16, spec=True)),
            (f"{model} decode from gates vs vLLM bf16, batch 256", recurrent_vs_fla,
             dict(N=256, L=1, H=H, K=K, V=V, dtype=BF16, gates=True)),
            (f"{model} spec decode from gates vs vLLM bf16, batch 64", recurrent_vs_fla,
             dict(N=64, L=4, H=H, K=K, V=V, dtype=BF16, spec=True, gates=True)),
            (f"{model} varlen spec decode step (dispatch) vs vLLM bf16, 64 sequences of 1 to 4 tokens",
             varlen_spec_vs_fla, dict(lengths=SPEC_LENS, L=4, H=H, K=K, V=V, dtype=BF16)),
            (f"{model} gated rmsnorm vs vLLM bf16", rmsnorm_vs_fla, dict(rows=2048, H=H, V=V, dtype=BF16)),
            (f"{model} l2norm conventions", l2norm_vs_fla, dict(K=K)),
        ]
    for model, (H, K, V) in HEADS.items():
        cases.append((f"{model} long chunk prefill vs vLLM bf16, {sum(LONG_LENS)} tokens", chunk_vs_fla,
                      dict(H=H, K=K, V=V, lengths=LONG_LENS, dtype=BF16, slots=LONG_SLOTS, has_state=LONG_HAS,
                           num_slots=5)))
    return cases
