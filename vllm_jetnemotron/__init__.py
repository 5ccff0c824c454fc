"""vllm-jetnemotron: serve NVIDIA Jet-Nemotron hybrid models with vLLM.

`vllm_jetnemotron.plugin` registers the model with vLLM (automatically, through the
`vllm.general_plugins` entry point); `vllm_jetnemotron.kernels` holds the JetBlock's
linear-attention kernels; `vllm_jetnemotron.converter` builds checkpoints.
"""

from .config import JetNemotronConfig, JetNemotronConfigError

__all__ = ["JetNemotronConfig", "JetNemotronConfigError"]
