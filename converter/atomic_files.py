"""Outputs written whole or not at all: a reader (or a resumed run) never sees half a file
or half a folder, whatever kills the writer."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch


def save_atomic(obj, path: Path) -> None:
    """`torch.save` to a temporary name, then rename."""
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def write_json_atomic(obj, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2))
    os.replace(tmp, path)


@contextlib.contextmanager
def folder_written_atomically(out: Path) -> Iterator[Path]:
    """Yield a new hidden folder beside `out`, renamed to `out` when the block ends and
    removed if it raises."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    tmp.chmod(0o755)
    try:
        yield tmp
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
