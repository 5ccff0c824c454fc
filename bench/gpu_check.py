"""`make gpu-check`: everything this project can check on a CUDA machine, in one command,
within a time budget, results in one folder.

    python3 bench/gpu_check.py                       # what `make gpu-check` runs
    python3 bench/gpu_check.py --fla-dir /path/to/vllm/third_party/flash_linear_attention/ops
    python3 bench/gpu_check.py --budget 900 --parts kernels_vs_pytorch kernels_vs_vllm_fla
    .venv/bin/python bench/gpu_check.py --device cpu --interpret   # dry run on CPU (tiny shapes)

Needs only PyTorch (with CUDA) and Triton: no vLLM, no install of this project, nothing
downloaded. The source tree is imported through a shim (a temporary `vllm_jetnemotron`
package whose `kernels` and `converter` are this tree's `kernels/` and `converter/`, as
pyproject's package-dir maps them; the real `vllm_jetnemotron/__init__.py` runs only if
its imports are there). Parts, in this order, each in its own Python process with its
own log, each timed, none stopping the others:

    environment              versions, GPU, what is installed
    kernels_vs_pytorch       every Triton kernel against its PyTorch definition: the grid of
                             tests/test_triton_kernels.py, the 2B and 4B heads, ~31K-token prefills
    kernels_vs_vllm_fla      the gated-delta-rule kernels, gated RMSNorm and l2norm against
                             vLLM's bundled flash-linear-attention ops (bench/vllm_fla.py):
                             from --fla-dir, else from an installed vllm; skipped without either
    converter_training_step  one distillation step of a small Jet-Nemotron student: the Triton
                             autograd path (what the converter trains with on CUDA) against
                             the PyTorch token loop, loss and every gradient (needs transformers)
    kernel_benchmarks        bench/kernels_speed.py --device cuda (Triton vs PyTorch at 2B shapes)
    vllm_tests               pytest tests, without the two Triton-interpreter modules (only
                             where vllm and pytest are installed), under the model runner the
                             installed vLLM picks (Model Runner V2 on CUDA from 0.32 on)
    vllm_tests_v1            the same tests under Model Runner V1 (VLLM_USE_V2_MODEL_RUNNER=0;
                             skipped where the installed vLLM has no V1 runner, as 0.34)
    decode_benchmark         bench/decode_throughput.py at full 2B dims (only with vllm)

Results in --out (default bench/results/gpu_check/): summary.json (per part: status
pass / fail / skipped, seconds, detail, log, and the figures of every case), one
<part>.log and <part>.json per part, and what the benchmarks write. The summary is
rewritten after every part, so a run cut short still leaves one. Exit status 0 when no
part failed, 1 otherwise, 2 when it refuses to start (no PyTorch, no Triton, no CUDA).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
DEFAULT_OUT = BENCH / "results" / "gpu_check"
DEFAULT_BUDGET = 570  # seconds: the whole run stays under 10 minutes
MIN_PART_SECONDS = 20  # a part is not started with less than this left
INTERPRETER_TEST_MODULES = ("test_triton_kernels.py", "test_triton_vs_vllm_fla.py")

# name -> (most seconds it may take, what it needs beyond torch + triton)
PARTS = {
    "environment": (60, None),
    "kernels_vs_pytorch": (210, None),
    "kernels_vs_vllm_fla": (150, "fla"),
    "converter_training_step": (90, "transformers"),
    "kernel_benchmarks": (120, "cuda"),
    "vllm_tests": (420, "vllm"),
    "vllm_tests_v1": (420, "vllm_v1"),
    "decode_benchmark": (300, "vllm"),
}


class Refusal(SystemExit):
    def __init__(self, message: str):
        print(f"gpu-check: {message}", file=sys.stderr)
        super().__init__(2)


# ----- import shim -------------------------------------------------------------------------------

SHIM_INIT = '''"""vllm_jetnemotron from the source tree {repo}, written by bench/gpu_check.py.

