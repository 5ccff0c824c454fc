"""vLLM plugin entry point (`vllm.general_plugins`): runs in every vLLM process."""


def register() -> None:
    """Register the config with transformers' `AutoConfig` and the model with vLLM.
    Idempotent; imports no vLLM model code (the model class is loaded lazily)."""
    from transformers import AutoConfig
    from vllm import ModelRegistry

    from .config import JetNemotronConfig

    try:
        AutoConfig.register(JetNemotronConfig.model_type, JetNemotronConfig)
    except ValueError:
        pass  # already registered in this process
    if "JetNemotronForCausalLM" not in ModelRegistry.get_supported_archs():
        ModelRegistry.register_model(
            "JetNemotronForCausalLM", "vllm_jetnemotron.model:JetNemotronForCausalLM")
