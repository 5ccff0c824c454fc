"""Outputs written whole or not at all: a reader (or a resumed run) never sees half a file
or half a folder, whatever kills the writer. A write that fails (a full disk) raises
OSError naming the file."""

from __future__ import annotations

import contextlib
import glob
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import SafetensorError


@contextlib.contextmanager
def errors_naming(path: Path) -> Iterator[None]:
    """A failed write in the block (a full disk) that names no file comes out as OSError
    naming `path`, also where `torch.save` reports it as RuntimeError (its context the
    OSError) and safetensors as SafetensorError ("... (os error 28)")."""
    try:
        yield
    except (OSError, RuntimeError, SafetensorError) as error:
        cause = error if isinstance(error, OSError) else error.__context__
        found = re.search(r"\(os error (\d+)\)", str(error))
        if isinstance(cause, OSError) and cause.errno and cause.filename is None:
            code = cause.errno
        elif found:
            code = int(found[1])
        else:
            raise
        raise OSError(code, os.strerror(code), str(path)) from error


def save_atomic(obj, path: Path) -> None:
    """`torch.save` to a temporary name, then rename."""
    tmp = path.with_name(path.name + ".tmp")
    with errors_naming(tmp), tmp.open("wb") as f:  # through Python: a failed write keeps its OSError
        torch.save(obj, f)
    os.replace(tmp, path)


def write_text_atomic(text: str, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with errors_naming(tmp):
        tmp.write_text(text)
    os.replace(tmp, path)


def write_json_atomic(obj, path: Path) -> None:
    write_text_atomic(json.dumps(obj, indent=2), path)


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (OSError, OverflowError):  # another user's process; not a process id
        pass
    return True


@contextlib.contextmanager
def folder_written_atomically(out: Path) -> Iterator[Path]:
    """Yield a new hidden folder beside `out`, renamed to `out` when the block ends and
    removed if it raises. Such folders of `out` whose writer process is gone (killed) are
    removed first."""
    out.parent.mkdir(parents=True, exist_ok=True)
    prefix = f".{out.name}.partial-"
    for folder in out.parent.glob(glob.escape(prefix) + "*"):
        pid = folder.name[len(prefix):].split("-")[0]
        if pid.isdigit() and not _running(int(pid)):
            shutil.rmtree(folder, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix=f"{prefix}{os.getpid()}-", dir=out.parent))
    tmp.chmod(0o755)
    try:
        yield tmp
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
