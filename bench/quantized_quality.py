"""Validation perplexity and retrieval accuracy of a checkpoint and of its w8a8 and w4a16
quantizations (`jet-nemotron-convert quantize`), each served by vLLM: what a user of the
quantized checkpoint gets. The shipped demo model by default.

    .venv/bin/python bench/quantized_quality.py                     # after `make demo-model` (its corpus)
    .venv/bin/python bench/quantized_quality.py CHECKPOINT --corpus DATA --recipe RECIPE

The held-out tokens, windows and retrieval prompts are the converter's own (the recipe's
`seq_len`, `val_fraction`, `max_tokens` and seed over the same corpus), tokenized by the
checkpoint's tokenizer as vLLM loads it; `--tokenizer TEACHER` gives the converter's own tokens,
whose bf16 row is the conversion report's. (For the demo model the two differ: transformers
loads the demo teacher's tokenizer files as `Qwen2Tokenizer`, because of the teacher's
`model_type`, and the same files beside a Jet-Nemotron config as the generic tokenizer.) Both metrics are teacher-forced and come from vLLM's
prompt logprobs: perplexity from the logprob of every next token, retrieval from whether every
value token of a query is the top-1 prediction. Writes bench/results/quantized_quality.json.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results" / "quantized_quality.json"


def held_out_data(tokenizer: str, corpus: str, recipe_path: str, windows: int | None, samples: int, cache: Path):
    """(validation windows [N, L], retrieval set) as the converter builds them."""
    from transformers import AutoConfig

    from vllm_jetnemotron.config import JetNemotronConfig
    from vllm_jetnemotron.converter.data import RetrievalTask, retrieval_set, tokenize_corpus, validation_batches
    from vllm_jetnemotron.converter.recipe import Recipe, read_recipe_file

    recipe = Recipe.model_validate(read_recipe_file(recipe_path)).model_dump()  # with the defaults
    AutoConfig.register(JetNemotronConfig.model_type, JetNemotronConfig)  # the tokenizer reads config.json
    seq_len = recipe["seq_len"]
    tokens = tokenize_corpus([corpus], tokenizer, cache, seq_len, recipe["val_fraction"], recipe["max_tokens"])
    windows = windows or recipe["placement"]["eval_batches"] * recipe["batch_size"]
    val = validation_batches(tokens.val, 1, windows, seq_len)[0]
    retrieval = retrieval_set(tokens.val, samples, seq_len, RetrievalTask.from_recipe(recipe["retrieval"]),
                              recipe["seed"])
    return val, retrieval


def quality(checkpoint: str, val, retrieval, kv_bytes: int) -> dict:
    """Perplexity over `val` and retrieval accuracy (queries recalled exactly), in vLLM."""
    from vllm import LLM

    from evaluate import teacher_forced_quality

    llm = LLM(model=checkpoint, kv_cache_memory_bytes=kv_bytes, max_model_len=val.shape[1] + 8, seed=0)
    try:
        r = teacher_forced_quality(llm, val, retrieval)
    finally:
        llm.llm_engine.engine_core.shutdown()
    return {"val_ppl": r["ppl"], "val_tokens": r["tokens"], "retrieval": r["retrieval"],
            "retrieval_ci95": r["retrieval_ci95"], "retrieval_queries": r["retrieval_queries"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", nargs="?", default="checkpoints/demo-jet-nemotron")
    parser.add_argument("--corpus", default="models/demo-corpus", help="the data the checkpoint was converted on")
    parser.add_argument("--recipe", default="recipes/demo.yaml", help="the recipe it was converted with")
    parser.add_argument("--tokenizer", help="folder whose tokenizer splits the corpus (default: the checkpoint's, "
                                            "as vLLM serves it; the teacher's gives the converter's tokens)")
    parser.add_argument("--windows", type=int, default=None,
                        help="validation windows of seq_len tokens (default: the converter's, "
                             "placement.eval_batches x batch_size)")
    parser.add_argument("--retrieval-samples", type=int, default=512)
    parser.add_argument("--group-size", type=int, default=None, help="w4a16 group size (default 128)")
    parser.add_argument("--kv-cache-memory-bytes", type=int, default=1 << 30)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        val, retrieval = held_out_data(args.tokenizer or args.checkpoint, args.corpus, args.recipe, args.windows,
                                       args.retrieval_samples, Path(tmp) / "cache")
        config = json.loads((Path(args.checkpoint) / "config.json").read_text())
        unquantized = str(config.get("dtype") or config.get("torch_dtype"))  # the checkpoint's own weights
        results = {}
        for scheme in (unquantized, "w8a8", "w4a16"):
            path = args.checkpoint
            if scheme != unquantized:
                path = str(Path(tmp) / scheme)
                group = ["--group-size", str(args.group_size)] if scheme == "w4a16" and args.group_size else []
                subprocess.run([sys.executable, "-m", "vllm_jetnemotron.converter", "quantize", args.checkpoint,
                                path, "--scheme", scheme, *group], check=True)
            results[scheme] = quality(path, val, retrieval, args.kv_cache_memory_bytes)
            print(scheme, json.dumps(results[scheme]), flush=True)
    base = results[unquantized]["val_ppl"]
    print(f"\n| weights | val perplexity | vs {unquantized} | retrieval (95% CI) |\n|---|---|---|---|")
    for scheme, r in results.items():
        low, high = r["retrieval_ci95"]
        print(f"| {scheme} | {r['val_ppl']:.3f} | {r['val_ppl'] / base - 1:+.2%} | "
              f"{r['retrieval']:.1%} ({low:.1%}-{high:.1%}) |")
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps({"checkpoint": args.checkpoint, "group_size": args.group_size or 128,
                                   "windows": len(val), "results": results}, indent=2) + "\n")
    print(f"wrote {RESULTS}")


if __name__ == "__main__":  # vLLM starts worker processes
    main()
