"""The CPU implementations vLLM runs (chunked prefill, recurrent decode, dynamic conv)
against the naive definitions, on varlen batches reading and writing state pools."""

import subprocess
import sys

import pytest
import torch

from vllm_jetnemotron.kernels import (
    dynamic_causal_conv_naive,
    dynamic_conv_prefill,
    dynamic_conv_step,
    gated_rmsnorm,
    gated_rmsnorm_naive,
    naive_recurrent_gated_delta_rule,
)
from vllm_jetnemotron.kernels.gated_delta_rule.cpu import chunk_gated_delta_rule, fused_recurrent_gated_delta_rule

ATOL = {torch.float32: 1e-4, torch.bfloat16: 3e-2}


def gdr_inputs(T, H, K, V, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(T, H, K, generator=g).to(dtype)
    k = torch.randn(T, H, K, generator=g).to(dtype)
    v = torch.randn(T, H, V, generator=g).to(dtype)
    decay = -(torch.rand(T, H, generator=g) * 0.3)
    beta = torch.rand(T, H, generator=g)
    return q, k, v, decay, beta


def cu_seqlens(lengths):
    return torch.tensor([0] + lengths).cumsum(0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("K, V", [(16, 32), (96, 256)])
@pytest.mark.parametrize("lengths", [[1], [64], [5, 65, 130], [63, 1, 200]])
def test_chunked_prefill_matches_naive(lengths, K, V, dtype):
    H, slots = 2, 8
    q, k, v, g, beta = gdr_inputs(sum(lengths), H, K, V, dtype)
    pool = torch.randn(slots, H, K, V)
    initial = pool.clone()
    indices = torch.tensor([5, 0, 3][: len(lengths)])
    has_state = torch.tensor([True, False, True][: len(lengths)])
    cu = cu_seqlens(lengths)
    out = chunk_gated_delta_rule(q, k, v, g, beta, cu, pool, indices, has_state)
    assert out.dtype == dtype
    for i, slot in enumerate(indices.tolist()):
        s, e = cu[i], cu[i + 1]
        ref_out, ref_state = naive_recurrent_gated_delta_rule(
            q[None, s:e], k[None, s:e], v[None, s:e], g[None, s:e], beta[None, s:e],
            initial_state=initial[slot][None] if has_state[i] else None, output_final_state=True)
        torch.testing.assert_close(out[s:e].float(), ref_out[0].float(), atol=ATOL[dtype], rtol=0)
        torch.testing.assert_close(pool[slot], ref_state[0], atol=ATOL[torch.float32], rtol=0)
    untouched = [i for i in range(slots) if i not in indices.tolist()]
    assert torch.equal(pool[untouched], initial[untouched])


@pytest.mark.parametrize("tokens_per_seq", [1, 3])
def test_recurrent_decode_matches_naive(tokens_per_seq):
    N, H, K, V, L = 4, 2, 32, 64, tokens_per_seq
    q, k, v, g, beta = (x.view(N, L, *x.shape[1:]) for x in gdr_inputs(N * L, H, K, V, torch.float32))
    pool = torch.randn(10, H, K, V)
    initial = pool.clone()
    slots = torch.tensor([7, 2, 9, 0])
    out = fused_recurrent_gated_delta_rule(q, k, v, g, beta, pool, slots)
    ref_out, ref_state = naive_recurrent_gated_delta_rule(
        q, k, v, g, beta, initial_state=initial[slots], output_final_state=True)
    torch.testing.assert_close(out, ref_out, atol=1e-5, rtol=0)
    torch.testing.assert_close(pool[slots], ref_state, atol=1e-5, rtol=0)


def test_recurrent_decode_keeps_a_state_per_draft_token():
    N, H, K, V, L = 2, 2, 16, 32, 3
    q, k, v, g, beta = (x.view(N, L, *x.shape[1:]) for x in gdr_inputs(N * L, H, K, V, torch.float32))
    pool = torch.randn(8, H, K, V)
    initial = pool.clone()
    slots = torch.tensor([[1, 2, 3], [4, 5, 6]])
    fused_recurrent_gated_delta_rule(q, k, v, g, beta, pool, slots)
    for j in range(L):
        _, state = naive_recurrent_gated_delta_rule(
            q[:, : j + 1], k[:, : j + 1], v[:, : j + 1], g[:, : j + 1], beta[:, : j + 1],
            initial_state=initial[slots[:, 0]], output_final_state=True)
        torch.testing.assert_close(pool[slots[:, j]], state, atol=1e-5, rtol=0)


@pytest.mark.parametrize("lengths", [[1], [2, 9, 1], [40, 3]])
def test_dynamic_conv_prefill_matches_naive(lengths):
    D, W = 24, 4
    T = sum(lengths)
    x, kernels = torch.randn(T, D), torch.randn(T, D, W)
    pool = torch.randn(6, W - 1, D)
    initial = pool.clone()
    indices = torch.tensor([4, 1, 2][: len(lengths)])
    has_state = torch.tensor([True, False, True][: len(lengths)])
    cu = cu_seqlens(lengths)
    out = dynamic_conv_prefill(x, kernels, cu, pool, indices, has_state)
    for i, slot in enumerate(indices.tolist()):
        s, e = cu[i], cu[i + 1]
        ref_out, ref_state = dynamic_causal_conv_naive(
            x[None, s:e], kernels[None, s:e], initial[slot][None] if has_state[i] else None)
        torch.testing.assert_close(out[s:e], ref_out[0], atol=1e-6, rtol=0)
        torch.testing.assert_close(pool[slot], ref_state[0])


def test_dynamic_conv_step_matches_naive():
    N, D, W = 3, 16, 4
    x, kernels = torch.randn(N, D), torch.randn(N, D, W)
    pool = torch.randn(5, W - 1, D)
    initial = pool.clone()
    slots = torch.tensor([4, 0, 2])
    out = dynamic_conv_step(x, kernels, pool, slots)
    ref_out, ref_state = dynamic_causal_conv_naive(x[:, None], kernels[:, None], initial[slots])
    torch.testing.assert_close(out, ref_out[:, 0])
    torch.testing.assert_close(pool[slots], ref_state)


def test_gated_rmsnorm_definition():
    x, z, w = torch.randn(5, 2, 8), torch.randn(5, 2, 8), torch.rand(8)
    expected = x / (x.pow(2).mean(-1, keepdim=True) + 1e-5).sqrt() * w * z * torch.sigmoid(z)
    torch.testing.assert_close(gated_rmsnorm_naive(x, z, w, 1e-5), expected)
    torch.testing.assert_close(gated_rmsnorm(x, z, w, 1e-5), expected)


def test_routed_gated_rmsnorm_traces_in_one_graph_once_prepared():
    # vLLM compiles the model's forward in one graph (fullgraph), the JetBlock's gated
    # RMSNorm included: once `prepare_kernels` has resolved the device's implementations,
    # the routing is a dict lookup Dynamo follows (it does not trace into `importlib`).
    from vllm_jetnemotron import kernels as ops

    ops.dispatch.prepare_kernels("cpu")
    x, z, w = torch.randn(5, 2, 8), torch.randn(5, 2, 8), torch.rand(8)
    compiled = torch.compile(lambda x, z: ops.gated_rmsnorm(x, z, w, 1e-5), fullgraph=True, backend="eager")
    torch.testing.assert_close(compiled(x, z), gated_rmsnorm_naive(x, z, w, 1e-5))


def test_chunked_prefill_waves_and_unequal_lengths(monkeypatch):
    # Small waves: several chunk positions per wave, sequences finishing in different
    # waves (one empty), a partial last chunk; longest-first order inside the kernel.
    from vllm_jetnemotron.kernels.gated_delta_rule import cpu

    monkeypatch.setattr(cpu, "_WAVE_TOKENS", 96)
    lengths, H, K, V, C = [17, 0, 100, 1, 64, 33], 2, 16, 32, 16
    q, k, v, g, beta = gdr_inputs(sum(lengths), H, K, V, torch.float32, seed=3)
    pool = torch.randn(9, H, K, V)
    initial = pool.clone()
    indices = torch.tensor([8, 0, 3, 5, 1, 6])
    has_state = torch.tensor([True, True, False, True, False, True])
    cu = cu_seqlens(lengths)
    out = chunk_gated_delta_rule(q, k, v, g, beta, cu, pool, indices, has_state, chunk_size=C)
    for i, slot in enumerate(indices.tolist()):
        s, e = cu[i], cu[i + 1]
        ref_out, ref_state = naive_recurrent_gated_delta_rule(
            q[None, s:e], k[None, s:e], v[None, s:e], g[None, s:e], beta[None, s:e],
            initial_state=initial[slot][None] if has_state[i] else None, output_final_state=True)
        torch.testing.assert_close(out[s:e], ref_out[0], atol=1e-4, rtol=0)
        torch.testing.assert_close(pool[slot], ref_state[0], atol=1e-4, rtol=0)


@pytest.mark.parametrize("tokens_per_seq", [1, 3])
def test_recurrent_decode_in_several_blocks(monkeypatch, tokens_per_seq):
    # one sequence's state per block (as for the 2B heads), per-token slots when L > 1
    from vllm_jetnemotron.kernels.gated_delta_rule import cpu

    N, H, K, V, L = 3, 2, 16, 32, tokens_per_seq
    monkeypatch.setattr(cpu, "_BLOCK_BYTES", 4 * H * K * V)
    q, k, v, g, beta = (x.view(N, L, *x.shape[1:]) for x in gdr_inputs(N * L, H, K, V, torch.float32, seed=4))
    pool = torch.randn(12, H, K, V)
    initial = pool.clone()
    slots = torch.tensor([[7, 2, 9], [0, 4, 5], [11, 1, 3]])[:, :L] if L > 1 else torch.tensor([7, 0, 11])
    out = fused_recurrent_gated_delta_rule(q, k, v, g, beta, pool, slots)
    read = slots[:, 0] if L > 1 else slots
    ref_out, ref_state = naive_recurrent_gated_delta_rule(
        q, k, v, g, beta, initial_state=initial[read], output_final_state=True)
    torch.testing.assert_close(out, ref_out, atol=1e-5, rtol=0)
    torch.testing.assert_close(pool[slots[:, -1] if L > 1 else slots], ref_state, atol=1e-5, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dynamic_conv_prefill_in_blocks(monkeypatch, dtype):
    # 5-token blocks across sequence boundaries; sequences shorter than W - 1 and empty
    from vllm_jetnemotron.kernels.dynamic_conv import cpu

    D, W = 8, 4
    monkeypatch.setattr(cpu, "_BLOCK_BYTES", 5 * 4 * D * W)
    lengths = [2, 0, 13, 1, 7]
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(sum(lengths), D, generator=gen).to(dtype)
    kernels = torch.randn(sum(lengths), D, W, generator=gen).to(dtype)
    pool = torch.randn(6, W - 1, D, generator=gen)
    initial = pool.clone()
    indices = torch.tensor([4, 5, 1, 2, 0])
    has_state = torch.tensor([True, True, False, True, True])
    cu = cu_seqlens(lengths)
    out = dynamic_conv_prefill(x, kernels, cu, pool, indices, has_state)
    for i, slot in enumerate(indices.tolist()):
        s, e = cu[i], cu[i + 1]
        history = initial[slot] if has_state[i] else torch.zeros(W - 1, D)
        if e == s:  # nothing to convolve: the state is kept
            torch.testing.assert_close(pool[slot], history.to(dtype).float())
            continue
        ref_out, ref_state = dynamic_causal_conv_naive(x[None, s:e], kernels[None, s:e], history[None])
        torch.testing.assert_close(out[s:e], ref_out[0], atol=1e-6, rtol=0)
        torch.testing.assert_close(pool[slot], ref_state[0].float())


def test_dynamic_conv_compiled_pass_equals_the_eager_loop():
    # the Inductor pass used for bf16 prefills, against the tap-by-tap loop, bit for bit,
    # at two lengths (the second reuses the compiled code: the length is dynamic)
    from vllm_jetnemotron.kernels.dynamic_conv import cpu

    gen = torch.Generator().manual_seed(8)
    for T in (300, 47):
        x = torch.randn(T, 96, generator=gen).bfloat16()
        kernels = torch.randn(T, 96, 4, generator=gen).bfloat16()
        fast = cpu._convolve_packed_fast(x, kernels)
        assert fast is not None, "the compiled pass did not run"
        assert torch.equal(fast, cpu._convolve_packed_eager(x, kernels, exact_products=True))


def test_dynamic_conv_stays_eager_when_compilation_fails(monkeypatch):
    from vllm_jetnemotron.kernels.dynamic_conv import cpu

    def no_compiler(x, kernels):
        raise RuntimeError("no C++ compiler")

    compiled = [no_compiler]
    monkeypatch.setattr(cpu, "_compiled_convolve_packed", lambda: compiled)
    x, kernels = torch.randn(40, 16).bfloat16(), torch.randn(40, 16, 4).bfloat16()
    cu, pool = torch.tensor([0, 40]), torch.zeros(1, 3, 16)
    out = dynamic_conv_prefill(x, kernels, cu, pool, torch.tensor([0]), torch.tensor([False]))
    ref, _ = dynamic_causal_conv_naive(x[None], kernels[None], torch.zeros(1, 3, 16))
    torch.testing.assert_close(out, ref[0], atol=1e-6, rtol=0)
    assert compiled == [], "a failed compilation must switch the process to the eager loop"


@pytest.mark.parametrize("state_dtype", [torch.float32, torch.bfloat16])
def test_cpu_decode_fast_path_matches_the_pytorch_step(monkeypatch, state_dtype):
    # vLLM's C++ decode op (bf16 activations, a float32 or bfloat16 pool with a padded slot
    # stride as in vLLM's hybrid cache pages) against the PyTorch step from the same raw gates;
    # the op rounds beta and dt_bias to bf16, so states agree to ~1e-2 of their size, not 1e-5.
    import vllm._custom_ops  # noqa: F401  (loads torch.ops._C)

    from vllm_jetnemotron.kernels import gated_delta_rule_step
    from vllm_jetnemotron.kernels.gated_delta_rule import cpu

    N, H, K, V = 4, 3, 96, 256
    gen = torch.Generator().manual_seed(6)
    q, k = (torch.nn.functional.silu(torch.randn(N, H, K, generator=gen)).bfloat16() for _ in range(2))
    v = torch.randn(N, H, V, generator=gen).bfloat16()
    a, b = (torch.randn(N, H, generator=gen).bfloat16() for _ in range(2))
    A_log, dt_bias = torch.rand(H, generator=gen).mul(15).add(1).log(), torch.randn(H, generator=gen)
    pages = torch.randn(7, H * K * V + 64, generator=gen).to(state_dtype)
    pool = pages[:, 32: 32 + H * K * V].view(7, H, K, V)  # slot stride > H * K * V
    slots = torch.tensor([5, 0, 6, 2], dtype=torch.int32)
    assert cpu._cpu_decode_op(q, k, v, a, b, pool, slots) is not None
    fast_pages, slow_pages = pages.clone(), pages.clone()
    fast_pool, slow_pool = (p[:, 32: 32 + H * K * V].view(7, H, K, V) for p in (fast_pages, slow_pages))
    o_fast = gated_delta_rule_step(q, k, v, a, b, A_log, dt_bias, fast_pool, slots)
    monkeypatch.setenv(cpu.CPU_DECODE_OP_ENV, "0")
    assert cpu._cpu_decode_op(q, k, v, a, b, pool, slots) is None
    o_slow = gated_delta_rule_step(q, k, v, a, b, A_log, dt_bias, slow_pool, slots)
    assert o_fast.shape == o_slow.shape == (N, H, V) and o_fast.dtype == torch.bfloat16
    torch.testing.assert_close(o_fast.float(), o_slow.float(), atol=2e-2, rtol=2e-2)
    change = (slow_pool - pool).abs().max()
    assert (fast_pool - slow_pool).abs().max() < 1e-2 * change
    assert torch.equal(fast_pages[:, :32], pages[:, :32]) and torch.equal(fast_pages[:, 32 + H * K * V:],
                                                                          pages[:, 32 + H * K * V:])
    untouched = [1, 3, 4]
    assert torch.equal(fast_pool[untouched], pool[untouched])


# ----- the decode update op (C++), speculative steps, padded slots -------------------------


def conv_pool(num_slots, rows, D, dtype, dim_first, gen):
    """A conv-history pool `[num_slots, rows, D]` as the JetBlock sees vLLM's cache: slots
    inside larger pages, and in the "DS" layout a transposed view (channel stride != 1)."""
    if dim_first:  # stored [slots, D, rows], read through a transpose
        pages = torch.randn(num_slots, D * rows + 16, generator=gen).to(dtype)
        return pages, pages[:, 16:].view(num_slots, D, rows).transpose(1, 2)
    pages = torch.randn(num_slots, rows * D + 16, generator=gen).to(dtype)
    return pages, pages[:, 16:].view(num_slots, rows, D)


def use_eager_conv_update(monkeypatch):
    from vllm_jetnemotron.kernels.dynamic_conv import cpu

    monkeypatch.setattr(cpu, "conv_update_op", lambda: None)


def test_the_cpp_conv_update_is_built_and_used():
    from vllm_jetnemotron.kernels.dynamic_conv import cpu

    assert cpu.conv_update_op() is not None, "the C++ decode update did not build on this machine"
    x, kernels = torch.randn(2, 8).bfloat16(), torch.randn(2, 8, 4).bfloat16()
    assert cpu._update_in_cpp(x, kernels, torch.zeros(3, 3, 8).bfloat16(), torch.tensor([0, 2]), None, None) is not None


@pytest.mark.parametrize("implementation", ["cpp", "eager"])
@pytest.mark.parametrize("dtype, pool_dtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16),
                                               (torch.bfloat16, torch.float32)])
@pytest.mark.parametrize("dim_first", [False, True])
def test_dynamic_conv_step_in_vllm_pages_matches_naive(monkeypatch, implementation, dtype, pool_dtype, dim_first):
    if implementation == "eager":
        use_eager_conv_update(monkeypatch)
    gen = torch.Generator().manual_seed(11)
    N, D, W = 5, 200, 4  # D not a multiple of the op's channel block
    x = torch.randn(N, 3 * D, generator=gen).to(dtype)[:, D: 2 * D]  # a column slice, as of in_proj
    kernels = torch.randn(N, D, W, generator=gen).to(dtype)
    pages, pool = conv_pool(9, W - 1, D, pool_dtype, dim_first, gen)
    initial_pages, initial = pages.clone(), pool.clone()
    slots = torch.tensor([4, 0, 8, 2, 6], dtype=torch.int32)
    out = dynamic_conv_step(x, kernels, pool, slots)
    history = initial[slots.long()].to(dtype).float()
    ref_out, ref_state = dynamic_causal_conv_naive(x[:, None].float(), kernels[:, None].float(), history)
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=1e-2, rtol=1e-2)
    torch.testing.assert_close(out.float(), ref_out[:, 0], **tol)
    torch.testing.assert_close(pool[slots.long()].float(), ref_state.to(dtype).float())
    untouched = [1, 3, 5, 7]
    assert torch.equal(pool[untouched], initial[untouched])
    assert torch.equal(pages[:, :16], initial_pages[:, :16])


@pytest.mark.parametrize("implementation", ["cpp", "eager"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dynamic_conv_spec_decode_matches_naive(monkeypatch, implementation, dtype):
    # sequences verifying different numbers of drafts, each resuming after a different
    # accepted count: the output of each token, and buffer row j = the W - 1 inputs
    # ending at its token j
    if implementation == "eager":
        use_eager_conv_update(monkeypatch)
    from vllm_jetnemotron.kernels import dynamic_conv_spec_decode

    gen = torch.Generator().manual_seed(12)
    D, W, num_spec = 72, 4, 3
    rows = W - 1 + num_spec
    lengths, accepted = [4, 2, 1, 4], [1, 3, 2, 4]
    T = sum(lengths)
    x, kernels = torch.randn(T, D, generator=gen).to(dtype), torch.randn(T, D, W, generator=gen).to(dtype)
    pool = torch.randn(7, rows, D, generator=gen).to(dtype)
    initial = pool.clone()
    slots = torch.tensor([5, 0, 3, 6])
    cu = cu_seqlens(lengths)
    out = dynamic_conv_spec_decode(x, kernels, cu, pool, slots, torch.tensor(accepted))
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=1e-2, rtol=1e-2)
    for i, slot in enumerate(slots.tolist()):
        s, e = cu[i], cu[i + 1]
        history = initial[slot, accepted[i] - 1: accepted[i] - 1 + W - 1]
        ref_out, _ = dynamic_causal_conv_naive(x[None, s:e].float(), kernels[None, s:e].float(), history[None].float())
        torch.testing.assert_close(out[s:e].float(), ref_out[0], **tol)
        inputs = torch.cat([history, x[s:e]])
        for j in range(lengths[i]):
            assert torch.equal(pool[slot, j: j + W - 1], inputs[j + 1: j + W])
    assert torch.equal(pool[[1, 2, 4]], initial[[1, 2, 4]])


def test_varlen_drafts_match_the_recurrence_per_sequence():
    # one call for sequences of 3, 1 and 2 tokens (L = 3 slots each), from different
    # accepted counts: outputs and the state after every real token
    from vllm_jetnemotron.kernels import gated_delta_rule_gates, gated_delta_rule_spec_decode

    gen = torch.Generator().manual_seed(13)
    H, K, V = 2, 16, 32
    lengths, accepted = [3, 1, 2], torch.tensor([2, 1, 3])
    T = sum(lengths)
    q, k = (torch.randn(T, H, K, generator=gen) for _ in range(2))
    v = torch.randn(T, H, V, generator=gen)
    a, b = (torch.randn(T, H, generator=gen) for _ in range(2))
    A_log, dt_bias = torch.rand(H, generator=gen), torch.randn(H, generator=gen)
    pool = torch.randn(12, H, K, V, generator=gen)
    initial = pool.clone()
    slots = torch.tensor([[0, 1, 2], [3, 4, 5], [6, 7, 8]])
    cu = cu_seqlens(lengths)
    out = gated_delta_rule_spec_decode(q, k, v, a, b, A_log, dt_bias, cu, pool, slots, accepted)
    g, beta = gated_delta_rule_gates(a, b, A_log, dt_bias)
    for i in range(3):
        s, e = cu[i], cu[i + 1]
        start = initial[slots[i, accepted[i] - 1]][None]
        for j in range(lengths[i]):
            ref_out, ref_state = naive_recurrent_gated_delta_rule(
                *(x[None, s: s + j + 1] for x in (q, k, v, g, beta)), initial_state=start, output_final_state=True)
            torch.testing.assert_close(pool[slots[i, j]], ref_state[0], atol=1e-5, rtol=0)
        torch.testing.assert_close(out[s:e], ref_out[0], atol=1e-5, rtol=0)
    assert torch.equal(pool[9:], initial[9:])


def test_prefill_from_raw_gates_is_the_gates_then_the_chunked_kernel():
    # the routed prefill computes g, beta as the JetBlock did before calling the chunked
    # kernel (gated_delta_rule_gates, then chunks of 32): bit for bit the same outputs and states
    from vllm_jetnemotron.kernels import gated_delta_rule_gates, gated_delta_rule_prefill

    gen = torch.Generator().manual_seed(16)
    lengths, H, K, V = [37, 5], 2, 16, 32
    T = sum(lengths)
    q, k = (torch.randn(T, H, K, generator=gen).bfloat16() for _ in range(2))
    v = torch.randn(T, H, V, generator=gen).bfloat16()
    a, b = (torch.randn(T, H, generator=gen).bfloat16() for _ in range(2))
    A_log, dt_bias = torch.rand(H, generator=gen), torch.randn(H, generator=gen)
    pool = torch.randn(4, H, K, V, generator=gen)
    cu, slots, has_state = cu_seqlens(lengths), torch.tensor([3, 0]), torch.tensor([True, False])
    routed_pool, direct_pool = pool.clone(), pool.clone()
    out = gated_delta_rule_prefill(q, k, v, a, b, A_log, dt_bias, cu, routed_pool, slots, has_state)
    g, beta = gated_delta_rule_gates(a, b, A_log, dt_bias)
    expected = chunk_gated_delta_rule(q, k, v, g, beta, cu, direct_pool, slots, has_state, chunk_size=32)
    assert torch.equal(out, expected) and torch.equal(routed_pool, direct_pool)


PAD = -1  # vLLM's PAD_SLOT_ID


# every CPU entry point, with a padded sequence in the middle of the batch
# (the conv decode steps both in C++ and in the eager fallback)
PADDED_BATCH_CASES = ["conv_prefill", "conv_step", "conv_step_eager", "conv_spec", "conv_spec_eager",
                      "chunk_prefill", "recurrent_decode", "recurrent_drafts", "decode_with_cpp_op"]


@pytest.mark.parametrize("case", PADDED_BATCH_CASES)
def test_padded_slots_are_neither_read_nor_written(monkeypatch, case):
    # The same batch twice: with the middle sequence's slot set to PAD_SLOT_ID, the pool
    # must be bit-identical except for the real sequences' slots, and their outputs must
    # equal those of the batch without the padded sequence.
    import vllm._custom_ops  # noqa: F401  (loads torch.ops._C for the C++ decode op)

    if case.endswith("_eager"):
        use_eager_conv_update(monkeypatch)
        case = case.removesuffix("_eager")

    from vllm_jetnemotron import kernels as ops

    gen = torch.Generator().manual_seed(14)
    H, K, V, W, D = 2, 16, 32, 4, 64
    dtype = torch.bfloat16 if case == "decode_with_cpp_op" else torch.float32
    lengths = [3, 5, 2] if case.endswith("prefill") else [2, 2, 2] if case.endswith("spec") or case.endswith("drafts") else [1, 1, 1]
    T = sum(lengths)
    cu = cu_seqlens(lengths)
    conv = case.startswith("conv")
    rows = W - 1 + (1 if case == "conv_spec" else 0)
    pool = torch.randn(6, rows, D, generator=gen) if conv else torch.randn(6, H, K, V, generator=gen)
    x, kernels = torch.randn(T, D, generator=gen), torch.randn(T, D, W, generator=gen)
    q, k = (torch.randn(T, H, K, generator=gen).to(dtype) for _ in range(2))
    v = torch.randn(T, H, V, generator=gen).to(dtype)
    a, b = (torch.randn(T, H, generator=gen).to(dtype) for _ in range(2))
    A_log, dt_bias = torch.rand(H, generator=gen), torch.randn(H, generator=gen)
    has_state = torch.tensor([True, True, True])
    accepted = torch.tensor([1, 2, 2])

    def run(slots, pool, seqs):
        # the batch restricted to sequences `seqs` (their tokens and metadata)
        tok = torch.cat([torch.arange(cu[i], cu[i + 1]) for i in seqs])
        sub_cu = cu_seqlens([lengths[i] for i in seqs])
        sl = slots[seqs]
        if case == "conv_prefill":
            return ops.dynamic_conv_prefill(x[tok], kernels[tok], sub_cu, pool, sl, has_state[seqs])
        if case == "conv_step":
            return ops.dynamic_conv_step(x[tok], kernels[tok], pool, sl)
        if case == "conv_spec":
            return ops.dynamic_conv_spec_decode(x[tok], kernels[tok], sub_cu, pool, sl, accepted[seqs])
        if case == "chunk_prefill":
            return ops.gated_delta_rule_prefill(q[tok], k[tok], v[tok], a[tok], b[tok], A_log, dt_bias, sub_cu, pool,
                                                sl, has_state[seqs])
        if case in ("recurrent_decode", "decode_with_cpp_op"):
            return ops.gated_delta_rule_step(q[tok], k[tok], v[tok], a[tok], b[tok], A_log, dt_bias, pool, sl)
        return ops.gated_delta_rule_spec_decode(q[tok], k[tok], v[tok], a[tok], b[tok], A_log, dt_bias, sub_cu, pool,
                                                sl, accepted[seqs])

    slots = torch.tensor([[4, 0], [PAD, PAD], [1, 5]]) if case == "recurrent_drafts" else torch.tensor([4, PAD, 1])
    if case == "decode_with_cpp_op":
        pool = pool.float()
    padded_pool, reference_pool = pool.clone(), pool.clone()
    out = run(slots, padded_pool, [0, 1, 2])
    ref = run(slots, reference_pool, [0, 2])
    # A padded batch never reaches vLLM's C++ decode op (it does not skip negative slots):
    # the PyTorch step runs instead, so that case agrees with the unpadded run (which
    # uses the op) to the op's bf16 roundings, not bit for bit.
    tol = dict(atol=3e-2, rtol=3e-2) if case == "decode_with_cpp_op" else dict(atol=0, rtol=0)
    torch.testing.assert_close(padded_pool, reference_pool, **tol)
    real = torch.cat([torch.arange(cu[0], cu[1]), torch.arange(cu[2], cu[3])])
    torch.testing.assert_close(out[real].float(), ref.float(), **tol)
    changed = (padded_pool != pool).flatten(1).any(1)
    assert changed[slots[[0, 2]].flatten()].all() and not changed[[2, 3]].any()


@pytest.mark.parametrize("with_initial_state", [False, True])
def test_training_chunked_form_matches_the_definition_with_gradients(with_initial_state):
    # the form the converter trains with on the CPU (and the GPU backward recomputes):
    # outputs, final states and every gradient equal autograd through the token loop
    from vllm_jetnemotron.kernels.gated_delta_rule.naive import chunked_gated_delta_rule

    B, T, H, K, V = 2, 37, 2, 16, 32  # 3 chunks of 16, the last one partial
    q, k, v, g, beta = (x.view(B, T, *x.shape[1:]) for x in gdr_inputs(B * T, H, K, V, torch.float32, seed=15))
    h0 = torch.randn(B, H, K, V) if with_initial_state else None
    leaves = [q, k, v, g, beta] + ([h0] if h0 is not None else [])
    weights = torch.randn(B, T, H, V), torch.randn(B, H, K, V)

    def grads(fn):
        inputs = [x.detach().clone().requires_grad_() for x in leaves]
        o, state = fn(*inputs[:5], inputs[5] if h0 is not None else None)
        ((o * weights[0]).sum() + (state * weights[1]).sum()).backward()
        return o, state, [x.grad for x in inputs]

    o, state, got = grads(lambda *a: chunked_gated_delta_rule(*a, chunk_size=16))
    o_ref, state_ref, expected = grads(lambda q, k, v, g, beta, h: naive_recurrent_gated_delta_rule(
        q, k, v, g, beta, initial_state=h, output_final_state=True))
    torch.testing.assert_close(o, o_ref, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(state, state_ref, atol=1e-4, rtol=1e-4)
    for name, x, y in zip(["q", "k", "v", "g", "beta", "initial_state"], got, expected):
        torch.testing.assert_close(x, y, atol=1e-3, rtol=1e-3, msg=lambda m, n=name: f"d{n}: {m}")


DISPATCH_ON_CPU = """
import sys
import torch
from vllm_jetnemotron import kernels as ops

q, k = torch.randn(5, 2, 16), torch.randn(5, 2, 16)
v, a, b = torch.randn(5, 2, 32), torch.randn(5, 2), torch.randn(5, 2)
A_log, dt_bias = torch.rand(2), torch.randn(2)
cu, slots, has = torch.tensor([0, 2, 5]), torch.tensor([1, 0]), torch.tensor([True, False])
pool, conv_pool = torch.randn(3, 2, 16, 32), torch.randn(3, 3, 64)
x, kernels = torch.randn(5, 64), torch.randn(5, 64, 4)
ops.gated_delta_rule_prefill(q, k, v, a, b, A_log, dt_bias, cu, pool, slots, has)
ops.gated_delta_rule_step(q[:2], k[:2], v[:2], a[:2], b[:2], A_log, dt_bias, pool, slots)
ops.gated_delta_rule_spec_decode(q, k, v, a, b, A_log, dt_bias, cu, pool, torch.tensor([[0, 1, 2], [0, 1, 2]]),
                                 torch.tensor([1, 1]))
ops.dynamic_conv_prefill(x, kernels, cu, conv_pool, slots, has)
ops.dynamic_conv_step(x[:2], kernels[:2], conv_pool, slots)
ops.dynamic_conv_spec_decode(x[:2], kernels[:2], torch.tensor([0, 1, 2]), conv_pool, slots, torch.tensor([1, 1]))
ops.gated_rmsnorm(v, v, torch.ones(32), 1e-6)
for op in ops.dispatch.ROUTES:  # the whole CPU column
    ops.dispatch.implementation(op, on_gpu=False)
print(sorted(m for m in ("triton", "vllm") if m in sys.modules))
"""


def test_cpu_tensors_never_import_triton_or_vllm():
    # The contract of `kernels.dispatch`: every routed op on CPU tensors runs the CPU
    # implementation, so a CPU-only install needs no triton, and the kernels never import
    # vLLM (the CPU decode op is reached through torch.ops only once vLLM has loaded it).
    result = subprocess.run([sys.executable, "-c", DISPATCH_ON_CPU], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().splitlines()[-1] == "[]"


def test_every_route_names_a_function_taking_the_operations_arguments():
    # `dispatch.ROUTES`, both columns, read from the sources (nothing imported, so the GPU
    # column is checked without triton): each "module:function" is a top-level function of
    # that module with the parameters of the routed function of the same name, which the
    # kernels package exports.
    import ast
    import inspect
    from pathlib import Path

    from vllm_jetnemotron import kernels as ops

    root = Path(ops.__file__).parent
    for op, column in ops.dispatch.ROUTES.items():
        routed = getattr(ops.dispatch, op)
        assert op in ops.__all__ and getattr(ops, op) is routed, op
        expected = list(inspect.signature(routed).parameters)
        for path in column:
            module, name = path.split(":")
            tree = ast.parse((root / (module.replace(".", "/") + ".py")).read_text())
            found = [node for node in tree.body if isinstance(node, ast.FunctionDef) and node.name == name]
            assert found, f"{op}: no function {name} in {module}"
            assert [arg.arg for arg in found[0].args.args] == expected, f"{op}: {path} takes other arguments"
