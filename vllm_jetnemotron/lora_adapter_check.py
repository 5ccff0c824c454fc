"""A LoRA adapter is checked by the model it adapts before vLLM uses it.

vLLM 0.32 checks an adapter's rank and target-module names, not its shapes: each matrix is
copied into the leading corner of its slot (`BaseLinearLayerWithLoRA.set_lora`,
`vllm/lora/layers/base_linear.py`), so an adapter trained for a smaller model loads and
serves wrong tokens, and one for a larger model fails inside a tensor copy. Here the
worker's adapter loader (`WorkerLoRAManager._load_adapter`, which every adapter passes
through, at startup, `/v1/load_lora_adapter` or a request's `LoRARequest`) asks the model,
if it defines `check_lora_adapter(lora_model)`, to raise on an adapter it cannot run; the
error reaches the caller as a failed adapter load, as vLLM's own rank check does.
"""

import functools

from .patches import APPLIED, report

_MARKER = "_jetnemotron_checks_lora_adapters"


def check_lora_adapters_with_the_model() -> None:
    """Patch `WorkerLoRAManager._load_adapter` (idempotent)."""
    from vllm.lora.worker_manager import WorkerLoRAManager

    if WorkerLoRAManager.__dict__.get(_MARKER):
        return
    load_adapter = WorkerLoRAManager._load_adapter

    @functools.wraps(load_adapter)
    def load_and_check_adapter(self, lora_request):
        lora_model = load_adapter(self, lora_request)
        check = getattr(self._adapter_manager.model, "check_lora_adapter", None)
        if check is not None:
            check(lora_model, lora_request.lora_path)
        return lora_model

    WorkerLoRAManager._load_adapter = load_and_check_adapter
    setattr(WorkerLoRAManager, _MARKER, True)
    report(__name__, APPLIED)
