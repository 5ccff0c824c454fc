"""Reference Jet-Nemotron model in plain PyTorch (Hugging Face `PreTrainedModel`).

It is the oracle the vLLM model is tested against and the model the converter trains.
Its JetBlock calls the definitions in `kernels` (`naive.py` of each operation, where the
math is written out), so it is slow but transparent. Weights load from and save to the
official checkpoint format (`from_pretrained` / `save_pretrained`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from vllm_jetnemotron.config import JetNemotronConfig
from vllm_jetnemotron.kernels import (
    dynamic_causal_conv_naive,
    gated_delta_rule_gates,
    gated_rmsnorm_naive,
    naive_recurrent_gated_delta_rule,
)
from vllm_jetnemotron.kernels.gated_delta_rule.naive import chunked_gated_delta_rule


@dataclass
class JetNemotronCache:
    """Generation cache: per layer, keys/values (`attn`, `swa`) or the conv and
    recurrent states (`jet`), batch first."""

    keys: dict[int, torch.Tensor] = field(default_factory=dict)  # [B, kv_heads, T, head_dim]
    values: dict[int, torch.Tensor] = field(default_factory=dict)
    conv_states: dict[int, torch.Tensor] = field(default_factory=dict)  # [B, W - 1, value_dim]
    recurrent_states: dict[int, torch.Tensor] = field(default_factory=dict)  # [B, H, K, V] f32
    num_tokens: int = 0

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.num_tokens


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


def rotary_cos_sin(positions: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype):
    """cos, sin `[T, head_dim]` for RoPE in the rotate-half (NeoX) layout."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    angles = positions.float()[:, None] * inv_freq[None]  # [T, head_dim / 2]
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


def rotary_qkv(attention: nn.Module, x: torch.Tensor, positions: torch.Tensor):
    """q, k, v `[B, heads (kv_heads for k, v), T, head_dim]` of an attention module with
    `q_proj`/`k_proj`/`v_proj`, `num_heads`, `num_kv_heads`, `head_dim` and `rope_theta`,
    RoPE applied to q and k at `positions` `[T]`."""
    B, T, _ = x.shape
    heads, kv_heads, head_dim = attention.num_heads, attention.num_kv_heads, attention.head_dim
    # [B, T, heads * head_dim] -> [B, heads, T, head_dim]
    q = attention.q_proj(x).view(B, T, heads, head_dim).transpose(1, 2)
    k = attention.k_proj(x).view(B, T, kv_heads, head_dim).transpose(1, 2)
    v = attention.v_proj(x).view(B, T, kv_heads, head_dim).transpose(1, 2)
    cos, sin = rotary_cos_sin(positions, head_dim, attention.rope_theta, q.dtype)
    return apply_rotary(q, cos, sin), apply_rotary(k, cos, sin), v


class JetNemotronAttention(nn.Module):
    """Causal GQA attention with RoPE; `window` limits each query to its last
    `window` keys (itself included) for `swa` layers."""

    def __init__(self, config: JetNemotronConfig, layer_idx: int, window: int | None):
        super().__init__()
        self.layer_idx = layer_idx
        self.window = window
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        self.rope_theta = config.rope_parameters["rope_theta"]
        hidden = config.hidden_size
        self.q_proj = nn.Linear(hidden, self.num_heads * self.head_dim, bias=True)
        self.k_proj = nn.Linear(hidden, self.num_kv_heads * self.head_dim, bias=True)
        self.v_proj = nn.Linear(hidden, self.num_kv_heads * self.head_dim, bias=True)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, hidden, bias=False)

    def forward(self, x: torch.Tensor, positions: torch.Tensor, cache: JetNemotronCache | None) -> torch.Tensor:
        B, T, _ = x.shape
        q, k, v = rotary_qkv(self, x, positions)
        if cache is not None:
            if self.layer_idx in cache.keys:
                k = torch.cat([cache.keys[self.layer_idx], k], dim=2)
                v = torch.cat([cache.values[self.layer_idx], v], dim=2)
            cache.keys[self.layer_idx], cache.values[self.layer_idx] = k, v
        key_pos = torch.arange(k.shape[2], device=x.device)
        distance = positions[:, None] - key_pos[None, :]  # [T, T_keys]
        allowed = distance >= 0
        if self.window is not None:
            allowed &= distance < self.window
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=allowed, enable_gqa=self.num_kv_heads != self.num_heads)
        # [B, heads, T, head_dim] -> [B, T, heads * head_dim]
        return self.o_proj(out.transpose(1, 2).reshape(B, T, -1))


