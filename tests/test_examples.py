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
    """As a user runs it, in vLLM's default compiled mode."""
    out = run_example("offline_batch.py", tiny_checkpoint, "--max-tokens", "8",
                      "--kv-cache-memory-bytes", str(256 << 20))
    assert out.count(" -> ") == 4


def test_speculative_decoding_from_config_file(tiny_checkpoint):
    out = run_example("speculative_decoding.py", tiny_checkpoint, "--kv-cache-memory-bytes",
                      str(256 << 20), "--dtype", "float32", "--enforce-eager")
    assert "speculative decoding counters:" in out
    assert "identical to plain decoding: True" in out


def test_lora_finetune_and_serve(tiny_checkpoint, tmp_path):
    """The adapter learns the file (a repeated passage): vLLM with it continues the
    passage's opening as written; the base model does not."""
    passage = "The JetBlock keeps a small state per head, so decoding stays fast at any length. "
    (tmp_path / "notes.txt").write_text(passage * 20)
    out = run_example("lora_finetune_and_serve.py", tiny_checkpoint, str(tmp_path / "notes.txt"),
                      "--out", str(tmp_path / "adapter"), "--steps", "40", "--lr", "1e-2",
                      "--block", "64", "--max-tokens", "8", "--kv-cache-memory-bytes", str(256 << 20))
    lines = dict(line.split(": ", 1) for line in out.splitlines() if ": " in line)
    first, last = (float(x) for x in lines["training loss"].split(" (")[0].split(" -> "))
    assert last < first / 4
    assert (tmp_path / "adapter" / "adapter_config.json").is_file()
    assert "The JetBlock keeps a small" in lines["with adapter"]
    assert "The JetBlock" not in lines["base model"]
