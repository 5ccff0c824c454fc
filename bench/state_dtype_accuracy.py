"""What bfloat16 recurrent states cost in accuracy, against the reference model.

    .venv/bin/python bench/state_dtype_accuracy.py CHECKPOINT --data CORPUS
    .venv/bin/python bench/state_dtype_accuracy.py ~/.cache/vllm-jetnemotron/smollm2-jet-nemotron \\
        --data ~/.cache/vllm-jetnemotron/smollm2-data

The checkpoint is served by vLLM with bf16 activations twice: JetBlock states in float32
(`--mamba-ssm-cache-dtype auto`, what vLLM keeps on the CPU) and in bfloat16 (`bfloat16`, half
the bytes per sequence: more sequences in one cache budget, bench/capacity_throughput.py).
Each run decodes greedily from the same held-out prompts (prose and code of the corpus's
`heldout/` split). Every decode step reads the states back from vLLM's cache and stores them
again, so their rounding compounds over the generated tokens; a teacher-forced perplexity
prefills whole windows and would not see it.

The reference model (the converter's Hugging Face modeling, float32) then reads each run's own
tokens, teacher-forced, and gives its logits at every generated position. Per state dtype:

* top-1 agreement: the share of generated tokens that are the reference's top-1 there;
* |logit difference|: vLLM's raw logits of its top-20 tokens against the reference's, mean
  and largest over all steps (bf16 activations alone account for part of it: the float32
  state row is the baseline);
* and between the two runs: the tokens generated before their first difference.

Writes bench/results/state_dtype_accuracy.json and prints the README's table.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from evaluate import held_out_documents, token_stream

RESULTS = Path(__file__).resolve().parent / "results" / "state_dtype_accuracy.json"
STATE_DTYPES = {"float32": "auto", "bfloat16": "bfloat16"}  # allocated dtype: vLLM's setting on CPU
TOP_LOGITS = 20


def held_out_prompts(tokenizer, corpus: Path, count: int, length: int) -> list[list[int]]:
    """`count` prompts of `length` tokens, half from held-out prose and half from code, each
    the start of a different stretch of the held-out token stream."""
    prompts = []
    for kind, n in (("prose", count - count // 2), ("code", count // 2)):
        tokens = token_stream(tokenizer, held_out_documents(corpus, kind))
        stride = len(tokens) // n
        if stride < length:
            raise SystemExit(f"{corpus}/heldout/{kind}.jsonl has {len(tokens)} tokens: too few for {n} prompts "
                             f"of {length}")
        prompts += [tokens[i * stride: i * stride + length].tolist() for i in range(n)]
    return prompts


def decode(checkpoint: str, state_dtype: str, prompts: list[list[int]], new_tokens: int, kv_bytes: int) -> dict:
    """Greedy continuations with vLLM's raw top-20 logits at every step."""
    from vllm import LLM, SamplingParams

    llm = LLM(model=checkpoint, dtype="bfloat16", mamba_ssm_cache_dtype=state_dtype, kv_cache_memory_bytes=kv_bytes,
              max_model_len=len(prompts[0]) + new_tokens + 8, logprobs_mode="raw_logits", max_logprobs=TOP_LOGITS,
              seed=0)
    try:
        allocated = llm.llm_engine.vllm_config.cache_config.mamba_ssm_cache_dtype
        t0 = time.monotonic()
        outputs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                               SamplingParams(temperature=0.0, max_tokens=new_tokens, ignore_eos=True,
                                              logprobs=TOP_LOGITS))
        wall = time.monotonic() - t0
    finally:
        llm.llm_engine.engine_core.shutdown()
    runs = [{"tokens": list(o.outputs[0].token_ids),
             "top_logits": [{int(t): lp.logprob for t, lp in step.items()} for step in o.outputs[0].logprobs]}
            for o in outputs]
    return {"mamba_ssm_cache_dtype": allocated, "decode_wall_s": wall, "runs": runs}


