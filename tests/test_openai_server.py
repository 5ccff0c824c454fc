"""A real `python -m vllm_jetnemotron serve` process (vLLM's OpenAI server) on loopback,
driven with the `openai` client and compared with offline `LLM.generate`."""

import asyncio
import json
import re
import subprocess
import sys
import time

import httpx
import openai
import pytest

from conftest import (EXAMPLES, as_inputs, async_openai_client, greedy, load_example, openai_client, random_prompts,
                      serving, token_ids)

MAX_MODEL_LEN = 1024
SERVED_NAME = "jet-tiny"
# A random model writes no JSON by itself: the constraints are what make the output valid.
# Bounded schemas (enums) and no free whitespace, so the output ends well within max_tokens.
STRUCTURED_OUTPUTS = {"backend": "xgrammar", "disable_any_whitespace": True}
PROMPTS = ["Hello, my name is", "The capital of France is", "def fibonacci(n):",
           "In 1905 Albert Einstein published"]


@pytest.fixture(scope="module")
def server(tiny_checkpoint, tmp_path_factory):
    log_path = tmp_path_factory.mktemp("server") / "server.log"
    with serving(tiny_checkpoint, log_path, "--served-model-name", SERVED_NAME,
                 "--max-model-len", str(MAX_MODEL_LEN), "--max-logprobs", "5",
                 "--enable-auto-tool-choice", "--tool-call-parser", "hermes",
                 "--structured-outputs-config", json.dumps(STRUCTURED_OUTPUTS)) as base:
        yield base


@pytest.fixture(scope="module")
def client(server):
    return openai_client(server)


@pytest.fixture(scope="module")
def offline(default_llm):
    """Greedy completions of PROMPTS, and of the chat below, by offline `LLM`."""
    from vllm import SamplingParams

    completions = default_llm.generate(PROMPTS, greedy(16))
    chat = default_llm.chat([{"role": "user", "content": "Say something."}],
                            SamplingParams(temperature=0.0, max_tokens=16))
    long_prompts = random_prompts([3, 70, 5, 300, 17, 150, 1, 40], seed=9)
    concurrent = token_ids(default_llm.generate(as_inputs(long_prompts), greedy(12)))
    return {"completions": [o.outputs[0].text for o in completions],
            "completion_ids": token_ids(completions),
            "chat": chat[0].outputs[0].text,
            "long_prompts": long_prompts, "concurrent": concurrent}


def metric(server: str, name: str) -> float:
    text = httpx.get(f"{server}/metrics").text
    values = [float(m.group(1)) for m in re.finditer(rf"^{re.escape(name)}{{[^}}]*}} (\S+)$", text, re.M)]
    assert values, f"{name} not in /metrics"
    return sum(values)