`kernels` and `converter` here are links to the tree's kernels/ and converter/ (as
pyproject's package-dir maps them); the other modules come from the tree's
vllm_jetnemotron/. The tree's __init__ runs only if its imports are installed
(it imports the config, hence transformers): the kernels need none of them."""

import pathlib as _pathlib

__path__ = [__path__[0], {package!r}]
try:
    exec(compile(_pathlib.Path({init!r}).read_text(), {init!r}, "exec"))
except ImportError as error:
    SOURCE_INIT_IMPORT_ERROR = repr(error)
'''


def build_shim(where: Path) -> Path:
    """A folder for PYTHONPATH holding the `vllm_jetnemotron` shim; returns it."""
    package = where / "vllm_jetnemotron"
    package.mkdir(parents=True)
    for name in ("kernels", "converter"):
        try:
            (package / name).symlink_to(REPO / name, target_is_directory=True)
        except OSError:  # no symlinks here: a copy does too
            shutil.copytree(REPO / name, package / name, ignore=shutil.ignore_patterns("__pycache__"))
    (package / "__init__.py").write_text(SHIM_INIT.format(
        repo=REPO, package=str(REPO / "vllm_jetnemotron"), init=str(REPO / "vllm_jetnemotron" / "__init__.py")))
    return where


def vllm_has_v1_runner() -> bool:
    """Whether the installed vLLM can still run Model Runner V1 on request (read from its
    files, vLLM not imported): 0.32 and 0.33 choose by VLLM_USE_V2_MODEL_RUNNER, 0.34 deleted V1."""
    spec = importlib.util.find_spec("vllm")
    if spec is None or not spec.submodule_search_locations:
        return False
    root = Path(next(iter(spec.submodule_search_locations)))
    envs = root / "envs.py"
    return ((root / "v1" / "worker" / "gpu_model_runner.py").is_file() and envs.is_file()
            and "VLLM_USE_V2_MODEL_RUNNER" in envs.read_text())


def installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def project_installed() -> bool:
    try:
        from importlib.metadata import PackageNotFoundError, distribution
    except ImportError:  # pragma: no cover
        return False
    try:
        distribution("vllm-jetnemotron")
        return True
    except PackageNotFoundError:
        return False


# ----- parts that run in a part process --------------------------------------------------------------


class CaseLog:
    """The record of one part: its cases, written to <out>/<part>.json after each one."""

    def __init__(self, out: Path, part: str, seconds: float):
        self.path = out / f"{part}.json"
        self.deadline = time.monotonic() + seconds
        self.record = {"part": part, "status": "running", "detail": "", "cases": []}
        self.write()

    def write(self) -> None:
        tmp = self.path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.record, indent=2, default=str))
        os.replace(tmp, self.path)

    def finish(self, status: str, detail: str, **extra) -> None:
        self.record.update(status=status, detail=detail, **extra)
        self.write()

    def run_cases(self, cases, common: dict, sync) -> None:
        """Run (name, fn, kwargs) cases while time is left; the part fails if a case fails
        or does not run for lack of time."""
        failed, not_run, longest = 0, [], 0.0
        for name, fn, kwargs in cases:
            # not started unless it would likely end before the part's time limit
            if time.monotonic() > self.deadline - max(5.0, 1.5 * longest):
                not_run.append(name)
                continue
            start = time.perf_counter()
            entry = {"case": name}
            try:
                entry["figures"] = fn(**common, **kwargs)
                sync()
                entry["status"] = "pass"
            except Exception as error:  # noqa: BLE001 - a failing case is a result
                failed += 1
                entry["status"] = "fail"
                entry["error"] = f"{type(error).__name__}: {error}"
                traceback.print_exc()
            entry["seconds"] = round(time.perf_counter() - start, 2)
            longest = max(longest, entry["seconds"])
            print(f"[{entry['status']}] {name} ({entry['seconds']} s)"
                  + (f": {entry['error']}" if entry["status"] == "fail" else ""), flush=True)
            self.record["cases"].append(entry)
            self.write()
        for name in not_run:
            self.record["cases"].append({"case": name, "status": "not run", "error": "time budget spent"})
        passed = len(self.record["cases"]) - failed - len(not_run)
        detail = f"{passed} of {len(self.record['cases'])} cases passed"
        if failed:
            detail += f", {failed} failed"
        if not_run:
            detail += f", {len(not_run)} not run (time budget)"
        self.finish("pass" if not failed and not not_run else "fail", detail)


def _device_setup(args):
    import torch

    device = torch.device(args.device)
    scale = "smoke" if args.interpret else "full"

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    return torch, device, scale, sync


def part_environment(args, log: CaseLog) -> None:
    import torch

    info = {"python": sys.version.split()[0], "platform": platform.platform(), "torch": torch.__version__,
            "cuda": torch.version.cuda, "cuda_available": torch.cuda.is_available(), "device": args.device,
            "interpret": args.interpret, "repo": str(REPO)}
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError as error:
        info["triton"] = f"not importable: {error}"
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(gpu=torch.cuda.get_device_name(0), gpu_memory_gib=round(props.total_memory / 2**30, 1),
                    compute_capability=f"{props.major}.{props.minor}", gpu_count=torch.cuda.device_count())
    for module in ("vllm", "transformers", "pytest", "einops"):
        info[f"{module}_installed"] = installed(module)
    info["project_installed"] = project_installed()
    import vllm_fla

    try:
        info["fla_folder"] = str(vllm_fla.resolve_folder(args.fla_dir))
    except vllm_fla.FlaNotFound as error:
        info["fla_folder"] = None
        info["fla_note"] = str(error)
    import vllm_jetnemotron.kernels as kernels

    info["kernels_imported_from"] = str(Path(kernels.__file__).resolve().parent)
    info["vllm_imported"] = "vllm" in sys.modules
    print(json.dumps(info, indent=2))
    log.finish("pass", f"torch {info['torch']}, triton {info['triton']}, "
                       f"{info.get('gpu', 'no GPU')}, vllm {'yes' if info['vllm_installed'] else 'no'}", info=info)


def part_kernels_vs_pytorch(args, log: CaseLog) -> None:
    torch, device, scale, sync = _device_setup(args)
    import kernel_checks

    log.run_cases(kernel_checks.definition_cases(scale), dict(device=device), sync)


def part_kernels_vs_vllm_fla(args, log: CaseLog) -> None:
    torch, device, scale, sync = _device_setup(args)
    import kernel_checks
    import vllm_fla

    fla = vllm_fla.load(args.fla_dir, single_config=None if args.fla_autotune else True)
    log.record["fla_folder"] = str(fla.folder)
    print(f"vLLM's FLA ops from {fla.folder}", flush=True)
    log.run_cases(kernel_checks.fla_cases(scale), dict(fla=fla, device=device), sync)


def part_converter_training_step(args, log: CaseLog) -> None:
    """One step as converter/training.py's run_training takes it (distillation loss,
    backward, gradient clipping, AdamW), with the JetBlocks on the training kernels
    (`enable_training_kernels`: the Triton chunk autograd on CUDA) and on the token
    loop (the reference model's default), same weights and batch."""
    import copy

    torch, device, scale, sync = _device_setup(args)
    import kernel_checks
    from vllm_jetnemotron.converter.modeling import JetNemotronForCausalLM
    from vllm_jetnemotron.converter.random_checkpoint import preset_config
    from vllm_jetnemotron.converter.students import enable_training_kernels, kl_distillation_loss

    if scale == "smoke":
        config, batch, seq_len = preset_config("tiny"), 1, 24
    else:  # JetBlocks with the 2B heads' K and V (4 heads), 256 tokens
        config = preset_config("small", efficient_attention_config={
            "jet": {"num_heads": 4, "head_dim": 96, "expand_v": 2.6666666667, "conv_size": 4,
                    "dconv_generator_reduction": 8, "norm_eps": "1e-5"}, "swa": {"window_size": 128}})
        batch, seq_len = 2, 256
    torch.manual_seed(0)
    reference = JetNemotronForCausalLM(config).to(device).float()
    teacher = JetNemotronForCausalLM(config).to(device).float().eval()  # a stand-in teacher
    student = copy.deepcopy(reference)
    enable_training_kernels(student)
    ids = torch.randint(0, config.vocab_size, (batch, seq_len), generator=torch.Generator().manual_seed(1)).to(device)
    with torch.no_grad():
        target = teacher(ids).logits

    def step(model):
        model.train()
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=1e-3, betas=(0.9, 0.95), weight_decay=0.0)
        sync()
        start = time.perf_counter()
        loss = kl_distillation_loss(model(ids).logits, target)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        sync()
        return float(loss.detach()), grads, time.perf_counter() - start

    path = "triton" if device.type == "cuda" else "pytorch chunked (no CUDA: the Triton path is CUDA-only)"
    loss_kernels, grads_kernels, t_kernels = step(student)
    loss_loop, grads_loop, t_loop = step(reference)
    entry = {"case": f"training step, JetBlocks on the training kernels ({path}) vs the token loop",
             "figures": {"loss_training_kernels": loss_kernels, "loss_token_loop": loss_loop,
                         "seconds_training_kernels": round(t_kernels, 3), "seconds_token_loop": round(t_loop, 3)}}
    try:
        kernel_checks.compare("loss", torch.tensor(loss_kernels), torch.tensor(loss_loop), atol=1e-5, rtol=1e-4)
        if grads_kernels.keys() != grads_loop.keys():
            raise kernel_checks.CheckFailed("the two paths computed gradients of different parameters")
        worst = (None, 0.0)
        for name, g_ref in grads_loop.items():
            fig = kernel_checks.compare(f"gradient of {name}", grads_kernels[name], g_ref, atol=2e-4, rtol=2e-3,
                                        relative_atol=True)
            if fig["max_rel_err"] >= worst[1]:
                worst = (name, fig["max_rel_err"])
        entry["figures"]["worst_gradient"] = {"parameter": worst[0], "max_rel_err": worst[1]}
        entry["figures"]["parameters_compared"] = len(grads_loop)
        entry["status"] = "pass"
    except kernel_checks.CheckFailed as error:
        entry["status"], entry["error"] = "fail", str(error)
    log.record["cases"].append(entry)
    log.finish(entry["status"], entry.get("error") or
               f"loss {loss_kernels:.6f} vs {loss_loop:.6f}, {len(grads_loop)} gradients agree ({path})")


