"""The Triton kernels against their naive references, on the CPU under Triton's
interpreter: chunked and recurrent gated delta rule, dynamic causal conv (prefill and
decode step), gated RMSNorm, the training autograd functions, and the device dispatch
(`kernels.dispatch` routed as on a GPU against its CPU route).

Grid: head dims (K, V) in {(16, 32), (32, 64)} plus one (96, 256) case; packed
sequences of lengths 1, 5, 64, 65, 130 (crossing the 64-token chunks); with and without
initial states; float32 and bfloat16 inputs. Shapes are small: the interpreter runs
every program one after another in NumPy.

The tests run once in a pytest subprocess on this file with TRITON_INTERPRET=1, and
each test of the main process reports its outcome from there (tests/fresh_interpreter.py).
"""

import contextlib
import os

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import triton.language as tl  # noqa: E402
from fresh_interpreter import in_subprocess, report_from_subprocess  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

from vllm_jetnemotron.kernels import dispatch  # noqa: E402
from vllm_jetnemotron.kernels.dynamic_conv import triton_conv, triton_conv_autograd  # noqa: E402
from vllm_jetnemotron.kernels.dynamic_conv.naive import dynamic_causal_conv_naive  # noqa: E402
from vllm_jetnemotron.kernels.gated_delta_rule import cpu as gdr_cpu  # noqa: E402
from vllm_jetnemotron.kernels.gated_delta_rule.gate import gated_delta_rule_gates  # noqa: E402
from vllm_jetnemotron.kernels.gated_delta_rule import (  # noqa: E402
    triton_chunk,
    triton_chunk_autograd,
)
from vllm_jetnemotron.kernels.gated_delta_rule import triton_fused_recurrent as triton_recurrent  # noqa: E402
from vllm_jetnemotron.kernels.gated_delta_rule.naive import naive_recurrent_gated_delta_rule  # noqa: E402
from vllm_jetnemotron.kernels.gated_rmsnorm import triton_norm  # noqa: E402
from vllm_jetnemotron.kernels.gated_rmsnorm.naive import gated_rmsnorm_naive  # noqa: E402

# Every test of this module runs once in a fresh interpreter (a pytest subprocess on this
# file, TRITON_INTERPRET=1) and each test here reports its own outcome from that run.
_SUBPROCESS_FLAG = "JETNEMOTRON_TRITON_TESTS_IN_SUBPROCESS"
RUN_IN_SUBPROCESS = not in_subprocess(_SUBPROCESS_FLAG)
if not RUN_IN_SUBPROCESS:
    assert os.environ.get("TRITON_INTERPRET") == "1" and not isinstance(tl.sigmoid, JITFunction)


DTYPES = [torch.float32, torch.bfloat16]
# Outputs are compared in float32. float32: chunked vs token-by-token summation order.
# bfloat16: inputs are the same bf16 values on both sides and all math is float32, so the
# difference is the final rounding: the interpreter truncates float32 -> bf16 where
# PyTorch (and the GPU) rounds to nearest, i.e. up to 1 ulp (2^-7 relative) apart.
TOLERANCES = {
    torch.float32: dict(atol=5e-5, rtol=5e-5),
    torch.bfloat16: dict(atol=1e-2, rtol=1.6e-2),
}
# Gradients of bf16 leaves are bf16-rounded float32 gradients; float32 gradients go
# through the chunked recomputation (vs the token loop), summation order only.
GRAD_TOLERANCES = {
    torch.float32: dict(atol=1e-4, rtol=1e-4),
    torch.bfloat16: dict(atol=2e-2, rtol=2e-2),
}
SEQ_LENS = [65, 1, 130, 5, 64]  # packed in this order: chunk boundaries at 64, 128
SLOTS = [5, 0, 3, 7, 2]  # pool slot of each sequence (pool of NUM_SLOTS)
HAS_STATE = [True, False, True, True, False]  # "with initial state": a mix
NUM_SLOTS = 9
HEAD_DIMS = [(16, 32), (32, 64)]
H = 2


