"""Run a test module's tests once in a pytest subprocess with TRITON_INTERPRET=1, and let
each test of the main process report its own outcome from that run.

Triton reads TRITON_INTERPRET when `@triton.jit` decorates a function, so the setting must
be made before triton is first imported, and it must not reach the vLLM engines other
test modules start in the main process (on a GPU they run compiled Triton). The module
calls `report_from_subprocess(globals(), flag)` at its end; in the subprocess (`flag` set
in its environment) the tests run as written.
"""

import functools
import os
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ElementTree
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def in_subprocess(flag: str) -> bool:
    """Whether this process is the subprocess run of a module that uses `flag`."""
    return bool(os.environ.get(flag))


def _outcomes(test_file: str, flag: str) -> dict[str, str]:
    """Test name (with parameters) -> "passed" or the failure text, from one pytest run of
    `test_file` in a fresh Python with TRITON_INTERPRET=1 and `flag` set."""
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "report.xml"
        env = dict(os.environ, TRITON_INTERPRET="1", **{flag: "1"})
        run = subprocess.run(
            [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={report}", test_file],
            env=env, cwd=REPO, capture_output=True, text=True, timeout=1200)
        if not report.exists():
            raise RuntimeError(f"pytest subprocess on {test_file} wrote no report (rc {run.returncode}):\n"
                               f"{run.stdout[-4000:]}\n{run.stderr[-4000:]}")
        outcomes = {}
        for case in ElementTree.parse(report).iter("testcase"):
            problems = [child for child in case if child.tag in ("failure", "error", "skipped")]
            details = "\n".join(f"{p.tag}: {p.get('message')}\n{p.text or ''}" for p in problems)
            outcomes[case.get("name")] = details or "passed"
        return outcomes


def report_from_subprocess(module_globals: dict, flag: str) -> None:
    """Replace every `test_*` function of the module by one that reports the outcome of
    the same test (same parameters) in the subprocess run, made once for the module."""
    outcomes = functools.cache(lambda: _outcomes(module_globals["__file__"], flag))

    def reporter(test):
        @functools.wraps(test)  # keeps the signature and the parametrize marks
        def report(*args, **kwargs):
            # "tests/test_x.py::test_name[params] (call)" -> "test_name[params]"
            name = os.environ["PYTEST_CURRENT_TEST"].split("::")[-1].rsplit(" ", 1)[0]
            outcome = outcomes().get(name, "not run in the subprocess")
            if outcome != "passed":
                pytest.fail(f"{name} in a fresh interpreter: {outcome}", pytrace=False)

        return report

    for name, test in list(module_globals.items()):
        if name.startswith("test_") and callable(test):
            module_globals[name] = reporter(test)
