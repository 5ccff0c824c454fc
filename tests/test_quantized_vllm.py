"""Quantized checkpoints (`jet-nemotron-convert quantize`, compressed-tensors) served by
vLLM with its CPU kernels (int8 W8A8: CPUInt8ScaledMMLinearKernel; W4A16:
CPUWNA16LinearKernel): logits against the reference model run on the weights dequantized
by compressed-tensors itself (it never sees the packed format), engine behaviours, tensor
parallelism."""

import pytest
import torch

from conftest import as_inputs, greedy, openai_client, random_prompts, running_llm, serving, token_ids
from test_quantize import CONFIG
from vllm_jetnemotron.converter.modeling import JetNemotronForCausalLM
from vllm_jetnemotron.converter.quantize import GROUP_SIZES, KERNEL_TILE, dequantized_state_dict, quantize_checkpoint
from vllm_jetnemotron.converter.random_checkpoint import preset_config, write_random_checkpoint

SCHEMES = ("w8a8", "w4a16")
# 300 tokens span three prefill chunks of MAX_BATCHED_TOKENS; 700 share a cached prefix.
PROMPT_LENGTHS = [1, 17, 70, 300]
MAX_BATCHED_TOKENS = 128
TOP_LOGITS = 20
# Max |logit diff| over the top 20 of the last prompt position, vLLM (bf16 activations;
# int8 dynamic per-token activations for w8a8) against the float32 reference on the
# dequantized weights; measured up to 0.027 (logits of this model span about +-1.4).
LOGIT_ATOL = 0.08


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict:
    """The bf16 source (dims that fit the 4-bit kernel's group and size rules) and its
    quantized folders."""
    root = tmp_path_factory.mktemp("quantized")
    source = write_random_checkpoint(root / "bf16", preset_config("small", **CONFIG), seed=0)
    return {"bf16": source, **{s: quantize_checkpoint(source, root / s, s) for s in SCHEMES}}


@pytest.fixture(scope="module")
def prompts():
    return random_prompts(PROMPT_LENGTHS, seed=3, vocab=CONFIG["vocab_size"])


@pytest.fixture(scope="module", params=SCHEMES)
def scheme_run(request, checkpoints, prompts):
    """(scheme, engine outputs of the batch, the same prompts one at a time, a second
    batch over cached prefixes, reference last-position logits on dequantized weights)."""
    scheme = request.param
    reference = JetNemotronForCausalLM.from_pretrained(checkpoints["bf16"], dtype=torch.float32).eval()
    reference.load_state_dict(dequantized_state_dict(checkpoints[scheme], torch.float32), strict=True)
    with torch.no_grad():
        reference_logits = [reference(torch.tensor([p])).logits[0, -1] for p in prompts]
    shared = random_prompts([700], seed=4, vocab=CONFIG["vocab_size"])[0]
    cached = [shared + p for p in prompts[:2]]
    with running_llm(str(checkpoints[scheme]), dtype="bfloat16", logprobs_mode="raw_logits",
                     max_logprobs=TOP_LOGITS, max_num_batched_tokens=MAX_BATCHED_TOKENS) as llm:
        batch = llm.generate(as_inputs(prompts), greedy(8, logprobs=TOP_LOGITS))
        singles = [token_ids(llm.generate(as_inputs([p]), greedy(8)))[0] for p in prompts]
        llm.generate(as_inputs(cached[:1]), greedy(1))
        cached_outputs = llm.generate(as_inputs(cached), greedy(8))
        llm.reset_prefix_cache()
        uncached = token_ids(llm.generate(as_inputs(cached), greedy(8)))
    return scheme, batch, singles, (cached_outputs, uncached), reference_logits


def assert_logits_match(outputs, reference_logits, label: str) -> None:
    for output, logits, n in zip(outputs, reference_logits, PROMPT_LENGTHS):
        first_step = output.outputs[0].logprobs[0]  # raw logits, top 20
        ids = torch.tensor(list(first_step))
        diff = (torch.tensor([first_step[i].logprob for i in ids.tolist()]) - logits[ids]).abs().max().item()
        assert diff < LOGIT_ATOL, f"{label}, prompt of {n} tokens: max |logit diff| {diff:.3f}"
        top2 = logits.topk(2).values
        if top2[0] - top2[1] > 2 * LOGIT_ATOL:  # a clear winner: the greedy token agrees
            assert output.outputs[0].token_ids[0] == logits.argmax().item(), f"{label}, {n} tokens"


def test_logits_match_reference_on_dequantized_weights(scheme_run):
    scheme, batch, _, _, reference_logits = scheme_run
    assert_logits_match(batch, reference_logits, scheme)


def test_batching_chunked_prefill_and_prefix_caching(scheme_run):
    scheme, batch, singles, (cached_outputs, uncached), _ = scheme_run
    assert token_ids(batch) == singles, scheme  # mixed lengths in one batch, 300 tokens in 3 chunks
    assert all(o.num_cached_tokens > 0 for o in cached_outputs), [o.num_cached_tokens for o in cached_outputs]
    assert token_ids(cached_outputs) == uncached, scheme


