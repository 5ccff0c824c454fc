"""How vLLM compiles the model on a GPU, checked where it can be here: the JetBlock's
stateful core splits the piecewise-compiled graph, like vLLM's own recurrent ops."""

import subprocess
import sys

SPLITS_AT_THE_CORE = """
from vllm.config import CompilationConfig, CompilationMode
from vllm.plugins import load_general_plugins

load_general_plugins()  # what every vLLM process does before it builds its config
config = CompilationConfig(mode=CompilationMode.VLLM_COMPILE)
config.set_splitting_ops_for_v1(all2all_backend="naive")
assert "vllm::jet_block_core" in config.splitting_ops, config.splitting_ops
assert "vllm::qwen_gdn_attention_core" in config.splitting_ops  # vLLM's own, for comparison
assert config.splitting_ops_contain_attention()
load_general_plugins()  # idempotent
assert CompilationConfig._attention_ops.count("vllm::jet_block_core") == 1
print("ok")
"""


def test_vllm_compile_splits_the_graph_at_the_jetblock_core():
    # a fresh interpreter: the plugin is found through its entry point, as in vLLM
    done = subprocess.run([sys.executable, "-c", SPLITS_AT_THE_CORE], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-3000:]
