"""vLLM plugin entry point (`vllm.general_plugins`): runs in every vLLM process."""


def register() -> None:
    """Register the config with transformers' `AutoConfig`, the model with vLLM, and the
    model's engine-config hook. Idempotent; imports no model code (loaded lazily)."""
    from transformers import AutoConfig
    from vllm import ModelRegistry
    from vllm.model_executor.models.config import MODELS_CONFIG_MAP

    from .config import JetNemotronConfig
    from .engine_config import JetNemotronEngineConfig

    try:
        AutoConfig.register(JetNemotronConfig.model_type, JetNemotronConfig)
    except ValueError:
        pass  # already registered in this process
    if "JetNemotronForCausalLM" not in ModelRegistry.get_supported_archs():
        ModelRegistry.register_model(
            "JetNemotronForCausalLM", "vllm_jetnemotron.model:JetNemotronForCausalLM")
    MODELS_CONFIG_MAP["JetNemotronForCausalLM"] = JetNemotronEngineConfig
