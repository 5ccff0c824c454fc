"""Engine settings vLLM adjusts for Jet-Nemotron before it builds anything (vLLM's
per-architecture `VerifyAndUpdateConfig` hook)."""

from vllm.logger import init_logger
from vllm.model_executor.models.config import VerifyAndUpdateConfig
from vllm.platforms import current_platform

logger = init_logger(__name__)


class JetNemotronEngineConfig(VerifyAndUpdateConfig):
    @staticmethod
    def verify_and_update_config(vllm_config) -> None:
        """On CPU, speculative decoding with prefix caching crashes inside vLLM: its
        "align" cache mode migrates hybrid states between blocks with a Triton kernel
        (`precopy_mamba_align_fused_kernel`, v1/worker/mamba_utils.py) that has no CPU
        version. Turn prefix caching off in that case, and say so."""
        cache_config = vllm_config.cache_config
        if (current_platform.is_cpu() and vllm_config.speculative_config is not None
                and cache_config.enable_prefix_caching):
            logger.warning(
                "Jet-Nemotron on CPU: prefix caching is turned off because speculative "
                "decoding is on (vLLM's hybrid-state block copy for that case is a Triton "
                "kernel with no CPU version).")
            cache_config.enable_prefix_caching = False
