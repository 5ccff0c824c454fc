"""One compiled (not eager) engine start, for the compile cache tests: `python
tests/restarted_engine.py OUT.json MODEL OPTIONS.json [ADAPTER]` writes the greedy tokens of
fixed prompts (through LoRA adapter ADAPTER if given) to OUT.json. A test runs it twice on one
VLLM_CACHE_ROOT: the second start is a restart from a warm cache."""

import json
import sys

from conftest import ENGINE_SHUTDOWN_S, as_inputs, greedy, random_prompts, start_llm, token_ids

PROMPTS = random_prompts([5, 70, 1, 130], seed=11)

if __name__ == "__main__":
    out, model, options = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
    llm = start_llm(model, enforce_eager=False, **options)
    lora = None
    if len(sys.argv) > 4:
        from vllm.lora.request import LoRARequest

        lora = LoRARequest("adapter", 1, sys.argv[4])
    try:
        outputs = token_ids(llm.generate(as_inputs(PROMPTS), greedy(24), lora_request=lora))
    finally:
        llm.llm_engine.engine_core.shutdown(timeout=ENGINE_SHUTDOWN_S)
    with open(out, "w") as f:
        json.dump(outputs, f)
