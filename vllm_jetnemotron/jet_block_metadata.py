"""What a step tells the JetBlock layers: vLLM's GDN metadata, plus which speculating
sequences have no state yet.

When other requests are speculating, vLLM 0.32's scheduler pads a newly scheduled request
that has a single token to compute (a one-token prompt) to the draft length with
placeholder drafts (`Scheduler.schedule`: "Pad new decode requests to uniform spec decoding
size"), so under Model Runner V1 that sequence takes the speculative path. That path starts
every sequence from the state in its slot, and a new request's slot holds whatever its previous
owner left there. `spec_has_initial_state` names those sequences so the layer starts them from
zeros. (Model Runner V2 runs such a row as a prefill instead: docs/architecture.md, "Model
Runner V2", W1.)
"""

from dataclasses import dataclass, fields

import torch

from vllm.v1.attention.backends.gdn_attn import (
    GDNAttentionBackend,
    GDNAttentionMetadata,
    GDNAttentionMetadataBuilder,
)


@dataclass
class JetBlockAttentionMetadata(GDNAttentionMetadata):
    # [num_spec_decodes] bool: False where a speculating sequence has no state yet.
    # None: every one has (always set when the step may run as a FULL CUDA graph).
    spec_has_initial_state: torch.Tensor | None = None
    # The step's longest query or a bound on it, on the host: it sizes the prefill conv's
    # grid without reading lengths back from the device.
    max_query_len: int | None = None


class JetBlockAttentionMetadataBuilder(GDNAttentionMetadataBuilder):
    def __init__(self, kv_cache_spec, layer_names, vllm_config, device):
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)
        # FULL CUDA-graph buffer, like the parent's spec_* buffers.
        self.spec_has_initial_state = torch.ones(
            self.decode_cudagraph_max_bs, dtype=torch.bool, device=device)

    def build(self, common_prefix_len, common_attn_metadata, num_accepted_tokens=None,
              num_decode_draft_tokens_cpu=None, fast_build=False) -> JetBlockAttentionMetadata:
        gdn = super().build(common_prefix_len, common_attn_metadata, num_accepted_tokens,
                            num_decode_draft_tokens_cpu, fast_build)
        m = common_attn_metadata
        values = {f.name: getattr(gdn, f.name) for f in fields(gdn)}
        values["max_query_len"] = m.max_query_len  # ours, even if a later GDN metadata has one
        meta = JetBlockAttentionMetadata(**values)
        if gdn.spec_sequence_masks_cpu is None:
            return meta
        spec_rows = gdn.spec_sequence_masks_cpu
        if m.seq_lens_cpu_upper_bound is None:  # no host lengths (capture): all have state
            has_state = torch.ones(int(spec_rows.sum()), dtype=torch.bool)
        else:
            # A sequence has a state once a token is computed: seq_len > query_len
            # (the bound is exact where no token is computed yet).
            query_lens = m.query_start_loc_cpu.diff()
            has_state = (m.seq_lens_cpu_upper_bound > query_lens)[spec_rows]
        n = has_state.numel()
        if self._stage_spec_decode(gdn.num_prefills, gdn.num_decodes, gdn.num_spec_decodes,
                                   gdn.num_spec_decode_tokens):
            buffer = self.spec_has_initial_state
            buffer[:n].copy_(has_state, non_blocking=True)
            buffer[n:m.num_reqs].fill_(True)
            meta.spec_has_initial_state = buffer[:m.num_reqs]
        elif not bool(has_state.all()):
            meta.spec_has_initial_state = has_state.to(self.device, non_blocking=True)
        return meta


class JetBlockAttentionBackend(GDNAttentionBackend):
    @staticmethod
    def get_builder_cls() -> type[JetBlockAttentionMetadataBuilder]:
        return JetBlockAttentionMetadataBuilder
