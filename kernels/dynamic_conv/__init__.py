"""Dynamic causal depthwise convolution: a W-tap filter per channel and per token,
generated from the token, followed by SiLU:

    out_t[c] = silu( sum_{w < W} kernel_t[c, w] * x_{t-W+1+w}[c] )   (x before the start = state)
"""

from .cpu import dynamic_causal_conv, dynamic_causal_conv_step
from .naive import dynamic_causal_conv_naive

__all__ = ["dynamic_causal_conv", "dynamic_causal_conv_naive", "dynamic_causal_conv_step"]
