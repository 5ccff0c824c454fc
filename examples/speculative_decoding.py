"""Speculative decoding from a `speculative_config.json`, checked against plain decoding.

    python examples/speculative_decoding.py path/to/checkpoint [--config examples/speculative_config.json]

The same JSON works with `vllm serve <checkpoint> --speculative-config "$(cat speculative_config.json)"`.
On CPU, vLLM's prefix caching is turned off while speculative decoding is on (the plugin
logs why). Greedy output should be the same with and without speculation; the script
prints whether it is (see the README's known issues).
"""

import argparse
import json
from pathlib import Path

from vllm import LLM, SamplingParams


def generate(model: str, prompts: list[str], speculative_config: dict | None, kv_bytes: int):
    llm = LLM(model=model, speculative_config=speculative_config, kv_cache_memory_bytes=kv_bytes,
              max_model_len=4096, disable_log_stats=False)
    outputs = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=48))
    counters = {m.name: m.value for m in llm.get_metrics()
                if m.name.startswith("vllm:spec_decode_num") and hasattr(m, "value")}
    llm.llm_engine.engine_core.shutdown()
    return outputs, counters


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("model", help="a Jet-Nemotron checkpoint folder")
    parser.add_argument("--config", type=Path, default=Path(__file__).with_name("speculative_config.json"))
    parser.add_argument("--kv-cache-memory-bytes", type=int, default=1 << 30)
    args = parser.parse_args()

    speculative_config = json.loads(args.config.read_text())
    prompts = ["1, 2, 3, 4, 1, 2, 3, 4, 1, 2, 3, 4, 1, 2,", "def add(a, b):\n    return a + b\n\ndef"]
    plain, _ = generate(args.model, prompts, None, args.kv_cache_memory_bytes)
    speculative, counters = generate(args.model, prompts, speculative_config, args.kv_cache_memory_bytes)
    for output in speculative:
        print(f"{output.prompt!r} -> {output.outputs[0].text!r}")
    print("speculative decoding counters:", counters)
    # Compare tokens: the text of tokens that are not whole UTF-8 characters can be
    # detokenized differently when several tokens arrive in one step.
    identical = [o.outputs[0].token_ids for o in speculative] == [o.outputs[0].token_ids for o in plain]
    print("identical to plain decoding:", identical)


if __name__ == "__main__":
    main()