IN_PROCESS = {
    "environment": part_environment,
    "kernels_vs_pytorch": part_kernels_vs_pytorch,
    "kernels_vs_vllm_fla": part_kernels_vs_vllm_fla,
    "converter_training_step": part_converter_training_step,
}


def run_part_here(args) -> int:
    out = Path(args.out)
    log = CaseLog(out, args.run_part, args.seconds)
    try:
        IN_PROCESS[args.run_part](args, log)
    except Exception as error:  # noqa: BLE001
        traceback.print_exc()
        log.finish("fail", f"{type(error).__name__}: {error}")
    return 0 if log.record["status"] in ("pass", "skipped") else 1


# ----- the driver --------------------------------------------------------------------------------------


def external_command(part: str, args, out: Path) -> tuple[list[str] | None, str]:
    """(command, note) of the parts that run other programs; command None = skipped."""
    py = sys.executable
    if part == "kernel_benchmarks":
        return [py, str(BENCH / "kernels_speed.py"), "--device", "cuda", "--out", str(out / "kernel_benchmarks")], ""
    if part in ("vllm_tests", "vllm_tests_v1"):
        # Not the two interpreter modules: importing them sets TRITON_INTERPRET=1 for the
        # whole pytest process, which the vLLM engines of later tests would inherit and then
        # interpret their own Triton kernels on the GPU; what they check runs compiled on CUDA
        # in kernels_vs_pytorch and kernels_vs_vllm_fla.
        return [py, "-m", "pytest", "tests", "-q", "-rfE", "-p", "no:cacheprovider",
                *(f"--ignore={REPO / 'tests' / name}" for name in INTERPRETER_TEST_MODULES),
                f"--junitxml={out / f'{part}.xml'}"], f"without {', '.join(INTERPRETER_TEST_MODULES)}"
    if part == "decode_benchmark":
        script = BENCH / "decode_throughput.py"
        if not script.is_file():
            return None, "bench/decode_throughput.py is not there"
        try:
            usage = subprocess.run([py, str(script), "--help"], capture_output=True, text=True, timeout=60,
                                   cwd=REPO, env=part_env(args)).stdout
        except subprocess.TimeoutExpired:
            usage = ""
        command, flags = [py, str(script)], []
        # full dims: the official 2B layout, unshrunk (whichever of these the script offers)
        if "--layout" in usage and "2b" in usage:
            flags += ["--layout", "2b"]
        if "--scale" in usage:
            flags += ["--scale", "1"]
        if "--out" in usage:
            flags += ["--out", str(out / "decode_benchmark")]
        return command + flags, f"flags {' '.join(flags) or '(none: --help offered none of --layout, --scale, --out)'}"
    raise KeyError(part)


