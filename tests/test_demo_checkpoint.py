"""The demo checkpoint shipped in checkpoints/ (what `make serve` serves by default): in the
official format, with working speculative-decoding configs, and served by vLLM as the
reference model computes it."""

import json
import re
from pathlib import Path

import torch
from safetensors import safe_open
from transformers import AutoTokenizer

from conftest import load_example, reference_greedy, running_llm, serving, token_ids
from vllm_jetnemotron.config import JetNemotronConfig, checkpoint_tensor_shapes

REPO = Path(__file__).resolve().parent.parent
DEMO = REPO / "checkpoints" / "demo-jet-nemotron"
PROMPTS = ["import os\n\n\ndef read_lines(path):\n    ", "class Stack:\n    def __init__(self):\n        self."]
NEW_TOKENS = 24


def tensor_shapes(folder: Path) -> dict[str, tuple[int, ...]]:
    with safe_open(folder / "model.safetensors", "pt") as f:
        return {name: tuple(f.get_slice(name).get_shape()) for name in f.keys()}


def test_the_demo_and_its_draft_hold_exactly_the_official_tensors():
    for folder in (DEMO, DEMO / "draft"):
        config = JetNemotronConfig.from_pretrained(folder)
        assert tensor_shapes(folder) == checkpoint_tensor_shapes(config), folder
    assert (DEMO / "PROVENANCE.md").is_file()


def test_the_speculative_configs_name_the_shipped_drafts():
    # paths relative to the repository root, where `make serve` runs
    for name, method, folder in (("speculative_config.json", "eagle3", "eagle3"),
                                 ("speculative_config.draft_model.json", "draft_model", "draft")):
        spec = json.loads((DEMO / name).read_text())
        assert spec["method"] == method
        assert (REPO / spec["model"]).resolve() == (DEMO / folder).resolve()
        assert (REPO / spec["model"] / "config.json").is_file()


def test_vllm_writes_what_the_reference_model_writes():
    """float32 greedy continuations of two code prompts (up to the end-of-text token, as
    both stop there): vLLM equals the reference model."""
    from vllm import SamplingParams

    from vllm_jetnemotron.converter.modeling import JetNemotronForCausalLM

    reference = JetNemotronForCausalLM.from_pretrained(DEMO, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(DEMO, config=reference.config)
    prompts = [tokenizer(p).input_ids for p in PROMPTS]
    expected = [reference_greedy(reference, p, NEW_TOKENS) for p in prompts]
    with running_llm(str(DEMO)) as llm:
        outputs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                               SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS))
    assert token_ids(outputs) == expected
    assert all(o.outputs[0].text.strip() for o in outputs)


def test_make_serve_arguments_make_a_valid_engine_config():
    """`make serve`'s default MODEL and SERVE_ARGS, through vLLM's own argument parsing and
    engine-config checks (what `vllm serve` does before it starts an engine)."""
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    makefile = (REPO / "Makefile").read_text()
    model = re.search(r"^MODEL \?= (.+)$", makefile, re.M).group(1).strip()
    serve_args = re.search(r"^SERVE_ARGS \?= (.*)$", makefile, re.M).group(1).split()
    assert (REPO / model).resolve() == DEMO.resolve()
    parser = AsyncEngineArgs.add_cli_args(FlexibleArgumentParser())
    args = parser.parse_args(["--model", str(DEMO), *serve_args])
    config = AsyncEngineArgs.from_cli_args(args).create_engine_config()
    assert config.model_config.max_model_len > 0


def test_make_serve_chats_with_the_openai_example(tmp_path):
    """`examples/openai_chat.py` against the demo served with `make serve`'s arguments: the
    checkpoint's chat template renders the conversation, and the reply is what offline
    `LLM.chat` writes for it."""
    import subprocess
    import sys

    from vllm import SamplingParams


    serve_args = re.search(r"^SERVE_ARGS \?= (.*)$", (REPO / "Makefile").read_text(), re.M).group(1).split()
    with serving(str(DEMO), tmp_path / "server.log", *serve_args) as base:
        result = subprocess.run([sys.executable, str(REPO / "examples" / "openai_chat.py"), "--base-url",
                                 f"{base}/v1"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    example = load_example("openai_chat.py")
    with running_llm(str(DEMO)) as llm:
        (expected,) = llm.chat(example.MESSAGES, SamplingParams(temperature=0.0, max_tokens=example.MAX_TOKENS))
    assert expected.prompt.startswith("# system: You are a concise assistant.\n# user: ")
    assert expected.outputs[0].text.strip() and result.stdout == expected.outputs[0].text + "\n"
