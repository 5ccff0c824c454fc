"""Engine settings vLLM adjusts for Jet-Nemotron before it builds anything (vLLM's
per-architecture `VerifyAndUpdateConfig` hook)."""

from vllm.logger import init_logger
from vllm.model_executor.models.config import VerifyAndUpdateConfig
from vllm.platforms import current_platform

logger = init_logger(__name__)


class JetNemotronEngineConfig(VerifyAndUpdateConfig):
    @staticmethod
    def verify_and_update_config(vllm_config) -> None:
        """Refuse more pipeline ranks than layers. Turn prefix caching off, and say so,
        where vLLM's hybrid "align" cache mode cannot run:
        * on CPU with speculative decoding: it migrates hybrid states between blocks with
          a Triton kernel (`precopy_mamba_align_fused_kernel`, v1/worker/mamba_utils.py)
          that has no CPU version;
        * for a checkpoint without JetBlocks (e.g. an all-`attn` draft model): the mode
          asserts that the model has recurrent layers."""
        num_layers = vllm_config.model_config.hf_config.num_hidden_layers
        pp_size = vllm_config.parallel_config.pipeline_parallel_size
        if pp_size > num_layers:
            raise ValueError(f"pipeline_parallel_size {pp_size} is larger than the checkpoint's "
                             f"num_hidden_layers ({num_layers}): every pipeline rank needs a layer")
        cache_config = vllm_config.cache_config
        if not cache_config.enable_prefix_caching:
            return
        reason = None
        if "jet" not in vllm_config.model_config.hf_config.layer_types:
            reason = "the checkpoint has no JetBlock ('jet') layers"
        elif current_platform.is_cpu() and vllm_config.speculative_config is not None:
            reason = ("speculative decoding is on and vLLM's hybrid-state block copy for that "
                      "case is a Triton kernel with no CPU version")
        if reason is not None:
            logger.warning("Jet-Nemotron: prefix caching is turned off because %s.", reason)
            cache_config.enable_prefix_caching = False