def wait_until_idle(server: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while metric(server, "vllm:num_requests_running") + metric(server, "vllm:num_requests_waiting") > 0:
        assert time.monotonic() < deadline, "requests still running"
        time.sleep(0.5)


def test_completions_equal_offline_generate(client, offline):
    response = client.completions.create(model=SERVED_NAME, prompt=PROMPTS, max_tokens=16,
                                         temperature=0.0, extra_body={"ignore_eos": True})
    by_index = sorted(response.choices, key=lambda c: c.index)
    assert [c.text for c in by_index] == offline["completions"]
    assert response.usage.completion_tokens == 16 * len(PROMPTS)


def test_streaming_completion_equals_non_streaming(client, offline):
    stream = client.completions.create(model=SERVED_NAME, prompt=PROMPTS[1], max_tokens=16,
                                       temperature=0.0, stream=True, extra_body={"ignore_eos": True})
    chunks = [chunk.choices[0].text for chunk in stream if chunk.choices]
    assert len(chunks) > 1
    assert "".join(chunks) == offline["completions"][1]


def test_chat_completion_uses_the_checkpoint_chat_template(client, offline):
    messages = [{"role": "user", "content": "Say something."}]
    response = client.chat.completions.create(model=SERVED_NAME, messages=messages, max_tokens=16,
                                              temperature=0.0)
    assert response.choices[0].message.content == offline["chat"]
    stream = client.chat.completions.create(model=SERVED_NAME, messages=messages, max_tokens=16,
                                            temperature=0.0, stream=True)
    streamed = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert streamed == offline["chat"]


def test_logprobs_max_tokens_and_stop(client, offline):
    response = client.completions.create(model=SERVED_NAME, prompt=PROMPTS[0], max_tokens=6,
                                         temperature=0.0, logprobs=3, extra_body={"ignore_eos": True})
    choice = response.choices[0]
    assert len(choice.logprobs.tokens) == 6 and response.usage.completion_tokens == 6
    for top in choice.logprobs.top_logprobs:
        assert len(top) == 3 and all(v <= 0 for v in top.values())
    # The greedy token is the most likely one at every step.
    for token, top, lp in zip(choice.logprobs.tokens, choice.logprobs.top_logprobs,
                              choice.logprobs.token_logprobs):
        assert lp == pytest.approx(max(top.values()), abs=1e-4)
    full = offline["completions"][0]
    stop = full[len(full) // 2: len(full) // 2 + 3]
    stopped = client.completions.create(model=SERVED_NAME, prompt=PROMPTS[0], max_tokens=16,
                                        temperature=0.0, stop=[stop])
    assert stopped.choices[0].finish_reason == "stop"
    assert stopped.choices[0].text == full[: full.index(stop)]


def test_n_samples_with_seed_are_reproducible(client):
    def sample():
        response = client.completions.create(model=SERVED_NAME, prompt=PROMPTS[2], max_tokens=10,
                                             temperature=1.0, n=3, seed=7)
        return [c.text for c in sorted(response.choices, key=lambda c: c.index)]

    first = sample()
    assert first == sample()
    assert len(set(first)) > 1


def test_64_concurrent_requests_then_no_state_leaks(server, offline):
    prompts, expected = offline["long_prompts"], offline["concurrent"]
    client = async_openai_client(server)

    async def complete(i):
        response = await client.completions.create(
            model=SERVED_NAME, prompt=prompts[i % len(prompts)], max_tokens=12, temperature=0.0,
            extra_body={"ignore_eos": True, "return_token_ids": True})
        return response.choices[0].token_ids

    async def run_all():
        return await asyncio.gather(*(complete(i) for i in range(64)))

    results = asyncio.run(run_all())
    assert [list(r) for r in results] == [expected[i % len(prompts)] for i in range(64)]
    wait_until_idle(server)
    assert metric(server, "vllm:kv_cache_usage_perc") == 0.0


def test_cancelled_streams_release_their_states(server):
    prompts = random_prompts([20, 200, 60, 400], seed=11)
    client = async_openai_client(server)

    async def stream(i, cancel):
        response = await client.completions.create(
            model=SERVED_NAME, prompt=prompts[i % len(prompts)], max_tokens=64, temperature=0.0,
            stream=True, extra_body={"ignore_eos": True})
        received = 0
        async for _ in response:
            received += 1
            if cancel and received == 2:
                await response.close()  # the client goes away mid-stream
                return "cancelled"
        return received

    async def run_all():
        return await asyncio.gather(*(stream(i, cancel=i % 2 == 0) for i in range(32)))

    results = asyncio.run(run_all())
    assert results.count("cancelled") == 16 and all(r == 64 for r in results if r != "cancelled")
    wait_until_idle(server)
    assert metric(server, "vllm:kv_cache_usage_perc") == 0.0


@pytest.mark.parametrize("payload, status, message", [
    ({"prompt": [1] * (MAX_MODEL_LEN + 10), "max_tokens": 4}, 400, "maximum context length"),
    ({"prompt": "hi", "max_tokens": -1}, 400, "max_tokens"),
    ({"prompt": "hi", "max_tokens": 4, "model": "no-such-model"}, 404, "no-such-model"),
])
def test_bad_requests_get_4xx_and_the_server_keeps_serving(server, client, payload, status, message):
    body = {"model": SERVED_NAME, **payload}
    response = httpx.post(f"{server}/v1/completions", json=body, timeout=60)
    assert response.status_code == status
    assert message in response.text
    ok = client.completions.create(model=SERVED_NAME, prompt="still alive?", max_tokens=2)
    assert ok.usage.completion_tokens == 2


def test_malformed_json_gets_400(server, client):
    response = httpx.post(f"{server}/v1/completions", content=b'{"model": "jet-tiny", "prompt": ',
                          headers={"Content-Type": "application/json"}, timeout=60)
    assert response.status_code == 400
    assert client.completions.create(model=SERVED_NAME, prompt="hi", max_tokens=1).choices


WEATHER = {"type": "object", "additionalProperties": False, "required": ["city", "unit"],
           "properties": {"city": {"type": "string", "enum": ["Paris", "Tokyo", "Lima"]},
                          "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}}}


def assert_weather(text: str) -> None:
    value = json.loads(text)
    assert set(value) == {"city", "unit"}
    assert value["city"] in WEATHER["properties"]["city"]["enum"]
    assert value["unit"] in WEATHER["properties"]["unit"]["enum"]


def test_json_schema_response_format(client):
    response = client.chat.completions.create(
        model=SERVED_NAME, messages=[{"role": "user", "content": "Weather query as JSON."}],
        max_tokens=64, temperature=0.0,
        response_format={"type": "json_schema", "json_schema": {"name": "weather", "schema": WEATHER}})
    assert response.choices[0].finish_reason == "stop"
    assert_weather(response.choices[0].message.content)


@pytest.mark.parametrize("constraint, check", [
    ({"choice": ["yes", "no", "maybe"]}, lambda text: text in ("yes", "no", "maybe")),
    ({"regex": "[0-9]{3}-[a-z]{2}"}, lambda text: re.fullmatch("[0-9]{3}-[a-z]{2}", text)),
], ids=["choice", "regex"])
def test_choice_and_regex_constraints(client, constraint, check):
    response = client.completions.create(model=SERVED_NAME, prompt="Answer:", max_tokens=16, temperature=1.0,
                                         seed=7, extra_body={"structured_outputs": constraint})
    assert check(response.choices[0].text), response.choices[0].text


def test_auto_tool_choice_with_the_hermes_parser(client):
    """Auto tool choice on: a reply that is a `<tool_call>` block (the random model is held to
    one by a regex) comes back parsed as a tool call; one that is not comes back as text."""
    tool = {"type": "function", "function": {"name": "get_weather", "parameters": WEATHER}}
    call = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
    request = dict(model=SERVED_NAME, messages=[{"role": "user", "content": "Weather in Paris?"}],
                   temperature=0.0, tools=[tool], tool_choice="auto")
    held = client.chat.completions.create(**request, max_tokens=64,
                                          extra_body={"structured_outputs": {"regex": re.escape(call)}})
    message = held.choices[0].message
    assert [(c.function.name, json.loads(c.function.arguments)) for c in message.tool_calls] == [
        ("get_weather", {"city": "Paris"})]
    assert held.choices[0].finish_reason == "tool_calls"
    free = client.chat.completions.create(**request, max_tokens=8).choices[0].message
    assert not free.tool_calls and free.content


def test_invalid_schema_gets_400_and_the_server_keeps_serving(client):
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(
            model=SERVED_NAME, messages=[{"role": "user", "content": "hi"}], max_tokens=8,
            response_format={"type": "json_schema",
                             "json_schema": {"name": "bad", "schema": {"type": "no-such-type"}}})
    assert client.completions.create(model=SERVED_NAME, prompt="hi", max_tokens=2).usage.completion_tokens == 2


@pytest.mark.parametrize("example", ["openai_chat.py", "streaming.py"])
def test_client_examples_print_what_offline_generate_writes(server, default_llm, example):
    """Each example, run as written against the server, prints the greedy text offline
    `LLM` writes for the same request (the chat through the checkpoint's template)."""
    from vllm import SamplingParams

    result = subprocess.run([sys.executable, str(EXAMPLES / example), "--base-url", f"{server}/v1"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    module = load_example(example)
    params = SamplingParams(temperature=0.0, max_tokens=module.MAX_TOKENS)
    if example == "openai_chat.py":
        (expected,) = default_llm.chat(module.MESSAGES, params)
    else:
        (expected,) = default_llm.generate([module.PROMPT], params)
    assert expected.outputs[0].text.strip()
    assert result.stdout == expected.outputs[0].text + "\n"
