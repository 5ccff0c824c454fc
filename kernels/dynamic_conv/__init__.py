"""Dynamic causal depthwise convolution: a W-tap filter per channel and per token,
generated from the token, followed by SiLU:

    out_t[c] = silu( sum_{w < W} kernel_t[c, w] * x_{t-W+1+w}[c] )   (x before the start = state)

The Triton kernels (triton_conv.py, triton_conv_autograd.py) import triton, so they load
on first use: through `kernels.dispatch`, or by name here.
"""

import importlib

from .cpu import dynamic_causal_conv, dynamic_causal_conv_spec_decode, dynamic_causal_conv_step
from .naive import dynamic_causal_conv_naive

# name -> module, imported on first access (keeps triton optional on CPU installs)
_TRITON_EXPORTS = {"dynamic_causal_conv_autograd": ".triton_conv_autograd"}


def __getattr__(name: str):
    if name in _TRITON_EXPORTS:
        return getattr(importlib.import_module(_TRITON_EXPORTS[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "dynamic_causal_conv",
    "dynamic_causal_conv_autograd",
    "dynamic_causal_conv_naive",
    "dynamic_causal_conv_spec_decode",
    "dynamic_causal_conv_step",
]
