"""The Triton kernels against their naive references, on the CPU under Triton's
interpreter: chunked and recurrent gated delta rule, dynamic causal conv (prefill,
decode step and speculative step), gated RMSNorm, the training autograd functions, and
the device dispatch (`kernels.dispatch` routed as on a GPU against its CPU route).

The comparisons with the PyTorch definitions are the `*_vs_definition` checks of
bench/kernel_checks.py (the ones bench/gpu_check.py runs on CUDA at the Jet-Nemotron
shapes), here at small shapes on CPU tensors; each raises `CheckFailed` (an
AssertionError) naming what disagreed. Grid: head dims (K, V) in {(16, 32), (32, 64)}
plus one (96, 256) case; packed sequences of lengths 1, 5, 64, 65, 130 (crossing the
64-token chunks); with and without initial states; float32 and bfloat16 inputs (and
state pools). Shapes are small: the interpreter runs every program one after another in
NumPy.

The tests run once in a pytest subprocess on this file with TRITON_INTERPRET=1, and
each test of the main process reports its outcome from there (tests/fresh_interpreter.py).
"""

import contextlib
import os

import pytest
import torch
import triton.language as tl
from fresh_interpreter import in_subprocess, report_from_subprocess
from triton.runtime.jit import JITFunction

from vllm_jetnemotron.kernels import dispatch
from vllm_jetnemotron.kernels.dynamic_conv import triton_conv
from vllm_jetnemotron.kernels.dynamic_conv.naive import dynamic_causal_conv_naive
from vllm_jetnemotron.kernels.gated_delta_rule import triton_chunk
from vllm_jetnemotron.kernels.gated_delta_rule import triton_fused_recurrent as triton_recurrent
from vllm_jetnemotron.kernels.gated_delta_rule.naive import naive_recurrent_gated_delta_rule

import kernel_checks as kc  # bench/, on the path from conftest.py

# Every test of this module runs once in a fresh interpreter (a pytest subprocess on this
# file, TRITON_INTERPRET=1) and each test here reports its own outcome from that run.
_SUBPROCESS_FLAG = "JETNEMOTRON_TRITON_TESTS_IN_SUBPROCESS"
RUN_IN_SUBPROCESS = not in_subprocess(_SUBPROCESS_FLAG)
if not RUN_IN_SUBPROCESS:
    assert os.environ.get("TRITON_INTERPRET") == "1" and not isinstance(tl.sigmoid, JITFunction)


CPU = torch.device("cpu")
F32 = torch.float32
# Tolerances (kc.DEFINITION_TOL, kc.GRAD_TOL), outputs compared in float32. float32:
# chunked vs token-by-token summation order. bfloat16: inputs are the same bf16 values on
# both sides and all math is float32, so the difference is the final rounding: the
# interpreter truncates float32 -> bf16 where PyTorch (and the GPU) rounds to nearest,
# i.e. up to 1 ulp (2^-7 relative) apart. Gradients of bf16 leaves are bf16-rounded
# float32 gradients; float32 gradients go through the chunked recomputation (vs the token
# loop), summation order only.
DTYPES = [torch.float32, torch.bfloat16]
TOL = kc.DEFINITION_TOL[F32]
NUM_SLOTS = kc.TEST_NUM_SLOTS
HEAD_DIMS = [(16, 32), (32, 64)]
H = 2


def has_state(with_initial_state):
    return kc.TEST_HAS_STATE if with_initial_state else [False] * len(kc.TEST_SEQ_LENS)


# ----- chunked gated delta rule (prefill) ------------------------------------------------


def check_chunk(K, V, dtype, with_initial_state, chunk_size=64, strided=False):
    # sequences of kc.TEST_SEQ_LENS in kc.TEST_SLOTS of a pool of NUM_SLOTS states in dtype
    kc.chunk_vs_definition(CPU, H, K, V, kc.TEST_SEQ_LENS, dtype, kc.TEST_SLOTS, has_state(with_initial_state),
                           NUM_SLOTS, chunk_size=chunk_size, strided_pool=strided, pool_dtype=dtype,
                           seed=K * 1000 + V)


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
    # 3 sequences of L tokens, one slot each, one of them starting from a zero state;
    # L = 3 on a strided pool
    kc.recurrent_vs_definition(CPU, 3, L, H, K, V, dtype, slots=[6, 4, 1], num_slots=NUM_SLOTS, zero_slots=[4],
                               pool_dtype=dtype, strided_pool=L == 3, seed=7 * K + V + L)


