"""The converter's optional last step: a user's lm-evaluation-harness tasks on the converted
model (recipe `eval.lm_eval_tasks`, local task YAMLs from `eval.lm_eval_include_path`), run
by lm-eval's `hf` backend on the model in memory; the scores go into the report.

The checkpoint the converter writes can be evaluated the same way through vLLM afterwards
(`lm_eval --model vllm`, README.md)."""

from __future__ import annotations

from torch import nn

from .recipe import RecipeError


def check_lm_eval_tasks(tasks: list[str], include_path: str | None) -> None:
    """Fail before any work if lm-eval is missing or a task is unknown to it."""
    try:
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise RecipeError("eval.lm_eval_tasks needs lm-eval: pip install 'vllm-jetnemotron[eval]'") from None
    known = set(TaskManager(include_path=include_path).all_tasks)
    unknown = [task for task in tasks if task not in known]
    if unknown:
        where = f" or in eval.lm_eval_include_path {include_path}" if include_path else ""
        raise RecipeError(f"eval.lm_eval_tasks: {unknown} not found among lm-eval's tasks{where}")


def lm_eval_scores(model: nn.Module, tokenizer_dir: str, tasks: list[str], include_path: str | None,
                   limit: int | None) -> dict[str, dict[str, float]]:
    """{task: {metric: value}} (lm-eval's names, e.g. `acc,none`), one request at a time
    (the project's model takes no padded batches)."""
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager
    from transformers import AutoTokenizer

    results = lm_eval.simple_evaluate(
        model=HFLM(pretrained=model, tokenizer=AutoTokenizer.from_pretrained(tokenizer_dir), batch_size=1),
        tasks=tasks, task_manager=TaskManager(include_path=include_path), limit=limit)
    return {task: {name: float(value) for name, value in metrics.items()
                   if isinstance(value, (int, float)) and not isinstance(value, bool)}
            for task, metrics in results["results"].items()}
