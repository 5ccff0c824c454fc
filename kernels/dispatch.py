"""The JetBlock's stateful operations as vLLM runs them, and the one place that chooses an
implementation for each call: `ROUTES`, a table of (CPU, GPU) implementations per operation.

* Tensors on a CUDA (or ROCm) device run the GPU column, the Triton kernels
  (`*/triton_*.py`); all others run the CPU column (`*/cpu.py`; the gated RMSNorm's is its
  definition, `naive.py`), which compile what they can on first use and fall back to eager
  PyTorch by themselves (plain bf16 decode steps call vLLM's C++ op where it applies, see
  `gated_delta_rule/cpu.py`).
* An implementation's module is imported on its first call on that kind of device, so
  CPU-only installs never import triton. `prepare_kernels` resolves a device's column ahead
  of time: the vLLM model calls it when built, so that torch.compile, which traces
  `gated_rmsnorm` and cannot follow an `importlib` call, finds every implementation resolved.
* The operations are named by phase: `*_prefill` (packed sequences, states from a pool),
  `*_step` (one decode token per sequence) and `*_spec_decode` (speculative decoding: each
  sequence's last accepted token and its drafts). The gated delta rule takes the raw gate
  projections a, b and the parameters A_log, dt_bias; g and beta are computed inside
  (`gated_delta_rule.gate.gated_delta_rule_gates`).

The contract every implementation honours (tests check it on the CPU and Triton paths):

* Recurrent states: a pool `[num_slots, H, K, V]` (keys by values, as in
  flash-linear-attention), any slot stride, each slot contiguous. Conv histories: a pool
  `[num_slots, W - 1 (+ num_spec), D]`, time first, any strides.
* A sequence's slot is `state_indices[i]` (int32 or int64). A negative index (vLLM's
  `PAD_SLOT_ID`) marks a padded sequence: its state is neither read (it starts from
  zeros) nor written, and its outputs carry no meaning.
* Decode and speculative-decode steps make no host sync on a GPU (CUDA-graph capture):
  their sizes come from tensor shapes, never from tensor values. Prefills make none when
  the caller passes the lengths' bound it knows on the host (`max_seqlen`).
* q and k are L2-normalised inside (x / max(|x|, 1e-6)) and q is scaled by K**-0.5.
"""

import importlib
from collections.abc import Callable

import torch

# operation -> ("module:function" run on the CPU, the same on a GPU), modules relative to
# this package; each function takes the arguments of the operation's function below.
ROUTES: dict[str, tuple[str, str]] = {
    "gated_delta_rule_prefill": ("gated_delta_rule.cpu:gated_delta_rule_prefill",
                                 "gated_delta_rule.triton_chunk:gated_delta_rule_prefill"),
    "gated_delta_rule_step": ("gated_delta_rule.cpu:gated_delta_rule_step",
                              "gated_delta_rule.triton_fused_recurrent:gated_delta_rule_step"),
    "gated_delta_rule_spec_decode": ("gated_delta_rule.cpu:gated_delta_rule_spec_decode",
                                     "gated_delta_rule.triton_fused_recurrent:gated_delta_rule_spec_decode"),
    "dynamic_conv_prefill": ("dynamic_conv.cpu:dynamic_causal_conv",
                             "dynamic_conv.triton_conv:dynamic_causal_conv"),
    "dynamic_conv_step": ("dynamic_conv.cpu:dynamic_causal_conv_step",
                          "dynamic_conv.triton_conv:dynamic_causal_conv_step"),
    "dynamic_conv_spec_decode": ("dynamic_conv.cpu:dynamic_causal_conv_spec_decode",
                                 "dynamic_conv.triton_conv:dynamic_causal_conv_spec_decode"),
    "gated_rmsnorm": ("gated_rmsnorm.naive:gated_rmsnorm_naive",
                      "gated_rmsnorm.triton_norm:gated_rmsnorm"),
}

_resolved: dict[tuple[str, bool], Callable[..., torch.Tensor]] = {}


