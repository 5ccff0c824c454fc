"""`jet-nemotron-2b` as the model name of `LLM(...)` and of the server, offline: a tiny
checkpoint placed in a temporary Hugging Face cache as the snapshot of the official
repository is what loads, served under the short name; a user's own redirect file wins."""

import json
import os
import shutil
import subprocess
import sys

import pytest

from conftest import openai_client, reference_greedy, serving
from vllm_jetnemotron.short_names import REDIRECTS_FILE

OFFICIAL_REPOSITORY = json.loads(REDIRECTS_FILE.read_text())["jet-nemotron-2b"]
PROMPT = [11, 22, 33, 44, 55]
NEW_TOKENS = 8

_OFFLINE_LLM = """
import json, sys
from vllm import LLM, SamplingParams
llm = LLM(model="jet-nemotron-2b", dtype="float32", enforce_eager=True, max_model_len=512,
          kv_cache_memory_bytes=256 << 20)
out = llm.generate([{"prompt_token_ids": json.loads(sys.argv[1])}],
                   SamplingParams(temperature=0.0, max_tokens=int(sys.argv[2]), ignore_eos=True))
config = llm.llm_engine.model_config
print("LOADED", json.dumps({"model": config.model, "served": config.served_model_name,
                  "tokens": list(out[0].outputs[0].token_ids)}))
llm.llm_engine.engine_core.shutdown()
"""


@pytest.fixture(scope="module")
def offline_cache_env(tiny_checkpoint, tmp_path_factory) -> dict:
    """The environment of a machine whose Hugging Face cache holds the official 2B
    repository (here: the tiny checkpoint) and that may not download."""
    cache = tmp_path_factory.mktemp("hf-cache")
    repo = cache / ("models--" + OFFICIAL_REPOSITORY.replace("/", "--"))
    commit = "0123456789abcdef0123456789abcdef01234567"
    shutil.copytree(tiny_checkpoint, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    env = {k: v for k, v in os.environ.items() if k != "VLLM_MODEL_REDIRECT_PATH"}
    return {**env, "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}


@pytest.fixture(scope="module")
def reference_tokens(reference_model) -> list[int]:
    return reference_greedy(reference_model, PROMPT, NEW_TOKENS)


def test_offline_llm_loads_the_official_repository_under_the_short_name(offline_cache_env, reference_tokens):
    result = subprocess.run([sys.executable, "-c", _OFFLINE_LLM, json.dumps(PROMPT), str(NEW_TOKENS)],
                            env=offline_cache_env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    line = next(line for line in result.stdout.splitlines() if line.startswith("LOADED "))
    loaded = json.loads(line.removeprefix("LOADED "))
    assert loaded["model"] == OFFICIAL_REPOSITORY
    assert loaded["served"] == "jet-nemotron-2b"
    assert loaded["tokens"] == reference_tokens


def test_server_serves_the_short_name(offline_cache_env, reference_tokens, tmp_path):
    with serving("jet-nemotron-2b", tmp_path / "server.log", "--max-model-len", "512",
                 env=offline_cache_env) as base:
        client = openai_client(base)
        assert [m.id for m in client.models.list().data] == ["jet-nemotron-2b"]
        response = client.completions.create(
            model="jet-nemotron-2b", prompt=PROMPT, max_tokens=NEW_TOKENS, temperature=0.0,
            extra_body={"ignore_eos": True, "return_token_ids": True})
        assert list(response.choices[0].token_ids) == reference_tokens


def test_a_redirect_file_the_user_set_is_kept(tiny_checkpoint, tmp_path):
    user_file = tmp_path / "redirects.json"
    user_file.write_text(json.dumps({"my-model": tiny_checkpoint}))
    check = ("import os\n"
             "from vllm_jetnemotron.plugin import register\n"
             "from vllm.transformers_utils.utils import maybe_model_redirect\n"
             "register()\n"
             "print('REDIRECTS', os.environ['VLLM_MODEL_REDIRECT_PATH'], maybe_model_redirect('my-model'),"
             " maybe_model_redirect('jet-nemotron-2b'))\n")
    result = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, timeout=300,
                            env={**os.environ, "VLLM_MODEL_REDIRECT_PATH": str(user_file)})
    assert result.returncode == 0, result.stderr[-4000:]
    line = next(line for line in result.stdout.splitlines() if line.startswith("REDIRECTS "))
    assert line.split()[1:] == [str(user_file), tiny_checkpoint, "jet-nemotron-2b"]
