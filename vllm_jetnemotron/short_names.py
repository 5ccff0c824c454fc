"""`jet-nemotron-2b` and `jet-nemotron-4b` as model names for every vLLM entry point
(`vllm serve`, `LLM(model=...)`), served under the short name.

The names live in `model_redirects.json`, a file in the format of vLLM's model-redirect
file (`VLLM_MODEL_REDIRECT_PATH`); the plugin points vLLM at it unless the user set a
redirect file of their own. vLLM 0.32 applies redirects only when it builds its
`ModelConfig` (which keeps the name it was given as the served model name), but looks the
model up twice before that: `EngineArgs.__post_init__` resolves it in the Hugging Face
cache when `HF_HUB_OFFLINE` is set, and `create_engine_config` reads its config to detect
speculators checkpoints; a short name fails both. `install` makes those two lookups follow
the redirect file too, and leaves the name they hand on to `ModelConfig` as it was.
"""

import os
from pathlib import Path

REDIRECTS_FILE = Path(__file__).with_name("model_redirects.json")
REDIRECT_ENV = "VLLM_MODEL_REDIRECT_PATH"


def install() -> None:
    """Point vLLM at the short names (unless the user set a redirect file) and make its
    pre-`ModelConfig` lookups redirect. Idempotent."""
    import vllm.engine.arg_utils as arg_utils
    from vllm.transformers_utils.utils import maybe_model_redirect

    os.environ.setdefault(REDIRECT_ENV, str(REDIRECTS_FILE))
    if getattr(arg_utils.get_model_path, "_follows_redirects", False):
        return
    get_model_path = arg_utils.get_model_path
    override_with_speculators = arg_utils.maybe_override_with_speculators

    def get_model_path_following_redirects(model, revision=None):
        redirected = maybe_model_redirect(str(model))
        if redirected == model:
            return get_model_path(model, revision)
        get_model_path(redirected, revision)  # a clear error now if it is not in the cache
        return model  # ModelConfig redirects it, and serves it under this name

    def override_with_speculators_following_redirects(model, tokenizer, *args, **kwargs):
        redirected = maybe_model_redirect(model)
        resolved, resolved_tokenizer, speculative_config = override_with_speculators(
            redirected, tokenizer, *args, **kwargs)
        return (model if resolved == redirected else resolved), resolved_tokenizer, speculative_config

    get_model_path_following_redirects._follows_redirects = True
    arg_utils.get_model_path = get_model_path_following_redirects
    arg_utils.maybe_override_with_speculators = override_with_speculators_following_redirects
