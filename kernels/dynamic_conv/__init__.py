"""Dynamic causal depthwise convolution: a W-tap filter per channel and per token,
generated from the token, followed by SiLU:

    out_t[c] = silu( sum_{w < W} kernel_t[c, w] * x_{t-W+1+w}[c] )   (x before the start = state)

`naive.py` is the definition; the implementations vLLM runs (`cpu.py` on the CPU,
`triton_conv.py` on GPUs) are reached through `kernels.dispatch`.
"""

from .naive import dynamic_causal_conv_naive

__all__ = ["dynamic_causal_conv_naive"]
