"""What a checkpoint keeps, measured the way its users get it: served by vLLM, on held-out data
no conversion trained on (`jet-nemotron-convert build-data`'s `heldout/` split). One table
row per checkpoint, the teacher and its conversions alike:

    .venv/bin/python bench/evaluate.py CHECKPOINT --data CORPUS [--dtype float32]
    .venv/bin/python bench/evaluate.py --table RESULT.json [RESULT.json ...]   # README table

* perplexity on held-out prose and on held-out code: windows of `--seq-len` tokens, each
  token's logprob given the ones before it (vLLM prompt logprobs);
* multi-query recall: the converter's retrieval task (`converter/data.py`, held-out records
  written over held-out text; the recipe's `retrieval` settings), a query recalled when every
  value token is the top-1 prediction, with its 95% Wilson interval;
* a local multiple-choice lm-eval task through `--model vllm` (`python -m vllm_jetnemotron
  lm_eval`): which of four continuations follows a held-out prose passage;
* 10 chat prompts answered greedily, in full (the checkpoint's chat template);
* prefill tokens/s of one long prompt and decode tokens/s at batch 1 and 16.

Writes bench/results/evaluate/<name>.json (`--out` to choose). Every figure depends on the
dtype (`--dtype`, float32 by default: a 4-bit-derived model is sensitive to rounding) and the
tokenizer (perplexities of checkpoints with different tokenizers are not comparable).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results" / "evaluate"
CHAT_PROMPTS = [
    "What is the capital of France?",
    "What is 2 + 2?",
    "Write a Python function that returns the sum of two numbers.",
    "Explain what a list comprehension is in Python.",
    "Give me three tips for writing readable code.",
    "What is the difference between a tuple and a list in Python?",
    "Translate 'good morning' into Spanish.",
    "Why is the sky blue?",
    "Write a haiku about the ocean.",
    "How do I read a file line by line in Python?",
]
CHOICES = 4


def held_out_documents(corpus: Path, kind: str) -> list[str]:
    path = corpus / "heldout" / f"{kind}.jsonl"
    if not path.is_file():
        raise SystemExit(f"{path} does not exist: build the corpus with `jet-nemotron-convert build-data`")
    return [json.loads(line)["text"] for line in path.read_text().splitlines() if line.strip()]


def token_stream(tokenizer, documents: list[str]) -> torch.Tensor:
    eos = tokenizer.eos_token_id or 0
    ids = []
    for doc in documents:
        ids += tokenizer(doc, add_special_tokens=False)["input_ids"] + [eos]
    return torch.tensor(ids)


def windows_of(tokens: torch.Tensor, seq_len: int, max_tokens: int) -> torch.Tensor:
    """Consecutive windows [N, seq_len] from the start of `tokens`, at most `max_tokens` in all."""
    count = min(len(tokens) // seq_len, max(1, max_tokens // seq_len))
    return tokens[:count * seq_len].view(count, seq_len)


def teacher_forced_quality(llm, windows: torch.Tensor | None, retrieval) -> dict:
    """Perplexity over `windows` and the recall of `retrieval` (queries whose every value
    token is the top-1 prediction), from vLLM's prompt logprobs."""
    from vllm import SamplingParams

    from vllm_jetnemotron.converter.training import wilson_interval

    params = SamplingParams(max_tokens=1, prompt_logprobs=1, temperature=0.0)
    result = {}
    if windows is not None:
        nll, count = 0.0, 0
        for row, out in zip(windows, llm.generate([{"prompt_token_ids": r.tolist()} for r in windows], params)):
            for token, logprobs in zip(row.tolist()[1:], out.prompt_logprobs[1:]):
                nll -= logprobs[token].logprob
                count += 1
        result.update(ppl=math.exp(nll / count), tokens=count)
    if retrieval is not None:
        prompts = [{"prompt_token_ids": row.tolist()} for row in retrieval.input_ids]
        correct = total = 0
        for row, positions, out in zip(retrieval.input_ids, retrieval.value_positions, llm.generate(prompts, params)):
            for query in positions.tolist():
                correct += all(out.prompt_logprobs[p][int(row[p])].rank == 1 for p in query)
                total += 1
        result.update(retrieval=correct / total, retrieval_ci95=list(wilson_interval(correct, total)),
                      retrieval_queries=total)
    return result