def assert_close(actual, expected, dtype, what, tolerances=TOLERANCES):
    torch.testing.assert_close(actual.float(), expected.float(), **tolerances[dtype],
                               msg=lambda m: f"{what} ({dtype}): {m}")


def packed(lengths):
    return torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32)


def gdn_inputs(shape, K, V, dtype, gen):
    """q, k [*shape, H, K], v [*shape, H, V] in dtype; g, beta [*shape, H] float32 (as
    the JetBlock computes them)."""
    q = torch.randn(*shape, H, K, generator=gen).to(dtype)
    k = torch.randn(*shape, H, K, generator=gen).to(dtype)
    v = torch.randn(*shape, H, V, generator=gen).to(dtype)
    g = F.logsigmoid(torch.randn(*shape, H, generator=gen) + 1.0)
    beta = torch.rand(*shape, H, generator=gen)
    return q, k, v, g, beta


def state_pool(num_slots, K, V, dtype, gen, strided=False):
    """[num_slots, H, K, V] random states; strided: a transposed view of [.., V, K]."""
    if strided:
        return torch.randn(num_slots, H, V, K, generator=gen).to(dtype).transpose(-1, -2)
    return torch.randn(num_slots, H, K, V, generator=gen).to(dtype)


# ----- chunked gated delta rule (prefill) ------------------------------------------------


def check_chunk(K, V, dtype, with_initial_state, chunk_size=64, strided=False):
    gen = torch.Generator().manual_seed(K * 1000 + V)
    cu = packed(SEQ_LENS)
    q, k, v, g, beta = gdn_inputs((int(cu[-1]),), K, V, dtype, gen)
    pool = state_pool(NUM_SLOTS, K, V, dtype, gen, strided)
    before = pool.clone()
    has = torch.tensor(HAS_STATE if with_initial_state else [False] * len(SEQ_LENS))
    o = triton_chunk.chunk_gated_delta_rule(q, k, v, g, beta, cu, pool, torch.tensor(SLOTS, dtype=torch.int32),
                                            has, chunk_size=chunk_size)
    assert o.dtype == v.dtype and o.shape == v.shape
    for i, slot in enumerate(SLOTS):
        s, e = int(cu[i]), int(cu[i + 1])
        o_ref, state_ref = naive_recurrent_gated_delta_rule(
            q[None, s:e], k[None, s:e], v[None, s:e], g[None, s:e], beta[None, s:e],
            initial_state=before[slot][None] if has[i] else None, output_final_state=True)
        assert_close(o[s:e], o_ref[0], dtype, f"o of sequence {i} (length {e - s})")
        assert_close(pool[slot], state_ref[0], dtype, f"final state of sequence {i} (length {e - s})")
    untouched = [j for j in range(NUM_SLOTS) if j not in SLOTS]
    assert torch.equal(pool[untouched], before[untouched])


