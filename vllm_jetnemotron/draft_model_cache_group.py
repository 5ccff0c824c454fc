"""Give vLLM's `draft_model` proposer the block table of its own KV cache group.

vLLM's model runner hands the drafter the attention metadata of the group that holds
the drafter's layers only for EAGLE-style proposers; `DraftModelProposer` gets group 0's
(`GPUModelRunner._build_attention_metadata`, vLLM 0.32). With a hybrid target, group 0
holds JetBlock states, and all groups alias one allocation (a block id belongs to one
group at a time), so the draft model's attention writes its K/V into the pages of the
target's recurrent and conv states and the verified output goes wrong. The patch below
swaps in the drafter's group's block table and slot mapping; it changes nothing when
the drafter's layers are in group 0 or when the proposer is not `DraftModelProposer`.
"""

import functools
from copy import copy

from .patches import APPLIED, NO_TARGET, NOT_NEEDED, report


def use_drafter_cache_group(vllm_config) -> None:
    """Patch the model runner class (idempotent). Not under Model Runner V2 (a GPU's default
    from vLLM 0.32 where Triton is present, the only runner of 0.34, which removed both
    modules): it builds the drafter's metadata per KV-cache group
    (`v1/worker/gpu/spec_decode/speculator.py`, 0.34)."""
    from vllm.platforms import current_platform

    if not current_platform.is_cpu() and vllm_config.use_v2_model_runner:
        report(__name__, NOT_NEEDED, "Model Runner V2 builds drafter metadata per KV-cache group")
        return
    try:
        from vllm.v1.spec_decode.draft_model import DraftModelProposer
        from vllm.v1.worker.gpu_model_runner import GPUModelRunner
    except ModuleNotFoundError as missing:
        report(__name__, NO_TARGET, f"no {missing.name}")
        return

    build = GPUModelRunner._build_attention_metadata
    if getattr(build, "_uses_drafter_cache_group", False):
        return

    @functools.wraps(build)
    def build_attention_metadata(self, *args, slot_mappings=None, **kwargs):
        attn_metadata, drafter_metadata = build(self, *args, slot_mappings=slot_mappings, **kwargs)
        drafter = getattr(self, "drafter", None)
        if (drafter_metadata is None or not isinstance(drafter, DraftModelProposer)
                or drafter.kv_cache_gid <= 0 or slot_mappings is None):
            return attn_metadata, drafter_metadata
        group = drafter.kv_cache_gid
        num_reqs, num_tokens = drafter_metadata.num_reqs, drafter_metadata.num_actual_tokens
        drafter_metadata = copy(drafter_metadata)
        drafter_metadata.block_table_tensor = (
            self.input_batch.block_table[group].get_device_tensor(num_reqs))
        drafter_metadata.slot_mapping = slot_mappings[group][:num_tokens]
        return attn_metadata, drafter_metadata

    build_attention_metadata._uses_drafter_cache_group = True
    GPUModelRunner._build_attention_metadata = build_attention_metadata
    report(__name__, APPLIED)