def implementation(op: str, on_gpu: bool) -> Callable[..., torch.Tensor]:
    """The function that runs `op` on a GPU (`on_gpu`) or else on the CPU, as `ROUTES`
    names it; its module is imported on the first request, the function kept."""
    found = _resolved.get((op, on_gpu))
    if found is None:
        module, name = ROUTES[op][1 if on_gpu else 0].split(":")
        found = _resolved[op, on_gpu] = getattr(importlib.import_module(f".{module}", __package__), name)
    return found


def _on_gpu(x: torch.Tensor) -> bool:
    return x.device.type == "cuda"


def prepare_kernels(device_type: str) -> None:
    """Resolve every operation for tensors of `device_type` ("cuda": imports the Triton
    modules) and, on the CPU, build the compiled pieces now (or load them from torch's
    extension cache), so that torch.compile finds the implementations resolved and a model's
    first decode step does not wait for a compiler."""
    for op in ROUTES:
        implementation(op, device_type == "cuda")
    if device_type == "cpu":
        from .dynamic_conv.cpu import conv_update_op

        conv_update_op()


# ----- gated delta rule ------------------------------------------------------------------


def gated_delta_rule_prefill(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    A_log: torch.Tensor,
    dt_bias: torch.Tensor,
    cu_seqlens: torch.Tensor,
    state_pool: torch.Tensor,
    state_indices: torch.Tensor,
    has_initial_state: torch.Tensor,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """Varlen prefill from the raw gate projections, states in a pool.

    Args:
        q, k: `[T, H, K]` (before the L2 norm); v: `[T, H, V]`; a, b: `[T, H]` raw gate
            projections; A_log, dt_bias: `[H]` float32. The tokens of all sequences are
            packed back to back, sequence i is `cu_seqlens[i]:cu_seqlens[i+1]`
            (`cu_seqlens` `[N + 1]`).
        state_pool: `[num_slots, H, K, V]`; sequence i starts from
            `state_pool[state_indices[i]]` if `has_initial_state[i]` (else zeros) and its
            final state is written back there.
        chunk_size: tokens per chunk; None: each implementation's own (CPU 32, Triton 64; a
            power of 2 >= 16 for Triton). The result does not depend on it beyond rounding
            (the tests set it to cross chunk boundaries in short sequences).
    Returns:
        o `[T, H, V]` in v's dtype.
    """
    return implementation("gated_delta_rule_prefill", _on_gpu(q))(
        q, k, v, a, b, A_log, dt_bias, cu_seqlens, state_pool, state_indices, has_initial_state, chunk_size)


def gated_delta_rule_step(
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
        state_pool: `[num_slots, H, K, V]`; the state of sequence n is read from and
            written back to `state_pool[state_indices[n]]`.
    Returns:
        o `[N, H, V]` in v's dtype.
    """
    return implementation("gated_delta_rule_step", _on_gpu(q))(
        q, k, v, a, b, A_log, dt_bias, state_pool, state_indices)


def gated_delta_rule_spec_decode(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    A_log: torch.Tensor,
    dt_bias: torch.Tensor,
    cu_seqlens: torch.Tensor,
    state_pool: torch.Tensor,
    state_indices: torch.Tensor,
    num_accepted_tokens: torch.Tensor,
) -> torch.Tensor:
    """Speculative-decoding step over sequences of different lengths in one call.

    Args:
        q, k: `[T, H, K]`; v: `[T, H, V]`; a, b: `[T, H]` raw gate projections; A_log,
            dt_bias: `[H]` float32; the tokens of sequence i at
            `cu_seqlens[i]:cu_seqlens[i+1]` (at most L each).
        state_indices: `[N, L]` a slot per draft position; sequence n starts from
            `state_indices[n, num_accepted_tokens[n] - 1]` and the state after its token j
            is written to `state_indices[n, j]`; the slots past its end receive the state
            after its last token.
    Returns:
        o `[T, H, V]` in v's dtype.

    L comes from the shape of `state_indices` (no host sync; the re-layout is
    `gated_delta_rule/spec_decode.py`).
    """
    return implementation("gated_delta_rule_spec_decode", _on_gpu(q))(
        q, k, v, a, b, A_log, dt_bias, cu_seqlens, state_pool, state_indices, num_accepted_tokens)


# ----- dynamic conv ----------------------------------------------------------------------


def dynamic_conv_prefill(
    x: torch.Tensor,
    kernels: torch.Tensor,
    cu_seqlens: torch.Tensor,
    state_pool: torch.Tensor,
    state_indices: torch.Tensor,
    has_initial_state: torch.Tensor,
    max_seqlen: int | None = None,
) -> torch.Tensor:
    """Varlen prefill, conv histories in a pool.

    Args:
        x: `[T, D]`; kernels: `[T, D, W]` per-token filters (tap W - 1 is the current
            token); sequence i is `cu_seqlens[i]:cu_seqlens[i+1]`.
        state_pool: `[num_slots, W - 1, D]`; sequence i starts from
            `state_pool[state_indices[i]]` when `has_initial_state[i]` (else zeros) and its
            last W - 1 inputs are written back there.
        max_seqlen: the longest sequence's length, or a bound on it, known on the host (as
            vLLM's `max_query_len`): the GPU path then reads no length from the device (a
            host sync); None: it does.
    Returns:
        out `[T, D]` (SiLU applied) in x's dtype.
    """
    return implementation("dynamic_conv_prefill", _on_gpu(x))(
        x, kernels, cu_seqlens, state_pool, state_indices, has_initial_state, max_seqlen)


def dynamic_conv_step(
    x: torch.Tensor,
    kernels: torch.Tensor,
    state_pool: torch.Tensor,
    state_indices: torch.Tensor,
) -> torch.Tensor:
    """One decode token per sequence: x `[N, D]`, kernels `[N, D, W]`, slots `[N]`,
    state_pool `[num_slots, >= W - 1, D]` (its first W - 1 rows are the history), each
    sequence's history shifted by one token in place. Returns out `[N, D]`."""
    return implementation("dynamic_conv_step", _on_gpu(x))(x, kernels, state_pool, state_indices)


def dynamic_conv_spec_decode(
    x: torch.Tensor,
    kernels: torch.Tensor,
    cu_seqlens: torch.Tensor,
    state_pool: torch.Tensor,
    state_indices: torch.Tensor,
    num_accepted_tokens: torch.Tensor,
) -> torch.Tensor:
    """Speculative-decoding step with wide conv histories: x `[T, D]`, kernels `[T, D, W]`,
    sequence i is `cu_seqlens[i]:cu_seqlens[i+1]` (the last accepted token and new drafts),
    its history buffer `state_pool[state_indices[i]]` `[W - 1 + num_spec, D]`.

    The history of this step is the buffer's rows `a - 1 : a - 1 + W - 1`, a =
    `num_accepted_tokens[i]`; afterwards row j holds the W - 1 inputs ending at this step's
    token j (vLLM's conv-state convention). Returns out `[T, D]` (SiLU applied) in x's dtype.
    """
    return implementation("dynamic_conv_spec_decode", _on_gpu(x))(
        x, kernels, cu_seqlens, state_pool, state_indices, num_accepted_tokens)


# ----- gated RMSNorm ---------------------------------------------------------------------


def gated_rmsnorm(x: torch.Tensor, z: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """rmsnorm(x) * weight * silu(z) over the last dim: x, z `[..., V]`, weight `[V]`;
    computed in float32, returned in x's dtype."""
    return implementation("gated_rmsnorm", _on_gpu(x))(x, z, weight, eps)


__all__ = [
    "ROUTES",
    "dynamic_conv_prefill",
    "dynamic_conv_spec_decode",
    "dynamic_conv_step",
    "gated_delta_rule_prefill",
    "gated_delta_rule_spec_decode",
    "gated_delta_rule_step",
    "gated_rmsnorm",
    "implementation",
    "prepare_kernels",
]
