"""vLLM's Jet-Nemotron against the reference model on a random checkpoint whose
sliding window (48 tokens) is shorter than most prompts."""

import pytest
import torch

from conftest import as_inputs, greedy, random_prompts, reference_greedy, running_llm, token_ids

PROMPT_LENGTHS = [1, 5, 17, 63, 64, 65, 200, 700]
NEW_TOKENS = 32
TOP_LOGITS = 20
LOGIT_ATOL = 2e-3  # float32: max abs difference over the top-20 last-position logits
BF16_LOGIT_ATOL = 0.25  # bfloat16 (measured up to 0.12)


@pytest.fixture(scope="module")
def prompts():
    return random_prompts(PROMPT_LENGTHS, seed=1)


@pytest.fixture(scope="module")
def reference_outputs(reference_model, prompts):
    """Per prompt: last-position logits and the greedy continuation (cached generate)."""
    results = []
    with torch.no_grad():
        for prompt in prompts:
            ids = torch.tensor([prompt])
            logits = reference_model(ids).logits[0, -1]
            results.append((logits, reference_greedy(reference_model, prompt, NEW_TOKENS)))
    return results


@pytest.fixture(scope="module")
def vllm_float32_outputs(default_llm, prompts):
    return default_llm.generate(as_inputs(prompts), greedy(NEW_TOKENS, logprobs=TOP_LOGITS))


@pytest.mark.parametrize("index", range(len(PROMPT_LENGTHS)), ids=[f"len{n}" for n in PROMPT_LENGTHS])
def test_float32_logits_match_reference(index, vllm_float32_outputs, reference_outputs):
    reference_logits, _ = reference_outputs[index]
    first_step = vllm_float32_outputs[index].outputs[0].logprobs[0]  # raw logits, top 20
    ids = torch.tensor(list(first_step))
    vllm_logits = torch.tensor([first_step[i].logprob for i in ids.tolist()])
    diff = (vllm_logits - reference_logits[ids]).abs().max().item()
    assert diff < LOGIT_ATOL, f"max |logit diff| {diff:.2e} over the top-{TOP_LOGITS} tokens"
    assert set(ids.tolist()) == set(reference_logits.topk(TOP_LOGITS).indices.tolist())


@pytest.mark.parametrize("index", range(len(PROMPT_LENGTHS)), ids=[f"len{n}" for n in PROMPT_LENGTHS])
def test_float32_greedy_continuation_matches_reference(index, vllm_float32_outputs, reference_outputs):
    _, reference_tokens = reference_outputs[index]
    assert token_ids([vllm_float32_outputs[index]])[0] == reference_tokens


@pytest.mark.parametrize("state_dtype, allocated", [("auto", "float32"), ("bfloat16", "bfloat16")])
def test_bfloat16_matches_reference_top1(tiny_checkpoint, prompts, reference_model, reference_outputs, state_dtype,
                                         allocated):
    """bf16 activations drift from the float32 reference: the first greedy token is the
    same for every prompt and the top logits stay within bf16 rounding, at the first token
    and at the decode steps after it, which read the recurrent states back from the cache.
    On the CPU the states are float32 unless bfloat16 is asked for (`cpu_state_dtype`)."""
    with running_llm(tiny_checkpoint, dtype="bfloat16", logprobs_mode="raw_logits", max_logprobs=TOP_LOGITS,
                     mamba_ssm_cache_dtype=state_dtype) as llm:
        assert llm.llm_engine.vllm_config.cache_config.mamba_ssm_cache_dtype == allocated
        outputs = llm.generate(as_inputs(prompts), greedy(4, logprobs=TOP_LOGITS))
    steps_checked = 0
    for prompt, (_, reference_tokens), output in zip(prompts, reference_outputs, outputs):
        tokens = output.outputs[0].token_ids
        assert tokens[0] == reference_tokens[0], f"prompt of {len(prompt)} tokens"
        steps = output.outputs[0].logprobs
        with torch.no_grad():  # the reference's logits at every step, from one causal pass: [steps, vocab]
            reference_logits = reference_model(
                torch.tensor([prompt + reference_tokens[:len(steps) - 1]])).logits[0, len(prompt) - 1:]
        for step, top in enumerate(steps):
            if tokens[:step] != reference_tokens[:step]:
                break  # the sequences diverged: no reference for this position
            ids = torch.tensor(list(top))
            diff = (torch.tensor([top[i].logprob for i in ids.tolist()]) - reference_logits[step, ids]).abs().max()
            assert diff < BF16_LOGIT_ATOL, f"prompt of {len(prompt)} tokens, step {step}: max |logit diff| {diff:.3f}"
            steps_checked += 1
    assert steps_checked >= 3 * len(prompts), "too few decode steps shared the reference's tokens"


def test_all_sliding_window_layers_with_a_window_beyond_the_context(tmp_path):
    """Every layer `swa`, the window (8192) above `max_position_embeddings` (4096): vLLM
    serves it as a plain attention model (prefix caching off, no JetBlock), with the
    reference model's logits and greedy tokens, over prompts up to 2000 tokens."""
    from vllm_jetnemotron.converter.modeling import JetNemotronForCausalLM
    from vllm_jetnemotron.converter.random_checkpoint import preset_config, write_random_checkpoint

    attention = {**preset_config("tiny").efficient_attention_config, "swa": {"window_size": 8192}}
    config = preset_config("tiny", layer_types=["swa"] * 4, efficient_attention_config=attention)
    path = write_random_checkpoint(tmp_path / "all-swa", config, seed=0, dtype=torch.float32)
    reference = JetNemotronForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    prompts = random_prompts([5, 700, 2000], seed=1)
    with running_llm(str(path), logprobs_mode="raw_logits", max_logprobs=TOP_LOGITS) as llm:
        outputs = llm.generate(as_inputs(prompts), greedy(8, logprobs=TOP_LOGITS))
    for prompt, output in zip(prompts, outputs):
        with torch.no_grad():
            ids = torch.tensor([prompt])
            logits = reference(ids).logits[0, -1]
            tokens = reference_greedy(reference, prompt, 8)
        first_step = output.outputs[0].logprobs[0]
        top = torch.tensor(list(first_step))
        diff = (torch.tensor([first_step[i].logprob for i in top.tolist()]) - logits[top]).abs().max().item()
        assert diff < LOGIT_ATOL, f"prompt of {len(prompt)} tokens: max |logit diff| {diff:.2e}"
        assert list(output.outputs[0].token_ids) == tokens, f"prompt of {len(prompt)} tokens"