def against_reference(reference, prompts: list[list[int]], runs: list[dict]) -> dict:
    """Top-1 agreement and |logit difference| of one state dtype's runs, the reference reading
    each run's own tokens."""
    agree = total = 0
    diffs = []
    for prompt, run in zip(prompts, runs):
        tokens = run["tokens"]
        with torch.no_grad():
            # logits at the positions that predicted the generated tokens: [new_tokens, vocab]
            logits = reference(torch.tensor([prompt + tokens[:-1]])).logits[0, len(prompt) - 1:].float()
        agree += int((logits.argmax(-1) == torch.tensor(tokens)).sum())
        total += len(tokens)
        for step, top in enumerate(run["top_logits"]):
            ids = torch.tensor(list(top))
            diffs.append((torch.tensor(list(top.values())) - logits[step, ids]).abs())
    diffs = torch.cat(diffs)
    return {"top1_agreement": agree / total, "generated_tokens": total,
            "logit_diff_mean": float(diffs.mean()), "logit_diff_max": float(diffs.max()),
            "logit_diff_p99": float(diffs.quantile(0.99))}


def common_prefix(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint")
    parser.add_argument("--data", required=True, type=Path,
                        help="corpus folder of `jet-nemotron-convert build-data` (its heldout/ split)")
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--prompt-len", type=int, default=256)
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--kv-cache-memory-bytes", type=int, default=1 << 30)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()

    from transformers import AutoConfig, AutoTokenizer

    from vllm_jetnemotron.config import JetNemotronConfig
    from vllm_jetnemotron.converter.modeling import JetNemotronForCausalLM

    AutoConfig.register(JetNemotronConfig.model_type, JetNemotronConfig)  # the tokenizer reads config.json

    prompts = held_out_prompts(AutoTokenizer.from_pretrained(args.checkpoint), args.data, args.prompts,
                               args.prompt_len)
    results = {name: decode(args.checkpoint, setting, prompts, args.new_tokens, args.kv_cache_memory_bytes)
               for name, setting in STATE_DTYPES.items()}
    reference = JetNemotronForCausalLM.from_pretrained(args.checkpoint, dtype=torch.float32).eval()
    for name, r in results.items():
        if r["mamba_ssm_cache_dtype"] != name:
            raise SystemExit(f"vLLM allocated {r['mamba_ssm_cache_dtype']} states where {name} was asked for")
        r.update(against_reference(reference, prompts, r["runs"]))
    same = [common_prefix(a["tokens"], b["tokens"]) for a, b in zip(*(r["runs"] for r in results.values()))]
    summary = {"checkpoint": args.checkpoint, "prompts": len(prompts), "prompt_len": args.prompt_len,
               "new_tokens": args.new_tokens, "identical_tokens_before_first_difference": same,
               "runs_identical": sum(n == args.new_tokens for n in same),
               "results": {name: {k: v for k, v in r.items() if k != "runs"} for name, r in results.items()}}
    lines = ["| states | top-1 agreement with the reference | mean / p99 / max abs logit difference (top 20) |",
             "|---|---:|---|"]
    for name, r in summary["results"].items():
        lines.append(f"| {name} | {r['top1_agreement']:.1%} of {r['generated_tokens']} | {r['logit_diff_mean']:.3f} / "
                     f"{r['logit_diff_p99']:.3f} / {r['logit_diff_max']:.3f} |")
    lines.append(f"\nThe two runs generate the same {args.new_tokens} tokens for {summary['runs_identical']} of "
                 f"{len(prompts)} prompts; median tokens before the first difference: "
                 f"{sorted(same)[len(same) // 2]}.")
    summary["table"] = "\n".join(lines)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(summary, indent=2) + "\n")
    print(summary["table"])
    print(f"wrote {args.out}")


if __name__ == "__main__":  # vLLM starts worker processes
    main()
