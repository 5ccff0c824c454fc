"""Offline batch generation with vLLM's `LLM.generate`.

    python examples/offline_batch.py path/to/checkpoint
"""

import argparse

from vllm import LLM, SamplingParams


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("model", help="a Jet-Nemotron checkpoint folder")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--kv-cache-memory-bytes", type=int, default=1 << 30,
                        help="KV/state budget (on CPU vLLM otherwise reserves most of host RAM)")
    args = parser.parse_args()

    llm = LLM(model=args.model, kv_cache_memory_bytes=args.kv_cache_memory_bytes, max_model_len=4096)
    prompts = [
        "The capital of France is",
        "def fibonacci(n):",
        "Linear attention replaces the softmax with",
        "Once upon a time",
    ]
    outputs = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=args.max_tokens))
    for output in outputs:
        print(f"{output.prompt!r} -> {output.outputs[0].text!r}")


if __name__ == "__main__":  # vLLM starts worker processes
    main()
