"""Shared fixtures: small random checkpoints written by the project's own tool, the
reference model, and real vLLM engines (each started once and shared: a start costs
about 20 s on two cores)."""

import contextlib
import socket
import subprocess
import sys
import time
import urllib.request

import pytest
import torch

from vllm_jetnemotron.converter.random_checkpoint import preset_config, write_random_checkpoint

# vLLM on CPU: reserve a fixed KV/state budget instead of a fraction of host RAM.
KV_BYTES = 256 << 20


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> str:
    """4 layers (jet, attn, jet, swa with a 48-token window), float32."""
    path = tmp_path_factory.mktemp("ckpt") / "tiny"
    return str(write_random_checkpoint(path, preset_config("tiny"), seed=0, dtype=torch.float32))


@pytest.fixture(scope="session")
def reference_model(tiny_checkpoint):
    from vllm_jetnemotron.converter.modeling import JetNemotronForCausalLM

    return JetNemotronForCausalLM.from_pretrained(tiny_checkpoint, dtype=torch.float32).eval()


def start_llm(model: str, **kwargs):
    from vllm import LLM

    options = dict(dtype="float32", kv_cache_memory_bytes=KV_BYTES, max_model_len=2048,
                   enforce_eager=True, seed=0)
    options.update(kwargs)
    return LLM(model=model, **options)


@contextlib.contextmanager
def running_llm(model: str, **kwargs):
    llm = start_llm(model, **kwargs)
    try:
        yield llm
    finally:
        llm.llm_engine.engine_core.shutdown()


def greedy(max_tokens: int, **kwargs):
    from vllm import SamplingParams

    return SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True, **kwargs)


def token_ids(outputs) -> list[list[int]]:
    return [list(o.outputs[0].token_ids) for o in outputs]


def random_prompts(lengths, seed: int = 0, vocab: int = 151000) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (n,), generator=g).tolist() for n in lengths]


def as_inputs(prompts: list[list[int]]):
    return [{"prompt_token_ids": p} for p in prompts]



def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve_command(model: str, port: int, *args: str) -> list[str]:
    """`python -m vllm_jetnemotron serve` on loopback, float32, eager, the tests' KV budget."""
    return [sys.executable, "-m", "vllm_jetnemotron", "serve", model, "--host", "127.0.0.1",
            "--port", str(port), "--dtype", "float32", "--enforce-eager",
            "--kv-cache-memory-bytes", str(KV_BYTES), *args]


def wait_until_healthy(process: subprocess.Popen, base: str, log_path, timeout: float = 300) -> None:
    """Poll `base`/health until it answers 200; raise with the log's tail if the server
    exits first or the timeout passes."""
    deadline = time.monotonic() + timeout
    while True:
        if process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode}:\n{log_path.read_text()[-4000:]}")
        try:
            with urllib.request.urlopen(f"{base}/health", timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"server did not become healthy:\n{log_path.read_text()[-4000:]}")
        time.sleep(1)


@contextlib.contextmanager
def serving(model: str, log_path, *args: str, env: dict | None = None):
    """A `serve_command` process; yields its base URL once healthy, stops it after."""
    port = free_port()
    with open(log_path, "w") as log:
        process = subprocess.Popen(serve_command(model, port, *args), stdout=log,
                                   stderr=subprocess.STDOUT, env=env)
    try:
        base = f"http://127.0.0.1:{port}"
        wait_until_healthy(process, base, log_path)
        yield base
    finally:
        process.terminate()
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
