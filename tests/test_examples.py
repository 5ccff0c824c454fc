"""The offline examples run as written on a checkpoint the tests build."""

import subprocess
import sys
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def run_example(name: str, *args: str) -> str:
    result = subprocess.run([sys.executable, str(EXAMPLES / name), *args],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    return result.stdout


def test_offline_batch(tiny_checkpoint):
    out = run_example("offline_batch.py", tiny_checkpoint, "--max-tokens", "8",
                      "--kv-cache-memory-bytes", str(256 << 20))
    assert out.count(" -> ") == 4


def test_speculative_decoding_from_config_file(tiny_checkpoint):
    out = run_example("speculative_decoding.py", tiny_checkpoint, "--kv-cache-memory-bytes",
                      str(256 << 20), "--dtype", "float32")
    assert "speculative decoding counters:" in out
    assert "identical to plain decoding: True" in out