def chunked_gated_delta_rule_for_training(q, k, v, g, beta) -> torch.Tensor:
    """Differentiable gated delta rule from zero states, for training (the converter).

    q, k `[B, T, H, K]`, v `[B, T, H, V]`, g, beta `[B, T, H]`; returns o `[B, T, H, V]`
    in v's dtype, equal to `naive_recurrent_gated_delta_rule` up to float rounding. CUDA
    tensors use the Triton forward with PyTorch backward; elsewhere the chunked PyTorch
    form (`chunked_gated_delta_rule`) runs under autograd."""
    if q.is_cuda:  # triton is imported only here
        from vllm_jetnemotron.kernels.gated_delta_rule.triton_chunk_autograd import chunk_gated_delta_rule_autograd

        return chunk_gated_delta_rule_autograd(q, k, v, g, beta)[0]
    return chunked_gated_delta_rule(q, k, v, g, beta)[0].to(v.dtype)


class KernelGenerator(nn.Module):
    """Per-token dynamic-conv filters from the layer input: w2(silu(w1(x)))."""

    def __init__(self, hidden: int, generator_dim: int, value_dim: int, conv_size: int):
        super().__init__()
        self.w1 = nn.Linear(hidden, generator_dim, bias=False)
        self.w2 = nn.Linear(generator_dim, value_dim * conv_size, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)))


class DynamicConv1d(nn.Module):
    def __init__(self, hidden: int, generator_dim: int, value_dim: int, conv_size: int):
        super().__init__()
        self.conv_size = conv_size
        self.kernel_generator = KernelGenerator(hidden, generator_dim, value_dim, conv_size)

    def forward(self, x: torch.Tensor, u: torch.Tensor, state: torch.Tensor | None):
        B, T, D = u.shape
        # [B, T, D * W] -> [B, T, D, W] (window index fastest)
        kernels = self.kernel_generator(x).view(B, T, D, self.conv_size)
        return dynamic_causal_conv_naive(u, kernels, state)


class JetBlock(nn.Module):
    """Gated delta rule linear attention with a dynamic convolution on values.

    `chunked_training = True` (set by the converter) makes cache-less forwards use
    `chunked_gated_delta_rule_for_training`; the default is the token loop (the oracle)."""

    chunked_training = False

    def __init__(self, config: JetNemotronConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        d = config.jet_dims
        self.num_heads, self.head_k_dim, self.head_v_dim = d.num_heads, d.head_k_dim, d.head_v_dim
        self.norm_eps = d.norm_eps
        hidden = config.hidden_size
        self.q_proj = nn.Linear(hidden, d.key_dim, bias=False)
        self.k_proj = nn.Linear(hidden, d.key_dim, bias=False)
        self.v_proj = nn.Linear(hidden, d.value_dim, bias=False)
        self.b_proj = nn.Linear(hidden, d.num_heads, bias=False)
        self.a_proj = nn.Linear(hidden, d.num_heads, bias=False)
        self.g_proj = nn.Linear(hidden, d.value_dim, bias=False)
        self.o_proj = nn.Linear(d.value_dim, hidden, bias=False)
        self.A_log = nn.Parameter(torch.zeros(d.num_heads))
        self.dt_bias = nn.Parameter(torch.zeros(d.num_heads))
        self.dynamic_conv1d = DynamicConv1d(hidden, d.generator_dim, d.value_dim, d.conv_size)
        self.o_norm = RMSNorm(d.head_v_dim, d.norm_eps)

    @torch.no_grad()
    def init_gate_parameters(self) -> None:
        """Decay rates A in [1, 16] and time steps dt in [1e-3, 1e-1], log-uniform, stored
        as log(A) and softplus^-1(dt) (the Mamba-2 / GDN initialisation)."""
        H = self.num_heads
        self.A_log.copy_(torch.empty(H).uniform_(1, 16).log())
        dt = torch.exp(torch.rand(H) * (math.log(0.1) - math.log(1e-3)) + math.log(1e-3))
        self.dt_bias.copy_(dt + torch.log(-torch.expm1(-dt)))

    def forward(self, x: torch.Tensor, positions: torch.Tensor, cache: JetNemotronCache | None) -> torch.Tensor:
        B, T, _ = x.shape
        H, K, V = self.num_heads, self.head_k_dim, self.head_v_dim
        q = F.silu(self.q_proj(x)).view(B, T, H, K)
        k = F.silu(self.k_proj(x)).view(B, T, H, K)
        g, beta = gated_delta_rule_gates(self.a_proj(x), self.b_proj(x), self.A_log, self.dt_bias)
        conv_state = cache.conv_states.get(self.layer_idx) if cache is not None else None
        v, conv_state = self.dynamic_conv1d(x, self.v_proj(x), conv_state)
        # the recurrence in float32 also under bf16 autocast (the converter's mixed precision):
        # its chunked form's triangular solves and decays lose the state in bf16
        with torch.autocast(x.device.type, enabled=False):
            if self.chunked_training and cache is None:
                o = chunked_gated_delta_rule_for_training(q, k, v.view(B, T, H, V), g, beta)
            else:
                state = cache.recurrent_states.get(self.layer_idx) if cache is not None else None
                o, state = naive_recurrent_gated_delta_rule(
                    q, k, v.view(B, T, H, V), g, beta, initial_state=state, output_final_state=cache is not None)
        if cache is not None:
            cache.conv_states[self.layer_idx], cache.recurrent_states[self.layer_idx] = conv_state, state
        z = self.g_proj(x).view(B, T, H, V)
        o = gated_rmsnorm_naive(o, z, self.o_norm.weight, self.norm_eps)
        return self.o_proj(o.reshape(B, T, H * V))


class JetNemotronMLP(nn.Module):
    def __init__(self, config: JetNemotronConfig):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class JetNemotronDecoderLayer(nn.Module):
    def __init__(self, config: JetNemotronConfig, layer_idx: int):
        super().__init__()
        layer_type = config.layer_types[layer_idx]
        if layer_type == "jet":
            self.self_attn = JetBlock(config, layer_idx)
        else:
            window = config.sliding_window_size if layer_type == "swa" else None
            self.self_attn = JetNemotronAttention(config, layer_idx, window)
        self.mlp = JetNemotronMLP(config)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, x: torch.Tensor, positions: torch.Tensor, cache: JetNemotronCache | None) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), positions, cache)
        return x + self.mlp(self.post_attention_layernorm(x))