def choice_task(folder: Path, tokenizer, documents: list[str], count: int, context: int = 96,
                continuation: int = 16) -> Path:
    """An lm-eval multiple-choice task over held-out prose: a passage of `context` tokens and
    four continuations of `continuation` tokens, the true one and three from other passages."""
    g = torch.Generator().manual_seed(0)
    tokens = token_stream(tokenizer, documents)
    span = context + continuation
    starts = torch.randperm(len(tokens) // span, generator=g)[:count] * span
    passages = [(tokenizer.decode(tokens[s:s + context]), tokenizer.decode(tokens[s + context:s + span]))
                for s in starts.tolist()]
    with open(folder / "choice.jsonl", "w") as f:
        for i, (text, truth) in enumerate(passages):
            others = [passages[(i + j) % len(passages)][1] for j in range(1, CHOICES)]
            answer = int(torch.randint(CHOICES, (1,), generator=g))
            choices = others[:answer] + [truth] + others[answer:]
            f.write(json.dumps({"text": text, "choices": choices, "answer": answer}) + "\n")
    (folder / "heldout_choice.yaml").write_text(
        "task: heldout_prose_continuation\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
        f"    test: {folder / 'choice.jsonl'}\ntest_split: test\noutput_type: multiple_choice\n"
        'doc_to_text: "{{text}}"\ndoc_to_choice: "{{choices}}"\ndoc_to_target: answer\n'
        'target_delimiter: ""\nmetric_list:\n  - metric: acc\n  - metric: acc_norm\n')
    return folder


def lm_eval_choice(checkpoint: str, dtype: str, tasks: Path, kv_bytes: int) -> dict:
    model_args = f"pretrained={checkpoint},dtype={dtype},max_model_len=2048,kv_cache_memory_bytes={kv_bytes},seed=0"
    out = tasks / "out"
    subprocess.run([sys.executable, "-m", "vllm_jetnemotron", "lm_eval", "--model", "vllm", "--model_args",
                    model_args, "--tasks", "heldout_prose_continuation", "--include_path", str(tasks),
                    "--batch_size", "auto", "--output_path", str(out)], check=True,
                   env=dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1"))
    scores = json.loads(next(out.rglob("results_*.json")).read_text())["results"]["heldout_prose_continuation"]
    return {k.split(",")[0]: v for k, v in scores.items() if k.split(",")[0] in ("acc", "acc_norm", "acc_stderr")}


def chat_answers(llm, tokenizer, max_tokens: int) -> list[dict] | None:
    from vllm import SamplingParams

    if tokenizer.chat_template is None:
        return None
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens)
    conversations = [[{"role": "user", "content": p}] for p in CHAT_PROMPTS]
    outputs = llm.chat(conversations, params, use_tqdm=False)
    return [{"prompt": p, "answer": o.outputs[0].text} for p, o in zip(CHAT_PROMPTS, outputs)]


def speed(llm, vocab: int, prefill_len: int, new_tokens: int = 128) -> dict:
    """Prefill tokens/s of one prompt, decode tokens/s at batch 1 and 16 (after a warm-up)."""
    from vllm import SamplingParams

    g = torch.Generator().manual_seed(1)
    prompt = {"prompt_token_ids": torch.randint(100, vocab, (prefill_len,), generator=g).tolist()}
    llm.generate([prompt], SamplingParams(max_tokens=1), use_tqdm=False)  # warm-up (and compile)
    prompt = {"prompt_token_ids": torch.randint(100, vocab, (prefill_len,), generator=g).tolist()}
    t0 = time.perf_counter()
    llm.generate([prompt], SamplingParams(max_tokens=1), use_tqdm=False)
    result = {"prefill_tokens_per_s": prefill_len / (time.perf_counter() - t0)}
    decode = SamplingParams(max_tokens=new_tokens, ignore_eos=True, temperature=0.0)
    for batch in (1, 16):
        prompts = [{"prompt_token_ids": torch.randint(100, vocab, (32,), generator=g).tolist()} for _ in range(batch)]
        llm.generate(prompts, SamplingParams(max_tokens=4, ignore_eos=True), use_tqdm=False)
        t0 = time.perf_counter()
        llm.generate(prompts, decode, use_tqdm=False)
        result[f"decode_tokens_per_s_batch{batch}"] = batch * new_tokens / (time.perf_counter() - t0)
    return result


def cpu_model() -> str:
    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").is_file() else ""
    match = re.search(r"^model name\s*:\s*(.+)$", info, re.M)
    return match.group(1).strip() if match else "unknown"


def evaluate(args) -> dict:
    from transformers import AutoConfig, AutoTokenizer
    from vllm import LLM

    from vllm_jetnemotron.config import JetNemotronConfig
    from vllm_jetnemotron.converter.data import RetrievalTask, retrieval_set

    AutoConfig.register(JetNemotronConfig.model_type, JetNemotronConfig)  # the tokenizer reads config.json
    tokenizer = AutoTokenizer.from_pretrained(args.checkpoint)
    corpus = Path(args.data)
    prose, code = held_out_documents(corpus, "prose"), held_out_documents(corpus, "code")
    prose_tokens, code_tokens = token_stream(tokenizer, prose), token_stream(tokenizer, code)
    task = RetrievalTask(args.key_len, args.value_len, args.pairs, args.queries)
    retrieval = retrieval_set(torch.cat([prose_tokens, code_tokens]), args.recall_samples, args.seq_len, task, 0)
    llm = LLM(model=args.checkpoint, dtype=args.dtype, kv_cache_memory_bytes=args.kv_cache_memory_bytes,
              max_model_len=max(args.seq_len, args.prefill_len) + 8, seed=0, enforce_eager=args.eager)
    try:
        result = {"checkpoint": args.checkpoint, "dtype": args.dtype, "seq_len": args.seq_len,
                  "prose": teacher_forced_quality(llm, windows_of(prose_tokens, args.seq_len, args.tokens), None),
                  "code": teacher_forced_quality(llm, windows_of(code_tokens, args.seq_len, args.tokens), None),
                  "recall": {**teacher_forced_quality(llm, None, retrieval), "task": task.__dict__},
                  "chat": chat_answers(llm, tokenizer, args.chat_max_tokens),
                  "speed": {**speed(llm, len(tokenizer), args.prefill_len), "cpu": cpu_model(),
                            "cores": os.environ.get("VLLM_CPU_OMP_THREADS_BIND", "auto")}}
        print(json.dumps({k: result[k] for k in ("prose", "code", "recall", "speed")}, indent=1), flush=True)
    finally:
        llm.llm_engine.engine_core.shutdown()
    with tempfile.TemporaryDirectory() as tmp:
        tasks = choice_task(Path(tmp), tokenizer, prose, args.choice_items)
        result["lm_eval"] = lm_eval_choice(args.checkpoint, args.dtype, tasks, args.kv_cache_memory_bytes)
    return result


def table(results: list[dict]) -> str:
    lines = ["| checkpoint | dtype | prose ppl | code ppl | recall (95% CI) | continuation acc (lm-eval) | "
             "prefill tok/s | decode tok/s, batch 1 / 16 |", "|---|---|---|---|---|---|---|---|"]
    for r in results:
        low, high = r["recall"]["retrieval_ci95"]
        s = r["speed"]
        lines.append(f"| {r['name']} | {r['dtype']} | {r['prose']['ppl']:.2f} | {r['code']['ppl']:.2f} | "
                     f"{r['recall']['retrieval']:.1%} ({low:.1%}-{high:.1%}) | {r['lm_eval']['acc']:.1%} | "
                     f"{s['prefill_tokens_per_s']:.0f} | {s['decode_tokens_per_s_batch1']:.0f} / "
                     f"{s['decode_tokens_per_s_batch16']:.0f} |")
    for r in results:
        if r["chat"]:
            lines += ["", f"Chat answers of {r['name']} ({r['dtype']}, greedy):", ""]
            lines += [f"{i}. **{c['prompt']}** {c['answer'].strip()}" .replace("\n", " ")
                      for i, c in enumerate(r["chat"], 1)]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", nargs="?")
    p.add_argument("--data", help="corpus folder of `jet-nemotron-convert build-data` (its heldout/ split)")
    p.add_argument("--name", help="the row's name (default: the checkpoint folder's)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--tokens", type=int, default=32768, help="held-out tokens per perplexity")
    p.add_argument("--recall-samples", type=int, default=128)
    p.add_argument("--key-len", type=int, default=2)
    p.add_argument("--value-len", type=int, default=4)
    p.add_argument("--pairs", type=int, default=8)
    p.add_argument("--queries", type=int, default=8)
    p.add_argument("--choice-items", type=int, default=200)
    p.add_argument("--chat-max-tokens", type=int, default=200)
    p.add_argument("--prefill-len", type=int, default=2048)
    p.add_argument("--eager", action="store_true", help="enforce_eager (default: vLLM's compiled mode)")
    p.add_argument("--kv-cache-memory-bytes", type=int, default=1 << 30)
    p.add_argument("--out", help="result JSON (default bench/results/evaluate/<name>.json)")
    p.add_argument("--table", nargs="+", metavar="RESULT", help="print the markdown table of these results")
    args = p.parse_args()
    if args.table:
        print(table([json.loads(Path(f).read_text()) for f in args.table]))
        return
    if not args.checkpoint or not args.data:
        p.error("CHECKPOINT and --data are required (or --table)")
    result = {"name": args.name or Path(args.checkpoint).name, **evaluate(args)}
    out = Path(args.out) if args.out else RESULTS / f"{result['name']}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(table([result]))
    print(f"wrote {out}")


if __name__ == "__main__":  # vLLM starts worker processes
    main()