def skip_reason(part: str, args) -> str | None:
    need = PARTS[part][1]
    if need == "cuda" and args.device != "cuda":
        return "needs CUDA (CPU dry run)"
    if need == "fla" and args.fla_dir is None and not installed("vllm"):
        return "no FLA ops: vllm is not installed and no --fla-dir / FLA_DIR was given"
    if need == "transformers" and not installed("transformers"):
        return "needs transformers (the converter's model is a Hugging Face PreTrainedModel)"
    if need in ("vllm", "vllm_v1"):
        if args.device != "cuda":
            return "needs vLLM on CUDA (CPU dry run)"
        if not installed("vllm"):
            return "vllm is not installed"
        if part.startswith("vllm_tests") and not installed("pytest"):
            return "pytest is not installed"
        if need == "vllm_v1" and not vllm_has_v1_runner():
            return "the installed vLLM has no Model Runner V1 (removed in 0.34)"
    return None


_SHIM: Path | None = None


def part_env(args) -> dict:
    env = dict(os.environ)
    paths = [str(_SHIM), str(BENCH)] if _SHIM is not None else [str(BENCH)]
    env["PYTHONPATH"] = os.pathsep.join(paths + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    env["PYTHONUNBUFFERED"] = "1"
    if args.interpret:
        env["TRITON_INTERPRET"] = "1"
    return env


def run_part(part: str, args, out: Path, seconds: float) -> dict:
    """Run one part in a child process with a timeout; returns its summary entry."""
    start = time.monotonic()
    log_path = out / f"{part}.log"
    entry = {"status": "fail", "seconds": 0.0, "log": log_path.name}
    env = part_env(args)
    note = ""
    if part in IN_PROCESS:
        command = [sys.executable, str(Path(__file__).resolve()), "--run-part", part, "--out", str(out),
                   "--device", args.device, "--seconds", str(int(seconds))]
        if args.interpret:
            command.append("--interpret")
        if args.fla_dir is not None:
            command += ["--fla-dir", str(args.fla_dir)]
        if args.fla_autotune:
            command.append("--fla-autotune")
    else:
        command, extra = external_command(part, args, out)
        if command is None:
            return {"status": "skipped", "seconds": 0.0, "detail": extra}
        if part == "vllm_tests_v1":
            env["VLLM_USE_V2_MODEL_RUNNER"] = "0"
        if part in ("vllm_tests", "vllm_tests_v1", "decode_benchmark"):
            if project_installed():  # vLLM finds the plugin through the installed entry point
                env["PYTHONPATH"] = os.pathsep.join(p for p in env["PYTHONPATH"].split(os.pathsep) if p != str(_SHIM))
            else:
                note = ("this project is not installed in this Python: the source-tree shim is imported, and vLLM "
                        "cannot find the plugin's entry point (pip install --no-deps -e . fixes that)")
            note = "; ".join(x for x in (note, extra) if x)
    seconds = max(1.0, seconds - (time.monotonic() - start))  # (decode_benchmark asked --help)
    with open(log_path, "w") as log:
        log.write(f"$ {' '.join(command)}\n# timeout {int(seconds)} s{'; ' + note if note else ''}\n\n")
        log.flush()
        proc = subprocess.Popen(command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            rc = proc.wait(timeout=seconds)
            timed_out = False
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            rc, timed_out = proc.wait(), True
    entry["seconds"] = round(time.monotonic() - start, 1)
    record_path = out / f"{part}.json"
    record = json.loads(record_path.read_text()) if record_path.is_file() else None
    if part in IN_PROCESS and record is not None:
        entry.update(status=record["status"], detail=record.get("detail", ""))
        entry["cases"] = record.get("cases", [])
        for key in ("info", "fla_folder"):
            if key in record:
                entry[key] = record[key]
        if record["status"] == "running":
            entry["status"] = "fail"
    else:
        entry["status"] = "pass" if rc == 0 else "fail"
        entry["detail"] = f"exit status {rc}"
        if part.startswith("vllm_tests"):
            entry["detail"] = junit_counts(out / f"{part}.xml") or entry["detail"]
    if timed_out:
        entry["status"] = "fail"
        done = len(entry.get("cases", []))
        entry["detail"] = f"timed out after {int(seconds)} s" + (f" ({done} cases done)" if done else "")
    elif rc != 0 and entry["status"] == "pass":
        entry.update(status="fail", detail=f"exit status {rc}; {entry.get('detail', '')}")
    if note:
        entry["note"] = note
    return entry


def junit_counts(path: Path) -> str | None:
    if not path.is_file():
        return None
    import xml.etree.ElementTree as ElementTree

    root = ElementTree.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    counts = {key: sum(int(s.get(key, 0)) for s in suites) for key in ("tests", "failures", "errors", "skipped")}
    return (f"{counts['tests']} tests: {counts['failures']} failed, {counts['errors']} errors, "
            f"{counts['skipped']} skipped")


def prepare_out(out: Path) -> None:
    """A fresh results folder: an earlier gpu-check's is emptied, anything else refused."""
    if out.exists() and any(out.iterdir()):
        if not (out / "summary.json").is_file() and not any(out.glob("*.log")):
            raise Refusal(f"{out} exists and holds files of something else; choose another --out")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)


def refuse_without_device(args) -> None:
    try:
        import torch
    except ImportError as error:
        raise Refusal(f"needs PyTorch ({error}); run it with a Python that has torch and triton "
                      "(make gpu-check PYTHON=/path/to/python)")
    try:
        import triton  # noqa: F401
    except ImportError as error:
        raise Refusal(f"needs Triton ({error})")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise Refusal(f"no CUDA device: torch.cuda.is_available() is False (torch {torch.__version__}, "
                      f"built for CUDA {torch.version.cuda}). This check is for a GPU machine; a CPU dry run of "
                      "its logic on tiny shapes: python bench/gpu_check.py --device cpu --interpret")
    if args.device == "cpu" and not args.interpret:
        raise Refusal("--device cpu needs --interpret (Triton runs CPU tensors only under TRITON_INTERPRET=1)")


def print_summary(summary: dict) -> None:
    print("\n| part | status | seconds | detail |\n|---|---|---:|---|")
    for name, entry in summary["parts"].items():
        print(f"| {name} | {entry['status']} | {entry['seconds']} | {entry.get('detail', '')} |")
    print(f"\n{summary['verdict']} in {summary['seconds']} s; results in {summary['out']}")


def main(argv: list[str] | None = None) -> int:
    global _SHIM
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="results folder (emptied first)")
    parser.add_argument("--budget", type=float, default=DEFAULT_BUDGET, help="seconds for the whole run")
    parser.add_argument("--fla-dir", type=Path, default=None,
                        help="vLLM's flash-linear-attention ops folder (default: the installed vllm's, if any)")
    parser.add_argument("--fla-autotune", action="store_true",
                        help="let vLLM's FLA kernels autotune (default: first config only, saves minutes)")
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--interpret", action="store_true",
                        help="with --device cpu: a dry run, Triton interpreted, tiny shapes")
    parser.add_argument("--parts", nargs="+", choices=list(PARTS), default=list(PARTS))
    parser.add_argument("--run-part", choices=list(IN_PROCESS), help=argparse.SUPPRESS)
    parser.add_argument("--seconds", type=float, default=60, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.fla_dir is not None and not str(args.fla_dir).strip():
        args.fla_dir = None
    if args.run_part:
        return run_part_here(args)

    refuse_without_device(args)
    out = args.out.resolve()
    prepare_out(out)
    start = time.monotonic()
    summary = {"command": " ".join([Path(sys.executable).name, "bench/gpu_check.py", *(argv or sys.argv[1:])]),
               "out": str(out), "budget_s": args.budget, "device": args.device, "interpret": args.interpret,
               "parts": {}}
    with tempfile.TemporaryDirectory(prefix="gpu_check_shim_") as tmp:
        _SHIM = build_shim(Path(tmp))
        for part in args.parts:
            left = args.budget - (time.monotonic() - start)
            reason = skip_reason(part, args)
            if reason is not None:
                entry = {"status": "skipped", "seconds": 0.0, "detail": reason}
            elif left < MIN_PART_SECONDS:
                entry = {"status": "skipped", "seconds": 0.0,
                         "detail": f"time budget spent ({int(left)} s of {int(args.budget)} s left)"}
            else:
                print(f"== {part} (at most {int(min(PARTS[part][0], left))} s)", flush=True)
                entry = run_part(part, args, out, min(PARTS[part][0], left))
                print(f"   {entry['status']}: {entry.get('detail', '')} ({entry['seconds']} s)", flush=True)
            summary["parts"][part] = entry
            summary["seconds"] = round(time.monotonic() - start, 1)
            failed = [name for name, e in summary["parts"].items() if e["status"] == "fail"]
            summary["verdict"] = f"FAIL ({', '.join(failed)})" if failed else "PASS"
            (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    _SHIM = None
    print_summary(summary)
    return 1 if any(e["status"] == "fail" for e in summary["parts"].values()) else 0


if __name__ == "__main__":
    sys.exit(main())
