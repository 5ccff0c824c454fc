"""vLLM 0.34 deletes `v1/worker/gpu_model_runner.py`, `v1/worker/cpu_model_runner.py` and
`v1/spec_decode/draft_model.py`: the patches aimed at them skip where the module is gone, so
a `draft_model` or pipeline-parallel engine still starts there."""

import subprocess
import sys

REMOVED_IN_0_34 = ["vllm.v1.spec_decode.draft_model", "vllm.v1.worker.cpu_model_runner",
                   "vllm.v1.worker.gpu_model_runner"]

SCRIPT = f"""
import importlib.abc, sys

class Removed(importlib.abc.MetaPathFinder):  # these modules do not exist, as in vLLM 0.34
    def find_spec(self, name, path, target=None):
        if name in {REMOVED_IN_0_34!r}:
            raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)

sys.meta_path.insert(0, Removed())
from vllm_jetnemotron.cpu_pipeline_buffers import allocate_pipeline_buffers_on_cpu
from vllm_jetnemotron.draft_model_cache_group import use_drafter_cache_group

from vllm_jetnemotron import patches

from vllm.config import VllmConfig

use_drafter_cache_group(VllmConfig())
allocate_pipeline_buffers_on_cpu()
assert not any(name in sys.modules for name in {REMOVED_IN_0_34!r})
assert patches.reported() == {{"draft_model_cache_group": "no target", "cpu_pipeline_buffers": "no target"}}
print("skipped")
"""


def test_patches_skip_modules_vllm_removed():
    result = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().endswith("skipped")
