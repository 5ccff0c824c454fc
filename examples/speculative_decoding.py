"""Speculative decoding from a `speculative_config.json`, checked against plain decoding.

    python examples/speculative_decoding.py path/to/checkpoint [--config examples/speculative_config.json]

The same JSON works with `vllm serve <checkpoint> --speculative-config "$(cat speculative_config.json)"`.
On CPU, vLLM's prefix caching is turned off while speculative decoding is on (the plugin
logs why). Greedy output is the same with and without speculation in float32. In bfloat16
the verification pass scores several tokens of a sequence at once, which rounds differently
from one-token steps, so where two tokens tie to within rounding the choice can flip; the
script then prints the first differing position and how close the tie was.
"""

import argparse
import json
from pathlib import Path

from vllm import LLM, SamplingParams


def generate(model: str, prompts: list[str], speculative_config: dict | None, kv_bytes: int,
             dtype: str, enforce_eager: bool):
    llm = LLM(model=model, speculative_config=speculative_config, kv_cache_memory_bytes=kv_bytes,
              max_model_len=4096, dtype=dtype, enforce_eager=enforce_eager, disable_log_stats=False)
    outputs = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=48, logprobs=5))
    counters = {m.name: m.value for m in llm.get_metrics()
                if m.name.startswith("vllm:spec_decode_num") and hasattr(m, "value")}
    llm.llm_engine.engine_core.shutdown()
    return outputs, counters


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("model", help="a Jet-Nemotron checkpoint folder")
    parser.add_argument("--config", type=Path, default=Path(__file__).with_name("speculative_config.json"))
    parser.add_argument("--kv-cache-memory-bytes", type=int, default=1 << 30)
    parser.add_argument("--dtype", default="auto", help="auto, bfloat16, float16 or float32")
    parser.add_argument("--enforce-eager", action="store_true",
                        help="skip torch.compile (on CPU it takes about a minute per engine)")
    args = parser.parse_args()

    speculative_config = json.loads(args.config.read_text())
    prompts = ["1, 2, 3, 4, 1, 2, 3, 4, 1, 2, 3, 4, 1, 2,", "def add(a, b):\n    return a + b\n\ndef"]
    plain, _ = generate(args.model, prompts, None, args.kv_cache_memory_bytes, args.dtype, args.enforce_eager)
    speculative, counters = generate(args.model, prompts, speculative_config,
                                     args.kv_cache_memory_bytes, args.dtype, args.enforce_eager)
    for output in speculative:
        print(f"{output.prompt!r} -> {output.outputs[0].text!r}")
    print("speculative decoding counters:", counters)
    # Compare tokens: the text of tokens that are not whole UTF-8 characters can be
    # detokenized differently when several tokens arrive in one step.
    identical = [o.outputs[0].token_ids for o in speculative] == [o.outputs[0].token_ids for o in plain]
    print("identical to plain decoding:", identical)
    for plain_output, spec_output in zip(plain, speculative):
        ours, theirs = plain_output.outputs[0], spec_output.outputs[0]
        first = next((i for i, (a, b) in enumerate(zip(ours.token_ids, theirs.token_ids)) if a != b), None)
        if first is None:
            continue
        top = ours.logprobs[first]  # plain decoding's top 5 at the first difference
        other = theirs.token_ids[first]
        margin = (f"by {top[ours.token_ids[first]].logprob - top[other].logprob:.4f} nats"
                  if other in top else "(speculative token not in its top 5)")
        print(f"  first difference at token {first}: plain decoding preferred its token {margin}")


if __name__ == "__main__":
    main()
