"""The package's layout: which part may import which, no `sys.path` edits inside it, and a wheel
built from this tree holding every module and data file under `vllm_jetnemotron/...`.

Three parts, one folder each (pyproject's `package-dir`): the plugin `vllm_jetnemotron/*.py`,
the kernels `kernels/` (`vllm_jetnemotron.kernels`) and the converter `converter/`
(`vllm_jetnemotron.converter`). The rules:

* the kernels import neither vLLM nor the converter;
* the converter never imports vLLM; of the plugin it may import only `vllm_jetnemotron.config`
  (and the package's `__init__`, which any `vllm_jetnemotron.*` import runs);
* the plugin does not import the converter.

Imports are read from the sources (`ast`, nothing is imported): every import statement,
at module level or inside a function, relative ones resolved, followed through the project
modules it reaches (parent packages' `__init__` included), so that a rule also holds for
what a part imports indirectly.
"""

import ast
import functools
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PACKAGE_DIRS = {  # pyproject's [tool.setuptools.package-dir]
    "vllm_jetnemotron": REPO / "vllm_jetnemotron",
    "vllm_jetnemotron.kernels": REPO / "kernels",
    "vllm_jetnemotron.converter": REPO / "converter",
}
PLUGIN_MODULES_THE_CONVERTER_MAY_IMPORT = {"vllm_jetnemotron", "vllm_jetnemotron.config"}
SYS_PATH_EDITS = {"insert", "append", "extend", "remove", "pop", "clear"}


def _is_in(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def _part(module: str) -> str:
    """The part a module belongs to: kernels, converter, plugin (the rest of vllm_jetnemotron)
    or external."""
    for part in ("kernels", "converter"):
        if _is_in(module, f"vllm_jetnemotron.{part}"):
            return part
    return "plugin" if _is_in(module, "vllm_jetnemotron") else "external"


def _package_modules() -> dict[str, tuple[Path, bool]]:
    """Dotted name -> (source file, is a package) of every module of the three parts."""
    modules = {}
    for package, folder in PACKAGE_DIRS.items():
        for path in folder.rglob("*.py"):
            parts = path.relative_to(folder).with_suffix("").parts
            is_package = parts[-1] == "__init__"
            modules[".".join((package, *(parts[:-1] if is_package else parts)))] = (path, is_package)
    return modules


MODULES = _package_modules()
TREES = {name: ast.parse(path.read_text(), str(path)) for name, (path, _) in MODULES.items()}


@functools.cache
def direct_imports(name: str) -> list[tuple[str, int]]:
    """(absolute module name, line) of each import statement of a module; `from X import y`
    gives X and, where X.y is a module of the package, X.y."""
    is_package = MODULES[name][1]
    found = []
    for node in ast.walk(TREES[name]):
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".")
                base = base[:len(base) - node.level + (1 if is_package else 0)]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module
            found.append((module, node.lineno))
            found += [(f"{module}.{alias.name}", node.lineno) for alias in node.names
                      if f"{module}.{alias.name}" in MODULES]
    return found


def _with_parents(module: str) -> list[str]:
    """`a.b.c` -> `a`, `a.b`, `a.b.c`: what importing it runs."""
    names = module.split(".")
    return [".".join(names[:i]) for i in range(1, len(names) + 1)]


def reached_imports(name: str) -> dict[str, str]:
    """Every module importing `name` imports (its parent packages' imports included), directly
    or through project modules: module -> where the first import of it was found ("file:line")."""
    where: dict[str, str] = {}
    todo = [m for m in _with_parents(name) if m in MODULES]
    seen = set(todo)
    while todo:
        current = todo.pop()
        path = MODULES[current][0].relative_to(REPO)
        for module, line in direct_imports(current):
            for m in _with_parents(module):
                where.setdefault(m, f"{path}:{line}")
                if m in MODULES and m not in seen:
                    seen.add(m)
                    todo.append(m)
    return where


def _violations(part: str, forbidden) -> list[str]:
    return [f"{MODULES[name][0].relative_to(REPO)} reaches {module} (imported at {where})"
            for name in sorted(MODULES) if _part(name) == part
            for module, where in sorted(reached_imports(name).items()) if forbidden(module)]


def test_kernels_import_neither_vllm_nor_the_converter():
    assert not _violations("kernels", lambda m: _is_in(m, "vllm") or _part(m) == "converter")


def test_converter_never_imports_vllm():
    assert not _violations("converter", lambda m: _is_in(m, "vllm") or (
        _part(m) == "plugin" and m not in PLUGIN_MODULES_THE_CONVERTER_MAY_IMPORT))


def test_plugin_does_not_import_the_converter():
    assert not _violations("plugin", lambda m: _part(m) == "converter")


def _is_name_attribute(node, name: str, attr: str) -> bool:
    """`node` is `name.attr` (or an item of it: `name.attr[...]`)."""
    while isinstance(node, ast.Subscript):
        node = node.value
    return (isinstance(node, ast.Attribute) and node.attr == attr and isinstance(node.value, ast.Name)
            and node.value.id == name)


def _edits_sys_path(node) -> bool:
    """A call of a list method that changes `sys.path`, an assignment to it or to an item of
    it, or `site.addsitedir`."""
    is_sys_path = functools.partial(_is_name_attribute, name="sys", attr="path")
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
        f = node.func
        return ((f.attr in SYS_PATH_EDITS and is_sys_path(f.value))
                or _is_name_attribute(f, "site", "addsitedir"))
    if isinstance(node, (ast.Assign, ast.AugAssign, ast.Delete)):
        targets = node.targets if isinstance(node, (ast.Assign, ast.Delete)) else [node.target]
        return any(is_sys_path(t) for t in targets)
    return False


def test_no_sys_path_edits_in_the_package():
    edits = [f"{MODULES[name][0].relative_to(REPO)}:{node.lineno}"
             for name, tree in TREES.items() for node in ast.walk(tree) if _edits_sys_path(node)]
    assert not edits


@pytest.fixture(scope="module")
def wheel_names(tmp_path_factory) -> set[str]:
    """The file names in a wheel built from a copy of this tree (the tree itself gets no
    build/ or egg-info)."""
    tmp = tmp_path_factory.mktemp("wheel")
    source = tmp / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source)
    for folder in PACKAGE_DIRS.values():
        shutil.copytree(folder, source / folder.name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    result = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
                             "-q", "-w", str(tmp / "dist"), str(source)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    (wheel,) = (tmp / "dist").glob("vllm_jetnemotron-*.whl")
    return set(zipfile.ZipFile(wheel).namelist())


def test_wheel_holds_every_module_and_data_file(wheel_names):
    """Every file of the three folders but documentation (*.md): the modules and the package
    data read at runtime (converter assets, the C++ source of the conv update op,
    model_redirects.json), each under its installed name."""
    expected = {
        f"{package.replace('.', '/')}/{path.relative_to(folder).as_posix()}": path
        for package, folder in PACKAGE_DIRS.items()
        for path in folder.rglob("*")
        if path.is_file() and path.suffix not in (".md", ".pyc") and "__pycache__" not in path.parts
        and not path.name.startswith(".")
    }
    assert any(name.endswith(".py") for name in expected) and any(name.endswith(".json") for name in expected)
    missing = sorted(str(path.relative_to(REPO)) for name, path in expected.items() if name not in wheel_names)
    assert not missing