@pytest.mark.parametrize("accepted", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
def test_fused_recurrent_spec_decode_matches_naive(dtype, accepted):
    # [N, L] slots: read from [:, 0] (or the last accepted token's slot), state after
    # token j written to [:, j]; Triton and the PyTorch decode step against naive.
    N, L = 3, 4
    slots = (torch.arange(N * L).view(N, L) + 2).tolist()  # pool slots 2 .. 13 of 15
    for implementation in ("triton", "cpu"):
        kc.recurrent_vs_definition(CPU, N, L, H, 16, 32, dtype, spec=True, slots=slots, num_slots=N * L + 3,
                                   num_accepted=[1, 3, 4] if accepted else None, pool_dtype=dtype,
                                   implementation=implementation, seed=11 + accepted)


@pytest.mark.parametrize("dtype", DTYPES)
def test_fused_recurrent_from_gates_matches_naive(dtype):
    # from the raw gates, 2 tokens per sequence, slot 0 a real one; Triton and the PyTorch step
    for implementation in ("triton", "cpu"):
        kc.recurrent_vs_definition(CPU, 3, 2, H, 32, 64, dtype, gates=True, slots=[3, 8, 0], num_slots=NUM_SLOTS,
                                   pool_dtype=dtype, implementation=implementation, seed=5)


# ----- dynamic causal conv ----------------------------------------------------------------


@pytest.mark.parametrize("W", [4, 3])
@pytest.mark.parametrize("with_initial_state", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
def test_dynamic_causal_conv_matches_naive(dtype, with_initial_state, W):
    kc.conv_vs_definition(CPU, 48, W, kc.TEST_SEQ_LENS, dtype, kc.TEST_SLOTS, has_state(with_initial_state),
                          NUM_SLOTS, seed=W)


@pytest.mark.parametrize("dtype", DTYPES)
def test_dynamic_causal_conv_step_matches_naive(dtype):
    kc.conv_step_vs_definition(CPU, N=3, D=40, W=4, steps=3, dtype=dtype, seed=3)


@pytest.mark.parametrize("dtype", DTYPES)
def test_dynamic_causal_conv_spec_decode_matches_naive(dtype):
    # sequences of 3, 1, 2 and 2 tokens resuming after different accepted counts, the third padded
    kc.conv_spec_vs_definition(CPU, [3, 1, 2, 2], num_spec=2, D=40, W=4, dtype=dtype, accepted=[2, 1, 3, 1], seed=4)


# ----- gated RMSNorm ----------------------------------------------------------------------


@pytest.mark.parametrize("V", [32, 96, 256])
@pytest.mark.parametrize("dtype", DTYPES)
def test_gated_rmsnorm_matches_naive(dtype, V):
    kc.rmsnorm_vs_definition(CPU, 7, H, V, dtype, seed=V)


# ----- padding slots ------------------------------------------------------------------------


def test_negative_slots_are_neither_read_nor_written():
    # vLLM pads batches with PAD_SLOT_ID = -1: zero state in, nothing written.
    gen = kc.generator(0)
    K, V, D, W = 16, 32, 24, 4
    q, k, v, g, beta = kc.gdn_inputs((2, 1), H, K, V, F32, gen, CPU)
    pool = kc.random_pool(4, H, K, V, gen, CPU)
    before = pool.clone()
    o = triton_recurrent.fused_recurrent_gated_delta_rule(q, k, v, g, beta, pool, torch.tensor([-1, 2]))
    o_ref, _ = naive_recurrent_gated_delta_rule(q[:1], k[:1], v[:1], g[:1], beta[:1])
    kc.compare("o of the padded sequence", o[:1], o_ref, **TOL)
    kc.unchanged("pool rows of no sequence", pool[[0, 1, 3]], before[[0, 1, 3]])

    # [2, 1, H, D] -> 5 tokens of the first sequence: [5, H, D]
    q5, k5, v5, g5, b5 = (t[:1, 0].expand(5, *t.shape[2:]) for t in (q, k, v, g, beta))
    before = pool.clone()
    o = triton_chunk.chunk_gated_delta_rule(q5, k5, v5, g5, b5, kc.cu_seqlens([5], CPU), pool, torch.tensor([-1]),
                                            torch.tensor([True]))
    o_ref, _ = naive_recurrent_gated_delta_rule(q5[None], k5[None], v5[None], g5[None], b5[None])
    kc.compare("chunk o of the padded sequence", o, o_ref[0], **TOL)
    kc.unchanged("the pool after a padded prefill", pool, before)

    cpool = torch.randn(3, D, W - 1, generator=gen).transpose(1, 2)  # time-first view of a dim-first cache
    cbefore = cpool.clone()
    x, kern = torch.randn(2, D, generator=gen), torch.randn(2, D, W, generator=gen)
    out = triton_conv.dynamic_causal_conv_step(x, kern, cpool, torch.tensor([-1, 1]))
    out_ref, _ = dynamic_causal_conv_naive(x[None, :1], kern[None, :1])
    kc.compare("conv out of the padded sequence", out[:1], out_ref[0], **TOL)
    triton_conv.dynamic_causal_conv(x, kern, kc.cu_seqlens([2], CPU), cpool, torch.tensor([-1]), torch.tensor([True]))
    kc.unchanged("conv pool rows of no sequence", cpool[[0, 2]], cbefore[[0, 2]])


# ----- training: autograd functions ---------------------------------------------------------


@pytest.mark.parametrize("with_initial_state", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
def test_chunk_gated_delta_rule_autograd_matches_naive(dtype, with_initial_state):
    kc.chunk_autograd_vs_definition(CPU, 2, 70, H, 16, 32, dtype, with_initial_state=with_initial_state, seed=21)


def test_chunk_gated_delta_rule_autograd_varlen_matches_naive():
    lengths = [5, 65, 1]
    kc.chunk_autograd_vs_definition(CPU, 1, sum(lengths), H, 16, 32, F32, lengths=lengths, seed=22)


@pytest.mark.parametrize("with_initial_state", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
def test_dynamic_causal_conv_autograd_matches_naive(dtype, with_initial_state):
    kc.conv_autograd_vs_definition(CPU, 2, 70, 24, 4, dtype, with_initial_state=with_initial_state, seed=31)


def test_dynamic_causal_conv_autograd_varlen_matches_naive():
    lengths = [2, 1, 66, 5]
    kc.conv_autograd_vs_definition(CPU, 1, sum(lengths), 24, 4, F32, lengths=lengths, seed=32)


# ----- the dispatch routed as on a GPU against its CPU route -------------------------------


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
    gen = kc.generator(43)
    K, V, W, num_spec = 16, 32, 4, 2
    D = H * V
    q, k, v, _, _ = kc.gdn_inputs((7,), H, K, V, F32, gen, CPU)
    a, b, A_log, dt_bias = kc.gate_inputs((7,), H, F32, gen, CPU)
    x, kernels = torch.randn(7, D, generator=gen), torch.randn(7, D, W, generator=gen)
    z, w = torch.randn(7, H, V, generator=gen), torch.randn(V, generator=gen)
    pool = kc.random_pool(NUM_SLOTS, H, K, V, gen, CPU)
    cpool = torch.randn(NUM_SLOTS, W - 1 + num_spec, D, generator=gen)
    slots = torch.tensor([3, -1, 5], dtype=torch.int32)
    spec_slots = torch.tensor([[0, 1, 2], [-1, -1, -1], [6, 7, 8]], dtype=torch.int32)
    cu, accepted = kc.cu_seqlens([3, 1, 3], CPU), torch.tensor([2, 1, 3], dtype=torch.int32)

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
        kc.compare(f"output {i}", g_out[rows], c_out[rows], **TOL)
    kc.compare("recurrent states", gpu_pool, cpu_pool, **TOL)
    kc.compare("conv histories", gpu_cpool, cpu_cpool, **TOL)


def test_gpu_route_of_the_prefills_matches_the_cpu_route_without_host_syncs(monkeypatch):
    # The prefills as the JetBlock calls them (raw gates, conv histories and states from
    # pools, a padded sequence, the host's bound on the lengths), routed as on a GPU (Triton,
    # here interpreted; no host sync) and on the CPU: the same outputs and pools.
    # chunk_size 16 crosses chunks within the short sequences.
    gen = kc.generator(44)
    K, V, W = 16, 32, 4
    D = H * V
    lengths = [19, 3, 7]
    T = sum(lengths)
    q, k, _, _, _ = kc.gdn_inputs((T,), H, K, V, F32, gen, CPU)
    a, b, A_log, dt_bias = kc.gate_inputs((T,), H, F32, gen, CPU)
    x, kernels = torch.randn(T, D, generator=gen), torch.randn(T, D, W, generator=gen)
    pool = kc.random_pool(NUM_SLOTS, H, K, V, gen, CPU)
    cpool = torch.randn(NUM_SLOTS, W - 1, D, generator=gen)
    slots = torch.tensor([4, -1, 1], dtype=torch.int32)
    has = torch.tensor([True, True, False])
    cu = kc.cu_seqlens(lengths, CPU)

    def prefill(on_gpu):
        monkeypatch.setattr(dispatch, "_on_gpu", lambda t: on_gpu)
        p, c = pool.clone(), cpool.clone()
        vs = dispatch.dynamic_conv_prefill(x, kernels, cu, c, slots, has, max_seqlen=max(lengths) + 5)
        o = dispatch.gated_delta_rule_prefill(q, k, vs.view(T, H, V), a, b, A_log, dt_bias, cu, p, slots, has,
                                              chunk_size=16)
        return [vs, o], p, c

    with host_syncs_forbidden():
        gpu_outs, gpu_pool, gpu_cpool = prefill(True)
    cpu_outs, cpu_pool, cpu_cpool = prefill(False)
    real = [*range(0, 19), *range(22, 29)]  # tokens of the unpadded sequences
    for i, (g_out, c_out) in enumerate(zip(gpu_outs, cpu_outs)):
        kc.compare(f"output {i}", g_out[real], c_out[real], **TOL)
    kc.compare("recurrent states", gpu_pool, cpu_pool, **TOL)
    kc.compare("conv histories", gpu_cpool, cpu_cpool, **TOL)


if RUN_IN_SUBPROCESS:
    report_from_subprocess(globals(), _SUBPROCESS_FLAG)