class JetNemotronPreTrainedModel(PreTrainedModel):
    config_class = JetNemotronConfig
    base_model_prefix = "model"
    _no_split_modules = ["JetNemotronDecoderLayer"]

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False  # JetBlocks keep recurrent states: `JetNemotronCache`

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            module.weight.normal_(0.0, std)
            if module.bias is not None:
                module.bias.zero_()
        elif isinstance(module, nn.Embedding):
            module.weight.normal_(0.0, std)
        elif isinstance(module, RMSNorm):
            module.weight.fill_(1.0)
        elif isinstance(module, JetBlock):
            module.init_gate_parameters()


class JetNemotronModel(JetNemotronPreTrainedModel):
    def __init__(self, config: JetNemotronConfig):
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(
            JetNemotronDecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_init()

    def forward(self, input_ids: torch.Tensor, cache: JetNemotronCache | None = None,
                output_hidden_states: bool = False) -> tuple[torch.Tensor, tuple[torch.Tensor, ...] | None]:
        """The final normed hidden states and, when asked, the residual stream entering
        each layer (index i) and leaving the last one (index num_layers, before the final
        norm): the indices of vLLM's `eagle_aux_hidden_state_layer_ids`."""
        start = cache.num_tokens if cache is not None else 0
        positions = torch.arange(start, start + input_ids.shape[1], device=input_ids.device)
        x = self.embed_tokens(input_ids)
        stream = [x] if output_hidden_states else None
        for layer in self.layers:
            x = layer(x, positions, cache)
            if stream is not None:
                stream.append(x)
        if cache is not None:
            cache.num_tokens += input_ids.shape[1]
        return self.norm(x), tuple(stream) if stream is not None else None


class JetNemotronForCausalLM(JetNemotronPreTrainedModel, GenerationMixin):
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: JetNemotronConfig):
        super().__init__(config)
        self.model = JetNemotronModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def forward(
        self,
        input_ids: torch.Tensor,
        past_key_values: JetNemotronCache | None = None,
        use_cache: bool | None = None,
        labels: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        output_hidden_states: bool | None = None,
        **kwargs,
    ) -> CausalLMOutputWithPast:
        """Padding is not supported: `attention_mask`, if given, must be all ones.
        `hidden_states` (with `output_hidden_states`): the residual stream, see
        `JetNemotronModel.forward`."""
        if attention_mask is not None and not bool(attention_mask.all()):
            raise ValueError("JetNemotronForCausalLM (reference) does not support padded batches")
        if use_cache and past_key_values is None:
            past_key_values = JetNemotronCache()
        hidden, stream = self.model(input_ids, past_key_values if use_cache else None, bool(output_hidden_states))
        logits = self.lm_head(hidden).float()
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100)
        return CausalLMOutputWithPast(
            loss=loss, logits=logits, past_key_values=past_key_values if use_cache else None, hidden_states=stream)

    def prepare_inputs_for_generation(self, input_ids, past_key_values=None, attention_mask=None, **kwargs):
        if past_key_values is not None:
            input_ids = input_ids[:, past_key_values.num_tokens:]
        return {"input_ids": input_ids, "past_key_values": past_key_values, "use_cache": True,
                "attention_mask": attention_mask}
