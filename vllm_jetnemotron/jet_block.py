"""The JetBlock as a vLLM recurrent layer: gated delta rule linear attention with a
dynamic convolution on values, its states kept in vLLM's hybrid (mamba) cache.

Per layer and sequence slot the cache holds two states:
  * conv state `[W - 1 (+ num_spec), value_dim / tp]` (time first, vLLM's "SD" layout;
    the "DS" layout, `VLLM_SSM_CONV_STATE_LAYOUT=DS`, is read through a transposed view);
  * recurrent state `[H / tp, K, V]` (flash-linear-attention's layout; vLLM's own GDN
    layers use `[H, V, K]`).
The projections run in the (compilable) model graph; the stateful core runs behind the
`jet_block_core` custom op, which reads `JetBlockAttentionMetadata` (vLLM's GDN metadata, `jet_block_metadata.py`) for this layer.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from vllm.compilation.breakable_cudagraph import eager_break_during_capture
from vllm.config import VllmConfig
from vllm.distributed import divide, get_tensor_model_parallel_world_size
from vllm.forward_context import get_forward_context
from vllm.model_executor.layers.linear import (
    ColumnParallelLinear,
    MergedColumnParallelLinear,
    ReplicatedLinear,
    RowParallelLinear,
)
from vllm.model_executor.layers.mamba.abstract import MambaBase
from vllm.model_executor.layers.mamba.mamba_utils import (
    MambaStateDtypeCalculator,
    is_conv_state_dim_first,
)
from vllm.model_executor.model_loader.weight_utils import sharded_weight_loader
from vllm.model_executor.utils import set_weight_attrs
from vllm.platforms import current_platform
from vllm.utils.torch_utils import (
    LayerNameType,
    _encode_layer_name,
    _resolve_layer_name,
    direct_register_custom_op,
)
from vllm.v1.attention.backends.registry import MambaAttentionBackendEnum

from vllm_jetnemotron import kernels as ops

from .config import JetNemotronConfig
from .jet_block_metadata import JetBlockAttentionBackend, JetBlockAttentionMetadata


def jet_block_state_shapes(
    config: JetNemotronConfig, tp_size: int, num_spec: int
) -> tuple[tuple[int, int], tuple[int, int, int]]:
    """(conv state shape, recurrent state shape) of one JetBlock on one TP rank."""
    d = config.jet_dims
    conv_len = d.conv_size - 1 + num_spec
    value_dim = divide(d.value_dim, tp_size)
    conv = (value_dim, conv_len) if is_conv_state_dim_first() else (conv_len, value_dim)
    return conv, (divide(d.num_heads, tp_size), d.head_k_dim, d.head_v_dim)


def jet_block_state_dtypes(vllm_config: VllmConfig) -> tuple[torch.dtype, torch.dtype]:
    return MambaStateDtypeCalculator.gated_delta_net_state_dtype(
        vllm_config.model_config.dtype,
        vllm_config.cache_config.mamba_cache_dtype,
        vllm_config.cache_config.mamba_ssm_cache_dtype,
    )


class JetBlock(nn.Module, MambaBase):
    def __init__(self, config: JetNemotronConfig, vllm_config: VllmConfig, prefix: str):
        super().__init__()
        self.prefix = prefix
        self.config = config
        self.vllm_config = vllm_config
        spec = vllm_config.speculative_config
        self.num_spec = spec.num_speculative_tokens if spec else 0
        self.tp_size = get_tensor_model_parallel_world_size()
        d = config.jet_dims
        self.num_heads = divide(d.num_heads, self.tp_size)  # heads on this rank
        self.head_k_dim, self.head_v_dim = d.head_k_dim, d.head_v_dim
        self.conv_size = d.conv_size
        self.norm_eps = d.norm_eps
        self.key_dim = self.num_heads * d.head_k_dim
        self.value_dim = self.num_heads * d.head_v_dim
        quant_config = vllm_config.quant_config
        hidden = config.hidden_size

        # q, k, v (raw values u), g (output gate z): one GEMM; b (beta) and a (decay),
        # H outputs each, another (as in vLLM's Qwen3-Next), so that the large one keeps
        # the output size quantized kernels need (a multiple of 32) and the gates can
        # stay unquantized.
        self.in_proj = MergedColumnParallelLinear(
            hidden,
            [d.key_dim, d.key_dim, d.value_dim, d.value_dim],
            bias=False,
            quant_config=quant_config,
            prefix=f"{prefix}.in_proj",
        )
        self.in_proj_ba = MergedColumnParallelLinear(
            hidden, [d.num_heads, d.num_heads], bias=False, quant_config=quant_config,
            prefix=f"{prefix}.in_proj_ba")
        # Dynamic-conv filter generator: the bottleneck is needed whole on every rank;
        # the filters ('(d w)' layout, W per channel) split with the value channels.
        self.kernel_w1 = ReplicatedLinear(
            hidden, d.generator_dim, bias=False, quant_config=quant_config,
            prefix=f"{prefix}.kernel_w1")
        self.kernel_w2 = ColumnParallelLinear(
            d.generator_dim, d.value_dim * d.conv_size, bias=True, quant_config=quant_config,
            prefix=f"{prefix}.kernel_w2")
        self.A_log = nn.Parameter(torch.empty(self.num_heads, dtype=torch.float32))
        self.dt_bias = nn.Parameter(torch.empty(self.num_heads, dtype=torch.float32))
        set_weight_attrs(self.A_log, {"weight_loader": sharded_weight_loader(0)})
        set_weight_attrs(self.dt_bias, {"weight_loader": sharded_weight_loader(0)})
        self.o_norm_weight = nn.Parameter(torch.ones(d.head_v_dim))
        self.o_proj = RowParallelLinear(
            d.value_dim, hidden, bias=False, input_is_parallel=True,
            quant_config=quant_config, prefix=f"{prefix}.o_proj")

        compilation_config = vllm_config.compilation_config
        if prefix in compilation_config.static_forward_context:
            raise ValueError(f"Duplicate layer name: {prefix}")
        compilation_config.static_forward_context[prefix] = self
        self.kv_cache = (torch.tensor([]), torch.tensor([]))
        self.conv_state_dim_first = is_conv_state_dim_first()  # fixed for the process
        ops.dispatch.prepare_kernels(current_platform.device_type)

    # ----- MambaBase: what vLLM allocates for this layer --------------------------

    @property
    def mamba_type(self) -> MambaAttentionBackendEnum:
        return MambaAttentionBackendEnum.GDN_ATTN  # prefill/decode split + spec fields

    def get_attn_backend(self) -> type[JetBlockAttentionBackend]:
        return JetBlockAttentionBackend  # GDN's, plus which drafting sequences are new

    def get_state_shape(self) -> tuple[tuple[int, int], tuple[int, int, int]]:
        return jet_block_state_shapes(self.config, self.tp_size, self.num_spec)

    def get_state_dtype(self) -> tuple[torch.dtype, torch.dtype]:
        return jet_block_state_dtypes(self.vllm_config)

    # ----- forward ----------------------------------------------------------------

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        T = hidden_states.shape[0]
        H, K, V = self.num_heads, self.head_k_dim, self.head_v_dim
        proj, _ = self.in_proj(hidden_states)
        q, k, u, z = proj.split([self.key_dim, self.key_dim, self.value_dim, self.value_dim], dim=-1)
        gates, _ = self.in_proj_ba(hidden_states)
        b, a = gates.split([H, H], dim=-1)
        q = F.silu(q).view(T, H, K)
        k = F.silu(k).view(T, H, K)
        bottleneck, _ = self.kernel_w1(hidden_states)
        conv_kernels, _ = self.kernel_w2(F.silu(bottleneck))
        # [T, value_dim * W] -> [T, value_dim, W] (window index fastest)
        conv_kernels = conv_kernels.view(T, self.value_dim, self.conv_size)

        # Zeros, not empty: rows the core does not write (padded tokens of a CUDA-graph
        # batch, the profiling run) must not carry NaNs into o_proj (as in vLLM's GDN).
        core_out = torch.zeros(T, H, V, dtype=hidden_states.dtype, device=hidden_states.device)
        # the gates g, beta are computed from the raw a, b inside the core
        torch.ops.vllm.jet_block_core(
            q, k, u, conv_kernels, a, b, core_out, _encode_layer_name(self.prefix))
        out = ops.gated_rmsnorm(core_out, z.view(T, H, V), self.o_norm_weight, self.norm_eps)
        # [T, H, V] -> [T, H * V]
        out, _ = self.o_proj(out.view(T, H * V))
        return out

    def _forward_core(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        u: torch.Tensor,
        conv_kernels: torch.Tensor,
        a: torch.Tensor,
        b: torch.Tensor,
        core_out: torch.Tensor,
    ) -> None:
        """Dynamic conv + gated delta rule over this step's tokens (decodes first,
        then prefills), reading and updating the states of each sequence's slot.
        a, b `[T, H]` are the raw gate projections (g and beta in `gated_delta_rule_gates`)."""
        attn_metadata = get_forward_context().attn_metadata
        meta = attn_metadata.get(self.prefix) if isinstance(attn_metadata, dict) else None
        if meta is None:
            return  # profiling run: no states are bound yet
        assert isinstance(meta, JetBlockAttentionMetadata)
        conv_state, recurrent_state = self.kv_cache
        if self.conv_state_dim_first:
            conv_state = conv_state.transpose(-1, -2)  # [slots, dim, len] -> [slots, len, dim]
        inputs = (q, k, u, conv_kernels, a, b)
        if meta.spec_sequence_masks is None:
            if meta.num_decodes > 0:
                n = meta.num_decodes  # one token each, first in the batch
                core_out[:n] = self._forward_decodes(
                    [x[:n] for x in inputs], meta.non_spec_state_indices_tensor[:n], conv_state, recurrent_state)
            if meta.num_prefills > 0:
                self._forward_plain_prefills(meta, inputs, core_out, conv_state, recurrent_state)
            return
        # Speculative decoding: draft sequences, plus prefills (never plain decodes).
        if meta.num_prefills == 0:
            spec_tokens = slice(0, meta.num_actual_tokens)
        else:
            spec_tokens = meta.spec_token_indx
            prefill_tokens = meta.non_spec_token_indx
            core_out[prefill_tokens] = self._forward_prefills(
                [x[prefill_tokens] for x in inputs], meta.prefill_query_start_loc, meta.max_query_len,
                meta.prefill_state_indices, meta.prefill_has_initial_state, conv_state, recurrent_state)
        core_out[spec_tokens] = self._forward_drafts(
            meta, [x[spec_tokens] for x in inputs], conv_state, recurrent_state)

    def _forward_decodes(self, inputs, slots, conv_state, recurrent_state) -> torch.Tensor:
        """One token per sequence: the conv history shifts and the state updates in place."""
        q, k, u, conv_kernels, a, b = inputs
        v = ops.dynamic_conv_step(u, conv_kernels, conv_state[:, : self.conv_size - 1], slots)
        # [N, H * V] -> [N, H, V]
        return ops.gated_delta_rule_step(
            q, k, v.view(-1, self.num_heads, self.head_v_dim), a, b, self.A_log, self.dt_bias,
            recurrent_state, slots)

    def _forward_plain_prefills(self, meta, inputs, core_out, conv_state, recurrent_state) -> None:
        """The prefills of a batch without drafts: after its `num_decodes` decode tokens."""
        num_decodes, num_decode_tokens = meta.num_decodes, meta.num_decode_tokens
        p = slice(num_decode_tokens, num_decode_tokens + meta.num_prefill_tokens)
        p_seqs = slice(num_decodes, num_decodes + meta.num_prefills)
        cu_seqlens = meta.non_spec_query_start_loc[num_decodes:] - num_decode_tokens
        core_out[p] = self._forward_prefills(
            [x[p] for x in inputs], cu_seqlens, meta.max_query_len, meta.non_spec_state_indices_tensor[p_seqs],
            meta.has_initial_state[p_seqs], conv_state, recurrent_state)

    def _forward_prefills(self, inputs, cu_seqlens, max_seqlen, slots, has_initial_state, conv_state,
                          recurrent_state) -> torch.Tensor:
        q, k, u, conv_kernels, a, b = inputs
        history = conv_state[:, : self.conv_size - 1]  # prefills keep W - 1 inputs
        v = ops.dynamic_conv_prefill(u, conv_kernels, cu_seqlens, history, slots, has_initial_state,
                                     max_seqlen)
        return ops.gated_delta_rule_prefill(
            q, k, v.view(-1, self.num_heads, self.head_v_dim), a, b, self.A_log, self.dt_bias, cu_seqlens,
            recurrent_state, slots, has_initial_state)

    def _forward_drafts(self, meta, inputs, conv_state, recurrent_state) -> torch.Tensor:
        """Sequences verifying draft tokens, in one varlen call: each starts from the
        states after the token the previous step accepted last and keeps a state per
        draft position, so rejected drafts never reach the state the next step resumes
        from. Sizes come from tensor shapes only (no host sync: CUDA-graph safe)."""
        q, k, u, conv_kernels, a, b = inputs
        n = meta.num_spec_decodes
        cu_seqlens = meta.spec_query_start_loc[: n + 1]
        slots = meta.spec_state_indices_tensor[:n]  # [N, 1 + num_spec]
        accepted = meta.num_accepted_tokens[:n]
        if meta.spec_has_initial_state is not None:
            _clear_states_of_new_sequences(
                slots, accepted, meta.spec_has_initial_state[:n], conv_state, recurrent_state)
        v = ops.dynamic_conv_spec_decode(u, conv_kernels, cu_seqlens, conv_state, slots[:, 0], accepted)
        return ops.gated_delta_rule_spec_decode(
            q, k, v.view(-1, self.num_heads, self.head_v_dim), a, b, self.A_log, self.dt_bias,
            cu_seqlens, recurrent_state, slots, accepted)


def _clear_states_of_new_sequences(slots, accepted, has_state, conv_state, recurrent_state) -> None:
    """Zero the states that drafting sequences without one start from (see
    `jet_block_metadata`). Masked index copies: no host sync, CUDA-graph safe."""
    start = slots.gather(1, (accepted.long() - 1)[:, None])[:, 0]  # [N] recurrent slot read
    for pool, index in ((recurrent_state, start), (conv_state, slots[:, 0])):
        keep = has_state | (index < 0)  # padded sequences: left alone
        index = index.clamp(min=0).long()
        mask = keep.view(-1, *([1] * (pool.dim() - 1)))
        pool.index_copy_(0, index, pool.index_select(0, index).masked_fill_(~mask, 0))


def jet_block_core(
    q: torch.Tensor,
    k: torch.Tensor,
    u: torch.Tensor,
    conv_kernels: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    core_out: torch.Tensor,
    layer_name: LayerNameType,
) -> None:
    _layer_core(q, k, u, conv_kernels, a, b, core_out, layer_name)


# Runs eagerly between the segments of V2's breakable CUDA graphs (VLLM_USE_BREAKABLE_CUDAGRAPH,
# which does not consult the splitting ops), as vLLM's own recurrent ops do; a plain call
# otherwise. Kept apart from the op function, whose schema torch reads from its annotations.
@eager_break_during_capture
def _layer_core(q, k, u, conv_kernels, a, b, core_out, layer_name) -> None:
    layer = get_forward_context().no_compile_layers[_resolve_layer_name(layer_name)]
    layer._forward_core(q, k, u, conv_kernels, a, b, core_out)


direct_register_custom_op(
    op_name="jet_block_core",
    op_func=jet_block_core,
    mutates_args=["core_out"],
)
