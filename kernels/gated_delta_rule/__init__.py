"""Gated delta rule: S_t = exp(g_t) S_{t-1} + beta_t k_t (v_t - exp(g_t) S_{t-1}^T k_t)^T,
o_t = S_t^T (q_t * K**-0.5), with L2-normalised q and k.

`naive.py` is the definition (and the chunked form the converter trains with), `gate.py`
the gates from the raw projections; the implementations vLLM runs (`cpu.py` on the CPU,
`triton_*.py` on GPUs; their entry points `gated_delta_rule_prefill`, `_step` and
`_spec_decode` take the raw gates) are reached through `kernels.dispatch`, the one place that
chooses between them. `spec_decode.py` lays packed speculative sequences out for either
fused-recurrent implementation.
"""

from .naive import naive_recurrent_gated_delta_rule

__all__ = ["naive_recurrent_gated_delta_rule"]
