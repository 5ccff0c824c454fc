"""Speculative-decoding speed-up on a Jet-Nemotron checkpoint, side by side in one run.

    .venv/bin/python bench/speculative_decoding.py MODEL [--draft DRAFT_FOLDER] [--eagle3 HEAD_FOLDER]

Generates the same greedy completions several ways (plain, `ngram`, `draft_model` when a
draft folder is given, `eagle3` when an EAGLE-3 head folder is given; a converter export
has both, in `draft/` and `eagle3/`) and reports decode tokens/s, the speed-up over plain
decoding and the mean acceptance length (tokens emitted per verification step: 1 +
accepted drafts / verification steps). Writes bench/results/speculative_decoding.json.
A random checkpoint accepts almost no drafts; use a trained one (`make demo-model`).
"""

import argparse
import json
import os
import time
from pathlib import Path

# Every engine compiles as on a cold cache. (Before the plugin made vLLM's AOT artifacts
# loadable on CPU, vllm_jetnemotron/cpu_aot_compile_load.py, a failed load followed by a bf16
# EAGLE-3 engine in the same process died of a stack overflow; not retried since.)
os.environ.setdefault("VLLM_USE_AOT_COMPILE", "0")

from vllm import LLM, SamplingParams  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "speculative_decoding.json"
PROMPTS = [
    "import os\nimport sys\n\n\ndef main():\n",
    "class Stack:\n    def __init__(self):\n        self.items = []\n\n    def push(self, item):\n",
    "for i in range(10):\n    print(i)\nfor i in range(10):\n",
    "def read_lines(path):\n    with open(path) as f:\n",
]


def run(model: str, speculative_config: dict | None, max_tokens: int, kv_bytes: int, dtype: str) -> dict:
    llm = LLM(model=model, speculative_config=speculative_config, kv_cache_memory_bytes=kv_bytes,
              max_model_len=2048, enable_prefix_caching=False, disable_log_stats=False, dtype=dtype)
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)

    def speculation_counters() -> dict[str, float]:
        return {m.name.removeprefix("vllm:spec_decode_num_"): m.value for m in llm.get_metrics()
                if m.name.startswith("vllm:spec_decode_num") and hasattr(m, "value")}

    llm.generate(PROMPTS, params, use_tqdm=False)  # warm-up: the same shapes compile before timing
    before = speculation_counters()
    start = time.perf_counter()
    outputs = llm.generate(PROMPTS, params, use_tqdm=False)
    elapsed = time.perf_counter() - start
    counters = {name: value - before[name] for name, value in speculation_counters().items()}  # timed pass
    llm.llm_engine.engine_core.shutdown()
    generated = sum(len(o.outputs[0].token_ids) for o in outputs)
    result = {"tokens_per_s": generated / elapsed, "seconds": elapsed,
              "token_ids": [list(o.outputs[0].token_ids) for o in outputs]}
    if counters.get("drafts"):
        result["mean_acceptance_length"] = 1 + counters["accepted_tokens"] / counters["drafts"]
        result["counters"] = counters
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model")
    parser.add_argument("--draft", help="draft checkpoint folder for the draft_model method")
    parser.add_argument("--eagle3", help="EAGLE-3 head folder for the eagle3 method")
    parser.add_argument("--num-speculative-tokens", type=int, default=3)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--kv-bytes", type=int, default=1 << 30)
    parser.add_argument("--dtype", default="auto",
                        help="float32 for outputs identical to plain decoding (see the README)")
    args = parser.parse_args()

    k = args.num_speculative_tokens
    methods = {"plain": None,
               "ngram": {"method": "ngram", "num_speculative_tokens": k,
                         "prompt_lookup_min": 2, "prompt_lookup_max": 4}}
    if args.draft:
        methods["draft_model"] = {"method": "draft_model", "model": args.draft, "num_speculative_tokens": k}
    if args.eagle3:
        methods["eagle3"] = {"method": "eagle3", "model": args.eagle3, "num_speculative_tokens": k}
    results = {name: run(args.model, cfg, args.max_tokens, args.kv_bytes, args.dtype) for name, cfg in methods.items()}
    base = results["plain"]
    print(f"{'method':<12} {'tok/s':>8} {'speed-up':>9} {'accept len':>11} {'same tokens':>12}")
    for name, r in results.items():
        r["speedup"] = r["tokens_per_s"] / base["tokens_per_s"]
        r["same_tokens_as_plain"] = r["token_ids"] == base["token_ids"]
        print(f"{name:<12} {r['tokens_per_s']:8.1f} {r['speedup']:8.2f}x "
              f"{r.get('mean_acceptance_length', 1.0):11.2f} {str(r['same_tokens_as_plain']):>12}")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({"model": args.model, "draft": args.draft, "eagle3": args.eagle3, "num_speculative_tokens": k,
                                   "dtype": args.dtype,
                                   "max_tokens": args.max_tokens, "results": results}, indent=2))
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