@pytest.mark.parametrize("with_initial_state", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("K,V", HEAD_DIMS)
def test_chunk_gated_delta_rule_matches_naive(K, V, dtype, with_initial_state):
    check_chunk(K, V, dtype, with_initial_state)


def test_chunk_gated_delta_rule_official_head_dims():
    # Jet-Nemotron-2B heads: K = 96 (padded to a 128 tile), V = 256 (several V blocks)
    check_chunk(96, 256, torch.float32, with_initial_state=True)


def test_chunk_gated_delta_rule_options():
    # 16-token chunks (130 tokens: 9 chunks), a strided pool
    check_chunk(16, 32, torch.float32, True, chunk_size=16, strided=True)


# ----- recurrent gated delta rule (decode) -----------------------------------------------


@pytest.mark.parametrize("L", [1, 3])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("K,V", HEAD_DIMS)
def test_fused_recurrent_matches_naive(K, V, dtype, L):
    gen = torch.Generator().manual_seed(7 * K + V + L)
    N = 3
    q, k, v, g, beta = gdn_inputs((N, L), K, V, dtype, gen)
    pool = state_pool(NUM_SLOTS, K, V, dtype, gen, strided=L == 3)
    pool[4].zero_()  # a sequence starting from no state
    before = pool.clone()
    slots = torch.tensor([6, 4, 1])
    o = triton_recurrent.fused_recurrent_gated_delta_rule(q, k, v, g, beta, pool, slots)
    o_ref, state_ref = naive_recurrent_gated_delta_rule(q, k, v, g, beta, initial_state=before[slots],
                                                        output_final_state=True)
    assert_close(o, o_ref, dtype, "o")
    assert_close(pool[slots], state_ref, dtype, "states")
    untouched = [j for j in range(NUM_SLOTS) if j not in slots.tolist()]
    assert torch.equal(pool[untouched], before[untouched])


def naive_per_token_states(q, k, v, g, beta, initial_state):
    """o [N, L, H, V] and the state after every token [N, L, H, K, V] (float32)."""
    L = q.shape[1]
    states = []
    for j in range(L):
        _, s = naive_recurrent_gated_delta_rule(q[:, :j + 1], k[:, :j + 1], v[:, :j + 1], g[:, :j + 1],
                                                beta[:, :j + 1], initial_state=initial_state,
                                                output_final_state=True)
        states.append(s)
    o, _ = naive_recurrent_gated_delta_rule(q, k, v, g, beta, initial_state=initial_state)
    return o, torch.stack(states, dim=1)


@pytest.mark.parametrize("accepted", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
def test_fused_recurrent_spec_decode_matches_naive(dtype, accepted):
    # [N, L] slots: read from [:, 0] (or the last accepted token's slot), state after
    # token j written to [:, j]; Triton and the PyTorch decode step against naive.
    gen = torch.Generator().manual_seed(11 + accepted)
    N, L, K, V = 3, 4, 16, 32
    q, k, v, g, beta = gdn_inputs((N, L), K, V, dtype, gen)
    slots = torch.arange(N * L).view(N, L) + 2  # pool slots 2 .. 13
    num_accepted = torch.tensor([1, 3, 4]) if accepted else None
    read = slots[torch.arange(N), num_accepted - 1] if accepted else slots[:, 0]
    pool = state_pool(N * L + 3, K, V, dtype, gen)
    o_ref, states_ref = naive_per_token_states(q, k, v, g, beta, pool[read])
    for name, impl in [("triton", triton_recurrent.fused_recurrent_gated_delta_rule),
                       ("reference", gdr_cpu.fused_recurrent_gated_delta_rule)]:
        p = pool.clone()
        o = impl(q, k, v, g, beta, p, slots, num_accepted_tokens=num_accepted)
        assert_close(o, o_ref, dtype, f"{name} o")
        assert_close(p[slots], states_ref, dtype, f"{name} per-token states")
        assert torch.equal(p[[0, 1, 14]], pool[[0, 1, 14]])


@pytest.mark.parametrize("dtype", DTYPES)
def test_fused_recurrent_from_gates_matches_naive(dtype):
    gen = torch.Generator().manual_seed(5)
    N, L, K, V = 3, 2, 32, 64
    q, k, v, _, _ = gdn_inputs((N, L), K, V, dtype, gen)
    a = (4 * torch.randn(N, L, H, generator=gen)).to(dtype)  # reaches softplus' linear range
    b = torch.randn(N, L, H, generator=gen).to(dtype)
    A_log = torch.empty(H).uniform_(1, 16, generator=gen).log()
    dt_bias = torch.randn(H, generator=gen)
    g, beta = gated_delta_rule_gates(a, b, A_log, dt_bias)
    pool = state_pool(NUM_SLOTS, K, V, dtype, gen)
    before = pool.clone()
    slots = torch.tensor([3, 8, 0])
    o = triton_recurrent.fused_recurrent_gated_delta_rule_from_gates(q, k, v, a, b, A_log, dt_bias, pool, slots)
    o_ref, state_ref = naive_recurrent_gated_delta_rule(q, k, v, g, beta, initial_state=before[slots],
                                                        output_final_state=True)
    assert_close(o, o_ref, dtype, "o")
    assert_close(pool[slots], state_ref, dtype, "states")
    p = before.clone()
    o_cpu = gdr_cpu.fused_recurrent_gated_delta_rule_from_gates(q, k, v, a, b, A_log, dt_bias, p, slots)
    assert_close(o_cpu, o_ref, dtype, "reference o")


# ----- dynamic causal conv ----------------------------------------------------------------


def conv_pool(num_slots, W, D, dtype, gen):
    """[num_slots, W - 1, D] time-first view of a dim-first [num_slots, D, W - 1] cache."""
    return torch.randn(num_slots, D, W - 1, generator=gen).to(dtype).transpose(1, 2)


@pytest.mark.parametrize("W", [4, 3])
@pytest.mark.parametrize("with_initial_state", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
def test_dynamic_causal_conv_matches_naive(dtype, with_initial_state, W):
    gen = torch.Generator().manual_seed(W)
    D = 48
    cu = packed(SEQ_LENS)
    T = int(cu[-1])
    x = torch.randn(T, 2 * D, generator=gen).to(dtype)[:, :D]  # strided rows, as a projection split
    kernels = torch.randn(T, D, W, generator=gen).to(dtype)
    pool = conv_pool(NUM_SLOTS, W, D, dtype, gen)
    before = pool.clone()
    has = torch.tensor(HAS_STATE if with_initial_state else [False] * len(SEQ_LENS))
    out = triton_conv.dynamic_causal_conv(x, kernels, cu, pool, torch.tensor(SLOTS, dtype=torch.int32), has)
    assert out.dtype == dtype
    for i, slot in enumerate(SLOTS):
        s, e = int(cu[i]), int(cu[i + 1])
        out_ref, state_ref = dynamic_causal_conv_naive(x[None, s:e], kernels[None, s:e],
                                                       before[slot][None] if has[i] else None)
        assert_close(out[s:e], out_ref[0], dtype, f"out of sequence {i} (length {e - s})")
        assert_close(pool[slot], state_ref[0], dtype, f"state of sequence {i} (length {e - s})")
    untouched = [j for j in range(NUM_SLOTS) if j not in SLOTS]
    assert torch.equal(pool[untouched], before[untouched])


@pytest.mark.parametrize("dtype", DTYPES)
def test_dynamic_causal_conv_step_matches_naive(dtype):
    gen = torch.Generator().manual_seed(3)
    N, D, W, steps = 3, 40, 4, 3
    pool = conv_pool(NUM_SLOTS, W, D, dtype, gen)
    slots = torch.tensor([7, 2, 4])
    x = torch.randn(N, steps, D, generator=gen).to(dtype)
    kernels = torch.randn(N, steps, D, W, generator=gen).to(dtype)
    out_ref, state_ref = dynamic_causal_conv_naive(x, kernels, pool[slots].clone())
    before = pool.clone()
    for t in range(steps):
        out = triton_conv.dynamic_causal_conv_step(x[:, t], kernels[:, t], pool, slots)
        assert_close(out, out_ref[:, t], dtype, f"out of step {t}")
    assert_close(pool[slots], state_ref, dtype, "states after the steps")
    untouched = [j for j in range(NUM_SLOTS) if j not in slots.tolist()]
    assert torch.equal(pool[untouched], before[untouched])


@pytest.mark.parametrize("dtype", DTYPES)
def test_dynamic_causal_conv_spec_decode_matches_naive(dtype):
    # sequences of 3, 1 and 2 tokens resuming after different accepted counts, one padded
    gen = torch.Generator().manual_seed(4)
    D, W, num_spec = 40, 4, 2
    rows = W - 1 + num_spec
    lengths, accepted = [3, 1, 2, 2], torch.tensor([2, 1, 3, 1], dtype=torch.int32)
    cu = packed(lengths)
    T = sum(lengths)
    x, kernels = torch.randn(T, D, generator=gen).to(dtype), torch.randn(T, D, W, generator=gen).to(dtype)
    pool = torch.randn(NUM_SLOTS, rows, D, generator=gen).to(dtype)
    before = pool.clone()
    slots = torch.tensor([7, 2, -1, 4], dtype=torch.int32)
    out = triton_conv.dynamic_causal_conv_spec_decode(x, kernels, cu, pool, slots, accepted)
    for i, slot in enumerate(slots.tolist()):
        s, e = cu[i], cu[i + 1]
        a = int(accepted[i])
        history = before[slot, a - 1: a - 1 + W - 1] if slot >= 0 else torch.zeros(W - 1, D, dtype=dtype)
        out_ref, _ = dynamic_causal_conv_naive(x[None, s:e], kernels[None, s:e], history[None])
        assert_close(out[s:e], out_ref[0], dtype, f"out of sequence {i}")
        if slot >= 0:  # row j: the W - 1 inputs ending at token j
            inputs = torch.cat([history, x[s:e]])
            assert torch.equal(pool[slot, : W - 2 + e - s], inputs[1:])
    untouched = [j for j in range(NUM_SLOTS) if j not in (7, 2, 4)]
    assert torch.equal(pool[untouched], before[untouched])


# ----- gated RMSNorm ----------------------------------------------------------------------


@pytest.mark.parametrize("V", [32, 96, 256])
@pytest.mark.parametrize("dtype", DTYPES)
def test_gated_rmsnorm_matches_naive(dtype, V):
    gen = torch.Generator().manual_seed(V)
    x = torch.randn(7, H, V, generator=gen).to(dtype)
    z = torch.randn(7, H, 2 * V, generator=gen).to(dtype)[..., :V]  # strided, as a projection split
    weight = torch.randn(V, generator=gen).to(dtype)
    out = triton_norm.gated_rmsnorm(x, z, weight, 1e-5)
    assert out.dtype == dtype and out.shape == x.shape
    assert_close(out, gated_rmsnorm_naive(x, z, weight, 1e-5), dtype, "gated rmsnorm")


# ----- padding slots ------------------------------------------------------------------------


def test_negative_slots_are_neither_read_nor_written():
    # vLLM pads batches with PAD_SLOT_ID = -1: zero state in, nothing written.
    gen = torch.Generator().manual_seed(0)
    K, V, D, W = 16, 32, 24, 4
    q, k, v, g, beta = gdn_inputs((2, 1), K, V, torch.float32, gen)
    pool = state_pool(4, K, V, torch.float32, gen)
    before = pool.clone()
    o = triton_recurrent.fused_recurrent_gated_delta_rule(q, k, v, g, beta, pool, torch.tensor([-1, 2]))
    o_ref, _ = naive_recurrent_gated_delta_rule(q[:1], k[:1], v[:1], g[:1], beta[:1])
    assert_close(o[:1], o_ref, torch.float32, "o of the padded sequence")
    assert torch.equal(pool[[0, 1, 3]], before[[0, 1, 3]])

    # [2, 1, H, D] -> 5 tokens of the first sequence: [5, H, D]
    q5, k5, v5, g5, b5 = (t[:1, 0].expand(5, *t.shape[2:]) for t in (q, k, v, g, beta))
    before = pool.clone()
    o = triton_chunk.chunk_gated_delta_rule(q5, k5, v5, g5, b5, packed([5]), pool, torch.tensor([-1]),
                                            torch.tensor([True]))
    o_ref, _ = naive_recurrent_gated_delta_rule(q5[None], k5[None], v5[None], g5[None], b5[None])
    assert_close(o, o_ref[0], torch.float32, "chunk o of the padded sequence")
    assert torch.equal(pool, before)

    cpool = conv_pool(3, W, D, torch.float32, gen)
    cbefore = cpool.clone()
    x, kern = torch.randn(2, D, generator=gen), torch.randn(2, D, W, generator=gen)
    out = triton_conv.dynamic_causal_conv_step(x, kern, cpool, torch.tensor([-1, 1]))
    out_ref, _ = dynamic_causal_conv_naive(x[None, :1], kern[None, :1])
    assert_close(out[:1], out_ref[0], torch.float32, "conv out of the padded sequence")
    triton_conv.dynamic_causal_conv(x, kern, packed([2]), cpool, torch.tensor([-1]), torch.tensor([True]))
    assert torch.equal(cpool[[0, 2]], cbefore[[0, 2]])


# ----- training: autograd functions ---------------------------------------------------------


def grads_of(fn, leaves, grad_outputs):
    for x in leaves:
        x.grad = None
    outputs = fn()
    torch.autograd.backward(outputs, grad_outputs)
    return outputs, [x.grad.clone() for x in leaves]


@pytest.mark.parametrize("with_initial_state", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
def test_chunk_gated_delta_rule_autograd_matches_naive(dtype, with_initial_state):
    gen = torch.Generator().manual_seed(21)
    B, T, K, V = 2, 70, 16, 32
    q, k, v, g, beta = gdn_inputs((B, T), K, V, dtype, gen)
    h0 = torch.randn(B, H, K, V, generator=gen) if with_initial_state else None
    leaves = [x.requires_grad_() for x in (q, k, v, g, beta) + ((h0,) if with_initial_state else ())]
    do, dht = torch.randn(B, T, H, V, generator=gen).to(dtype), torch.randn(B, H, K, V, generator=gen)
    (o, ht), grads = grads_of(
        lambda: triton_chunk_autograd.chunk_gated_delta_rule_autograd(q, k, v, g, beta, h0), leaves, [do, dht])
    (o_ref, ht_ref), grads_ref = grads_of(
        lambda: naive_recurrent_gated_delta_rule(q, k, v, g, beta, initial_state=h0, output_final_state=True),
        leaves, [do, dht])
    assert_close(o, o_ref, dtype, "o")
    assert_close(ht, ht_ref, dtype, "final state")
    for name, gr, gr_ref in zip(["dq", "dk", "dv", "dg", "dbeta", "dh0"], grads, grads_ref):
        assert_close(gr, gr_ref, dtype, name, GRAD_TOLERANCES)


def test_chunk_gated_delta_rule_autograd_varlen_matches_naive():
    gen = torch.Generator().manual_seed(22)
    lengths, K, V = [5, 65, 1], 16, 32
    cu = packed(lengths)
    q, k, v, g, beta = gdn_inputs((1, int(cu[-1])), K, V, torch.float32, gen)
    h0 = torch.randn(len(lengths), H, K, V, generator=gen)
    leaves = [x.requires_grad_() for x in (q, k, v, g, beta, h0)]
    do, dht = torch.randn_like(v), torch.randn_like(h0)

    def reference():
        outs = [naive_recurrent_gated_delta_rule(q[:, s:e], k[:, s:e], v[:, s:e], g[:, s:e], beta[:, s:e],
                                                 initial_state=h0[i:i + 1], output_final_state=True)
                for i, (s, e) in enumerate(zip(cu[:-1].tolist(), cu[1:].tolist()))]
        return torch.cat([o for o, _ in outs], dim=1), torch.cat([s for _, s in outs])

    (o, ht), grads = grads_of(
        lambda: triton_chunk_autograd.chunk_gated_delta_rule_autograd(q, k, v, g, beta, h0, cu_seqlens=cu),
        leaves, [do, dht])
    (o_ref, ht_ref), grads_ref = grads_of(reference, leaves, [do, dht])
    assert_close(o, o_ref, torch.float32, "o")
    assert_close(ht, ht_ref, torch.float32, "final states")
    for name, gr, gr_ref in zip(["dq", "dk", "dv", "dg", "dbeta", "dh0"], grads, grads_ref):
        assert_close(gr, gr_ref, torch.float32, name, GRAD_TOLERANCES)


@pytest.mark.parametrize("with_initial_state", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
def test_dynamic_causal_conv_autograd_matches_naive(dtype, with_initial_state):
    gen = torch.Generator().manual_seed(31)
    B, T, D, W = 2, 70, 24, 4
    x = torch.randn(B, T, D, generator=gen).to(dtype)
    kernels = torch.randn(B, T, D, W, generator=gen).to(dtype)
    h0 = torch.randn(B, W - 1, D, generator=gen).to(dtype) if with_initial_state else None
    leaves = [t.requires_grad_() for t in (x, kernels) + ((h0,) if with_initial_state else ())]
    dout, dfinal = torch.randn(B, T, D, generator=gen).to(dtype), torch.randn(B, W - 1, D, generator=gen).to(dtype)
    (out, final), grads = grads_of(
        lambda: triton_conv_autograd.dynamic_causal_conv_autograd(x, kernels, h0), leaves, [dout, dfinal])
    (out_ref, final_ref), grads_ref = grads_of(lambda: dynamic_causal_conv_naive(x, kernels, h0), leaves,
                                               [dout, dfinal])
    assert_close(out, out_ref, dtype, "out")
    assert torch.equal(final, final_ref)
    for name, gr, gr_ref in zip(["dx", "dkernels", "dh0"], grads, grads_ref):
        assert_close(gr, gr_ref, dtype, name, GRAD_TOLERANCES)


def test_dynamic_causal_conv_autograd_varlen_matches_naive():
    gen = torch.Generator().manual_seed(32)
    lengths, D, W = [2, 1, 66, 5], 24, 4
    cu = packed(lengths)
    T = int(cu[-1])
    x = torch.randn(1, T, D, generator=gen)
    kernels = torch.randn(1, T, D, W, generator=gen)
    h0 = torch.randn(len(lengths), W - 1, D, generator=gen)
    leaves = [t.requires_grad_() for t in (x, kernels, h0)]
    dout, dfinal = torch.randn_like(x), torch.randn_like(h0)

    def reference():
        outs = [dynamic_causal_conv_naive(x[:, s:e], kernels[:, s:e], h0[i:i + 1])
                for i, (s, e) in enumerate(zip(cu[:-1].tolist(), cu[1:].tolist()))]
        return torch.cat([o for o, _ in outs], dim=1), torch.cat([s for _, s in outs])

    (out, final), grads = grads_of(
        lambda: triton_conv_autograd.dynamic_causal_conv_autograd(x, kernels, h0, cu_seqlens=cu),
        leaves, [dout, dfinal])
    (out_ref, final_ref), grads_ref = grads_of(reference, leaves, [dout, dfinal])
    assert_close(out, out_ref, torch.float32, "out")
    assert torch.equal(final, final_ref)
    for name, gr, gr_ref in zip(["dx", "dkernels", "dh0"], grads, grads_ref):
        assert_close(gr, gr_ref, torch.float32, name, GRAD_TOLERANCES)


@contextlib.contextmanager
def host_syncs_forbidden():
    """Tensor-to-Python conversions raise: on a GPU each is a host sync, which a CUDA
    graph capture refuses (the interpreter itself needs none of them)."""
    def refuse(self, *args, **kwargs):
        raise AssertionError("host sync on the GPU path")

    names = ("item", "tolist", "__bool__", "__int__", "__float__", "__index__", "nonzero")
    saved = {name: getattr(torch.Tensor, name) for name in names}
    for name in names:
        setattr(torch.Tensor, name, refuse)
    try:
        yield
    finally:
        for name, fn in saved.items():
            setattr(torch.Tensor, name, fn)


def test_gpu_decode_and_speculative_steps_make_no_host_sync(monkeypatch):
    # The dispatch routed as on a GPU (Triton kernels, here interpreted), through every
    # op of a decode and a speculative-decode step as the JetBlock calls them, with
    # padded slots; the results equal the CPU implementations'.
    gen = torch.Generator().manual_seed(43)
    K, V, W, num_spec = 16, 32, 4, 2
    D = H * V
    q, k, v, _, _ = gdn_inputs((7,), K, V, torch.float32, gen)
    a, b = torch.randn(7, H, generator=gen), torch.randn(7, H, generator=gen)
    A_log, dt_bias = torch.rand(H, generator=gen), torch.randn(H, generator=gen)
    x, kernels = torch.randn(7, D, generator=gen), torch.randn(7, D, W, generator=gen)
    z, w = torch.randn(7, H, V, generator=gen), torch.randn(V, generator=gen)
    pool = state_pool(NUM_SLOTS, K, V, torch.float32, gen)
    cpool = torch.randn(NUM_SLOTS, W - 1 + num_spec, D, generator=gen)
    slots = torch.tensor([3, -1, 5], dtype=torch.int32)
    spec_slots = torch.tensor([[0, 1, 2], [-1, -1, -1], [6, 7, 8]], dtype=torch.int32)
    cu, accepted = packed([3, 1, 3]), torch.tensor([2, 1, 3], dtype=torch.int32)

    def step(dispatch_on_gpu):
        monkeypatch.setattr(dispatch, "_on_gpu", lambda t: dispatch_on_gpu)
        p, c = pool.clone(), cpool.clone()
        outs = [dispatch.dynamic_conv_step(x[:3], kernels[:3], c[:, : W - 1], slots)]
        outs.append(dispatch.gated_delta_rule_step(q[:3], k[:3], v[:3], a[:3], b[:3], A_log, dt_bias, p, slots))
        vs = dispatch.dynamic_conv_spec_decode(x, kernels, cu, c, spec_slots[:, 0], accepted)
        outs.append(vs)
        outs.append(dispatch.gated_delta_rule_spec_decode(
            q, k, vs.view(7, H, V), a, b, A_log, dt_bias, cu, p, spec_slots, accepted))
        outs.append(dispatch.gated_rmsnorm(outs[-1], z, w, 1e-5))
        return outs, p, c

    with host_syncs_forbidden():
        gpu_outs, gpu_pool, gpu_cpool = step(True)
    cpu_outs, cpu_pool, cpu_cpool = step(False)
    real = [0, 1, 2, 4, 5, 6]  # tokens of the unpadded sequences of the speculative step
    for i, (g_out, c_out) in enumerate(zip(gpu_outs, cpu_outs)):
        rows = [0, 2] if i < 2 else real
        assert_close(g_out[rows], c_out[rows], torch.float32, f"output {i}")
    assert_close(gpu_pool, cpu_pool, torch.float32, "recurrent states")
    assert_close(gpu_cpool, cpu_cpool, torch.float32, "conv histories")


def test_gpu_route_of_the_prefills_matches_the_cpu_route(monkeypatch):
    # The prefills as the JetBlock calls them (raw gates, conv histories and states from
    # pools, a padded sequence), routed as on a GPU (Triton, here interpreted) and on the
    # CPU: the same outputs and pools. chunk_size 16 crosses chunks within the short sequences.
    gen = torch.Generator().manual_seed(44)
    K, V, W = 16, 32, 4
    D = H * V
    lengths = [19, 3, 7]
    T = sum(lengths)
    q, k, _, _, _ = gdn_inputs((T,), K, V, torch.float32, gen)
    a, b = torch.randn(T, H, generator=gen), torch.randn(T, H, generator=gen)
    A_log, dt_bias = torch.rand(H, generator=gen), torch.randn(H, generator=gen)
    x, kernels = torch.randn(T, D, generator=gen), torch.randn(T, D, W, generator=gen)
    pool = state_pool(NUM_SLOTS, K, V, torch.float32, gen)
    cpool = torch.randn(NUM_SLOTS, W - 1, D, generator=gen)
    slots = torch.tensor([4, -1, 1], dtype=torch.int32)
    has = torch.tensor([True, True, False])
    cu = packed(lengths)

    def prefill(on_gpu):
        monkeypatch.setattr(dispatch, "_on_gpu", lambda t: on_gpu)
        p, c = pool.clone(), cpool.clone()
        vs = dispatch.dynamic_conv_prefill(x, kernels, cu, c, slots, has)
        o = dispatch.gated_delta_rule_prefill(q, k, vs.view(T, H, V), a, b, A_log, dt_bias, cu, p, slots, has,
                                              chunk_size=16)
        return [vs, o], p, c

    gpu_outs, gpu_pool, gpu_cpool = prefill(True)
    cpu_outs, cpu_pool, cpu_cpool = prefill(False)
    real = [*range(0, 19), *range(22, 29)]  # tokens of the unpadded sequences
    for i, (g_out, c_out) in enumerate(zip(gpu_outs, cpu_outs)):
        assert_close(g_out[real], c_out[real], torch.float32, f"output {i}")
    assert_close(gpu_pool, cpu_pool, torch.float32, "recurrent states")
    assert_close(gpu_cpool, cpu_cpool, torch.float32, "conv histories")


if RUN_IN_SUBPROCESS:
    report_from_subprocess(globals(), _SUBPROCESS_FLAG)