def test_tensor_parallel_matches_reference(scheme_run, checkpoints, prompts, monkeypatch):
    """TP=2 shards the quantized weights and their scales; w8a8's per-token activation scales
    then cover each rank's slice, so its tokens may part from TP=1's where this random model's
    logits are nearly tied: the logits are what is checked."""
    scheme, _, _, _, reference_logits = scheme_run
    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "0|1")
    with running_llm(str(checkpoints[scheme]), dtype="bfloat16", tensor_parallel_size=2,
                     distributed_executor_backend="mp", logprobs_mode="raw_logits",
                     max_logprobs=TOP_LOGITS) as llm:
        outputs = llm.generate(as_inputs(prompts), greedy(1, logprobs=TOP_LOGITS))
    assert_logits_match(outputs, reference_logits, f"{scheme}, TP=2")


def test_openai_server_serves_the_quantized_checkpoint(scheme_run, checkpoints, prompts, tmp_path):
    """`python -m vllm_jetnemotron serve OUT` with no quantization flag: the greedy tokens
    of the offline engine, one prompt at a time."""
    scheme, _, singles, _, _ = scheme_run
    with serving(str(checkpoints[scheme]), tmp_path / "server.log", "--dtype", "bfloat16",
                 "--max-model-len", "1024", "--served-model-name", scheme) as base:
        client = openai_client(base)
        served = [list(client.completions.create(
            model=scheme, prompt=p, max_tokens=8, temperature=0.0,
            extra_body={"ignore_eos": True, "return_token_ids": True}).choices[0].token_ids) for p in prompts]
    assert served == singles, scheme


@pytest.mark.parametrize("scheme", SCHEMES)
def test_layers_too_narrow_for_the_kernels_stay_unquantized_and_load(tmp_path, scheme):
    """A filter generator of 16 (value dim 512 / reduction 32) fits neither vLLM CPU kernel's
    32-wide tiles: it stays bf16 (in the `ignore` list), and vLLM loads and runs the rest
    quantized, as the reference on the dequantized weights does."""
    import json

    config = preset_config("small", **{**CONFIG, "efficient_attention_config": {
        **CONFIG["efficient_attention_config"],
        "jet": {**CONFIG["efficient_attention_config"]["jet"], "dconv_generator_reduction": 32}}})
    source = write_random_checkpoint(tmp_path / "bf16", config, seed=1)
    out = quantize_checkpoint(source, tmp_path / scheme, scheme)
    ignore = json.loads((out / "config.json").read_text())["quantization_config"]["ignore"]
    assert {"model.layers.0.self_attn.dynamic_conv1d.kernel_generator.w1",
            "model.layers.0.self_attn.dynamic_conv1d.kernel_generator.w2"} <= set(ignore)
    assert "model.layers.0.self_attn.q_proj" not in ignore
    prompt = random_prompts([40], seed=5, vocab=CONFIG["vocab_size"])[0]
    reference = JetNemotronForCausalLM.from_pretrained(source, dtype=torch.float32).eval()
    reference.load_state_dict(dequantized_state_dict(out, torch.float32), strict=True)
    with torch.no_grad():
        expected = reference(torch.tensor([prompt])).logits[0, -1]
    with running_llm(str(out), dtype="bfloat16", logprobs_mode="raw_logits", max_logprobs=TOP_LOGITS) as llm:
        (output,) = llm.generate(as_inputs([prompt]), greedy(1, logprobs=TOP_LOGITS))
    top = output.outputs[0].logprobs[0]
    assert max(abs(top[t].logprob - float(expected[t])) for t in top) < LOGIT_ATOL


def test_the_quantizers_sizes_are_the_ones_vllms_kernels_take():
    """The w4a16 group sizes the quantizer writes are those of vLLM's CUDA 4-bit kernel
    (Marlin, which pads misaligned tiles itself); vLLM's CPU 4-bit kernel, asked here on
    this CPU, takes each of them, and layers whose sizes are multiples of KERNEL_TILE
    (what the quantizer quantizes) and no finer."""
    from vllm.model_executor.kernels.linear.mixed_precision.cpu import CPUWNA16LinearKernel
    from vllm.model_executor.kernels.linear.mixed_precision.MPLinearKernel import MPLinearLayerConfig
    from vllm.model_executor.layers.quantization.utils.marlin_utils import MARLIN_SUPPORTED_GROUP_SIZES
    from vllm.scalar_type import scalar_types

    assert set(GROUP_SIZES) == set(MARLIN_SUPPORTED_GROUP_SIZES) - {-1}

    def cpu_kernel_takes(in_features: int, out_features: int, group_size: int) -> bool:
        shape = (in_features, out_features)
        config = MPLinearLayerConfig(full_weight_shape=shape, partition_weight_shape=shape,
                                     weight_type=scalar_types.uint4b8, act_type=torch.bfloat16,
                                     group_size=group_size, zero_points=False)
        return CPUWNA16LinearKernel.can_implement(config)[0]

    assert all(cpu_kernel_takes(max(GROUP_SIZES), KERNEL_TILE, g) for g in GROUP_SIZES)
    assert cpu_kernel_takes(KERNEL_TILE, KERNEL_TILE, GROUP_SIZES[0])
    assert not cpu_kernel_takes(KERNEL_TILE, KERNEL_TILE // 2, GROUP_SIZES[0])
    assert not cpu_kernel_takes(KERNEL_TILE // 2, KERNEL_TILE, GROUP_SIZES[0])
