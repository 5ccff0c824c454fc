"""The CPU implementations vLLM runs (chunked prefill, recurrent decode, dynamic conv)
against the naive definitions, on varlen batches reading and writing state pools."""

import pytest
import torch

from vllm_jetnemotron.kernels import (
    chunk_gated_delta_rule,
    dynamic_causal_conv,
    dynamic_causal_conv_naive,
    dynamic_causal_conv_step,
    fused_recurrent_gated_delta_rule,
    gated_rmsnorm,
    gated_rmsnorm_naive,
    naive_recurrent_gated_delta_rule,
)

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
    out = dynamic_causal_conv(x, kernels, cu, pool, indices, has_state)
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
    out = dynamic_causal_conv_step(x, kernels, pool, slots)
    ref_out, ref_state = dynamic_causal_conv_naive(x[:, None], kernels[:, None], initial[slots])
    torch.testing.assert_close(out, ref_out[:, 0])
    torch.testing.assert_close(pool[slots], ref_state)


def test_gated_rmsnorm_definition():
    x, z, w = torch.randn(5, 2, 8), torch.randn(5, 2, 8), torch.rand(8)
    expected = x / (x.pow(2).mean(-1, keepdim=True) + 1e-5).sqrt() * w * z * torch.sigmoid(z)
    torch.testing.assert_close(gated_rmsnorm_naive(x, z, w, 1e-5), expected)
    torch.testing.assert_close(gated_rmsnorm(x, z, w, 1e-5), expected)


def test_chunked_prefill_waves_and_unequal_lengths(monkeypatch):
    # Small waves: several chunk positions per wave, sequences finishing in different
    # waves (one empty), a partial last chunk; longest-first order inside the kernel.
    from vllm_jetnemotron.kernels.gated_delta_rule import chunk

    monkeypatch.setattr(chunk, "_WAVE_TOKENS", 96)
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
    from vllm_jetnemotron.kernels.gated_delta_rule import fused_recurrent

    N, H, K, V, L = 3, 2, 16, 32, tokens_per_seq
    monkeypatch.setattr(fused_recurrent, "_BLOCK_BYTES", 4 * H * K * V)
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
    out = dynamic_causal_conv(x, kernels, cu, pool, indices, has_state)
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
    out = dynamic_causal_conv(x, kernels, cu, pool, torch.tensor([0]), torch.tensor([False]))
    ref, _ = dynamic_causal_conv_naive(x[None], kernels[None], torch.zeros(1, 3, 16))
    torch.testing.assert_close(out, ref[0], atol=1e-6, rtol=0)
    assert compiled == [], "a failed compilation must switch the process to the eager loop"


def test_cpu_decode_fast_path_matches_the_pytorch_step(monkeypatch):
    # vLLM's C++ decode op (bf16 activations, float32 pool with a padded slot stride as in
    # vLLM's hybrid cache pages) against the PyTorch step from the same raw gates; the op
    # rounds beta and dt_bias to bf16, so states agree to ~1e-2 of their size, not 1e-5.
    import vllm._custom_ops  # noqa: F401  (loads torch.ops._C)

    from vllm_jetnemotron import jet_ops

    N, H, K, V = 4, 3, 96, 256
    gen = torch.Generator().manual_seed(6)
    q, k = (torch.nn.functional.silu(torch.randn(N, H, K, generator=gen)).bfloat16() for _ in range(2))
    v = torch.randn(N, H, V, generator=gen).bfloat16()
    a, b = (torch.randn(N, H, generator=gen).bfloat16() for _ in range(2))
    A_log, dt_bias = torch.rand(H, generator=gen).mul(15).add(1).log(), torch.randn(H, generator=gen)
    pages = torch.randn(7, H * K * V + 64, generator=gen)
    pool = pages[:, 32: 32 + H * K * V].view(7, H, K, V)  # slot stride > H * K * V
    slots = torch.tensor([5, 0, 6, 2], dtype=torch.int32)
    assert jet_ops._cpu_decode_op_applies(q, k, v, a, b, pool, slots)
    fast_pages, slow_pages = pages.clone(), pages.clone()
    fast_pool, slow_pool = (p[:, 32: 32 + H * K * V].view(7, H, K, V) for p in (fast_pages, slow_pages))
    o_fast = jet_ops.gated_delta_rule_decode(q, k, v, a, b, A_log, dt_bias, fast_pool, slots)
    monkeypatch.setenv(jet_ops.CPU_DECODE_OP_ENV, "0")
    assert not jet_ops._cpu_decode_op_applies(q, k, v, a, b, pool, slots)
    o_slow = jet_ops.gated_delta_rule_decode(q, k, v, a, b, A_log, dt_bias, slow_pool, slots)
    assert o_fast.shape == o_slow.shape == (N, H, V) and o_fast.dtype == torch.bfloat16
    torch.testing.assert_close(o_fast.float(), o_slow.float(), atol=2e-2, rtol=2e-2)
    change = (slow_pool - pool).abs().max()
    assert (fast_pool - slow_pool).abs().max() < 1e-2 * change
    assert torch.equal(fast_pages[:, :32], pages[:, :32]) and torch.equal(fast_pages[:, 32 + H * K * V:],
                                                                          pages[:, 32 + H * K * V:])
    untouched = [1, 3, 4]
    assert torch.equal(fast_pool[untouched], pool[untouched])
