"""LoRA adapters in the PEFT format, trained here on the reference model with `peft`,
served by vLLM offline and through the OpenAI server. The oracle is the reference
model with the adapter merged into its weights (`merge_and_unload`)."""

import os
import shutil

import httpx
import pytest
import torch

from conftest import as_inputs, greedy, openai_client, random_prompts, reference_greedy, running_llm, serving, token_ids

MAX_RANK = 8
# Every linear layer of the official modules: JetBlock (projections, gates, filter
# generator), attention, MLP.
ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "g_proj", "b_proj", "a_proj", "o_proj", "w1", "w2",
              "gate_proj", "up_proj", "down_proj"]
# Some slices of the fused layers only (q and v of in_proj and qkv_proj, no gate_proj).
SOME_SLICES = ["q_proj", "v_proj", "up_proj"]
PROMPTS = random_prompts([7, 100, 20, 1], seed=3)  # 100 > the chunk: chunked prefill
NEW_TOKENS = 8


def train_adapter(checkpoint: str, out, targets, rank: int, seed: int):
    """A few AdamW steps of a PEFT LoRA on the reference model; returns the reference
    model with the adapter merged, in eval mode."""
    from peft import LoraConfig, get_peft_model

    from vllm_jetnemotron.converter.modeling import JetNemotronForCausalLM

    torch.manual_seed(seed)
    base = JetNemotronForCausalLM.from_pretrained(checkpoint, dtype=torch.float32)
    model = get_peft_model(base, LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=targets))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    batch = torch.randint(0, 1000, (2, 32))
    for _ in range(4):
        model(input_ids=batch, labels=batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.save_pretrained(out)
    return model.merge_and_unload().eval()


@pytest.fixture(scope="module")
def adapters(tiny_checkpoint, reference_model, tmp_path_factory):
    """{name: (adapter folder, greedy tokens of PROMPTS)}; None is the base model."""
    root = tmp_path_factory.mktemp("lora")
    found = {None: (None, [reference_greedy(reference_model, p, NEW_TOKENS) for p in PROMPTS])}
    for name, targets, rank, seed in (("all-linear", ALL_LINEAR, MAX_RANK, 0),
                                      ("some-slices", SOME_SLICES, 4, 1)):
        merged = train_adapter(tiny_checkpoint, root / name, targets, rank, seed)
        found[name] = (str(root / name), [reference_greedy(merged, p, NEW_TOKENS) for p in PROMPTS])
    assert len({str(tokens) for _, tokens in found.values()}) == 3, "the adapters change nothing"
    return found


def lora_request(name, adapters):
    from vllm.lora.request import LoRARequest

    return None if name is None else LoRARequest(name, 1 + list(adapters).index(name), adapters[name][0])


def test_two_adapters_and_the_base_model_in_one_batch(tiny_checkpoint, adapters):
    names = ["all-linear", "some-slices", None, "all-linear"]
    with running_llm(tiny_checkpoint, enable_lora=True, max_loras=2, max_lora_rank=MAX_RANK,
                     max_num_batched_tokens=64) as llm:
        # (prompt, adapter) rows: each name with the first two prompts, and two more
        rows = [(p, n) for n in names for p in PROMPTS[:2]] + [(PROMPTS[2], None), (PROMPTS[3], "some-slices")]
        outputs = llm.generate(as_inputs([p for p, _ in rows]), greedy(NEW_TOKENS),
                               lora_request=[lora_request(n, adapters) for _, n in rows])
    expected = [adapters[n][1][PROMPTS.index(p)] for p, n in rows]  # each row its own adapter's
    assert token_ids(outputs) == expected


@pytest.fixture(scope="module")
def server(tiny_checkpoint, adapters, tmp_path_factory):
    log_path = tmp_path_factory.mktemp("lora-server") / "server.log"
    env = dict(os.environ, VLLM_ALLOW_RUNTIME_LORA_UPDATING="True")
    with serving(tiny_checkpoint, log_path, "--served-model-name", "jet-tiny", "--enable-lora",
                 "--max-lora-rank", str(MAX_RANK), "--max-loras", "2",
                 "--lora-modules", f"all-linear={adapters['all-linear'][0]}", env=env) as base:
        yield base


@pytest.fixture(scope="module")
def client(server):
    return openai_client(server)


def completion_ids(client, model: str, prompt: list[int]) -> list[int]:
    response = client.completions.create(model=model, prompt=prompt, max_tokens=NEW_TOKENS, temperature=0.0,
                                         extra_body={"ignore_eos": True, "return_token_ids": True})
    return list(response.choices[0].token_ids)


def test_server_serves_adapters_by_name(client, server, adapters):
    assert {m.id for m in client.models.list().data} >= {"jet-tiny", "all-linear"}
    for prompt, tokens in zip(PROMPTS, adapters["all-linear"][1]):
        assert completion_ids(client, "all-linear", prompt) == tokens
    # an adapter loaded while serving
    response = httpx.post(f"{server}/v1/load_lora_adapter", timeout=120,
                          json={"lora_name": "some-slices", "lora_path": adapters["some-slices"][0]})
    assert response.status_code == 200, response.text
    assert completion_ids(client, "some-slices", PROMPTS[0]) == adapters["some-slices"][1][0]
    assert completion_ids(client, "jet-tiny", PROMPTS[0]) == adapters[None][1][0]


def untrained_adapter(out, config_overrides: dict, **lora) -> str:
    """A PEFT adapter with random (nonzero) matrices on a fresh tiny reference model."""
    from peft import LoraConfig, get_peft_model

    from vllm_jetnemotron.converter.modeling import JetNemotronForCausalLM
    from vllm_jetnemotron.converter.random_checkpoint import preset_config

    torch.manual_seed(0)
    model = JetNemotronForCausalLM(preset_config("tiny", **config_overrides))
    get_peft_model(model, LoraConfig(init_lora_weights=False, **lora)).save_pretrained(out)
    return str(out)


@pytest.mark.parametrize("config_overrides, lora, message", [
    ({}, dict(r=2 * MAX_RANK, target_modules=["q_proj"]), f"LoRA rank {2 * MAX_RANK} is greater than max_lora_rank"),
    ({}, dict(r=4, target_modules=["lm_head"]), "but received ['lm_head'"),
    ({"hidden_size": 96}, dict(r=4, target_modules=["q_proj", "o_proj"]),
     "model.layers.0.self_attn.q_proj is (64, 96), the model's (64, 128)"),
], ids=["rank-too-large", "module-not-adaptable", "trained-for-another-model"])
def test_an_adapter_that_does_not_fit_is_refused_and_serving_goes_on(
        server, client, adapters, tmp_path, config_overrides, lora, message):
    path = untrained_adapter(tmp_path / "adapter", config_overrides, **lora)
    response = httpx.post(f"{server}/v1/load_lora_adapter", timeout=120,
                          json={"lora_name": "misfit", "lora_path": path})
    assert response.status_code >= 400 and message in response.text, response.text
    assert "misfit" not in {m.id for m in client.models.list().data}
    assert completion_ids(client, "all-linear", PROMPTS[0]) == adapters["all-linear"][1][0]
    assert completion_ids(client, "jet-tiny", PROMPTS[0]) == adapters[None][1][0]


@pytest.mark.parametrize("config, message", [
    (None, "adapter_config.json is not valid JSON: Unterminated string starting at: line 3"),
    ("[4]", "adapter_config.json must hold a JSON object, got list"),
    ('{"r": 4}', "adapter_config.json: Missing required configuration fields"),
], ids=["truncated", "not-an-object", "fields-missing"])
def test_an_adapter_config_vllm_cannot_read_is_a_client_error(server, client, adapters, tmp_path, config, message):
    """A 400 naming the adapter and the file (vLLM gave a 500 with the JSON parser's message);
    serving goes on."""
    path = tmp_path / "adapter"
    shutil.copytree(adapters["all-linear"][0], path)
    config_file = path / "adapter_config.json"
    config_file.write_text(config_file.read_text()[:40] if config is None else config)
    response = httpx.post(f"{server}/v1/load_lora_adapter", timeout=120,
                          json={"lora_name": "corrupt", "lora_path": str(path)})
    assert response.status_code == 400, response.text
    assert "LoRA adapter 'corrupt' at " in response.text and message in response.text, response.text
    assert "corrupt" not in {m.id for m in client.models.list().data}
    assert completion_ids(client, "all-linear", PROMPTS[0]) == adapters["all-linear"][1][0]
    assert completion_ids(client, "jet-tiny", PROMPTS[0]) == adapters[None][1][0]


def test_the_adapter_config_fix_is_needed_and_installed():
    """The probe finds the bug in the installed vLLM's load-request check (so the patch is still
    needed) and not in the patched check."""
    from vllm.entrypoints.openai.models.serving import OpenAIServingModels

    from vllm_jetnemotron import lora_adapter_config as fix

    fix.install()
    current = OpenAIServingModels._check_load_lora_adapter_request
    assert fix.needs_fix(getattr(current, fix.UPSTREAM_ATTR, current))
    assert getattr(current, fix._MARKER, False) and not fix.needs_fix(current)
