"""Student models built from the teacher: the super-network of stage 1 (every layer keeps
the teacher attention and gains a JetBlock) and plain Jet-Nemotron models of a given
layout (stages 3-5, baselines, draft), all initialised by the rules below.

JetBlock initialisation rule (documented in the report):
  * q_proj / k_proj / v_proj / o_proj take the teacher attention's weights of the same
    layer when the shapes fit (key_dim = heads * head_dim; k and v repeated over the GQA
    groups; v and o when value_dim = heads * head_dim), as in Mamba-in-the-Llama; the
    others are normal(0, initializer_range) and o_proj starts at zero, so a fresh JetBlock
    adds nothing and the network starts as the teacher with that attention skipped.
  * A_log, dt_bias: the Mamba-2 / GDN rule of the reference model
    (`JetBlock.init_gate_parameters`: A in [1, 16], dt in [1e-3, 1e-1] log-uniform).
  * the dynamic-conv generator's bias is the identity filter (tap W-1 = 1), so values
    start as silu(v_proj x) and the generated part (small weights) learns a correction.
  * "gdn" blocks (gated DeltaNet with a static conv) are JetBlocks whose generator
    weights are zero and frozen: the filter is the learned bias alone, identical for
    every token. They are written in the same checkpoint format, so the plugin serves them.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from vllm_jetnemotron.config import JetNemotronConfig

from .modeling import JetBlock, JetNemotronForCausalLM, JetNemotronModel


def _repeat_kv(weight: torch.Tensor, num_kv_heads: int, num_heads: int) -> torch.Tensor:
    # [kv_heads * head_dim, hidden] -> [heads * head_dim, hidden]
    head_dim = weight.shape[0] // num_kv_heads
    w = weight.view(num_kv_heads, head_dim, -1)
    return w.repeat_interleave(num_heads // num_kv_heads, dim=0).reshape(num_heads * head_dim, -1)


@torch.no_grad()
def init_jetblock(block: JetBlock, config: JetNemotronConfig, attention: dict[str, torch.Tensor] | None,
                  static_conv: bool = False) -> None:
    """Apply the initialisation rule of the module docstring; `attention` maps q_proj.weight,
    k_proj.weight, v_proj.weight, o_proj.weight to the teacher tensors of this layer."""
    std = config.initializer_range
    for linear in (block.q_proj, block.k_proj, block.v_proj, block.b_proj, block.a_proj, block.g_proj,
                   block.dynamic_conv1d.kernel_generator.w1, block.dynamic_conv1d.kernel_generator.w2):
        linear.weight.normal_(0.0, std)
    block.o_proj.weight.zero_()
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    q_dim = heads * config.head_dim
    key_dim = block.num_heads * block.head_k_dim
    value_dim = block.num_heads * block.head_v_dim
    if attention is not None and key_dim == q_dim:
        block.q_proj.weight.copy_(attention["q_proj.weight"])
        block.k_proj.weight.copy_(_repeat_kv(attention["k_proj.weight"], kv_heads, heads))
    if attention is not None and value_dim == q_dim:
        block.v_proj.weight.copy_(_repeat_kv(attention["v_proj.weight"], kv_heads, heads))
        block.o_proj.weight.copy_(attention["o_proj.weight"])
    block.init_gate_parameters()
    block.o_norm.weight.fill_(1.0)
    generator = block.dynamic_conv1d.kernel_generator
    conv_size = block.dynamic_conv1d.conv_size
    # bias [value_dim * W] viewed [value_dim, W] (window index fastest): identity filter
    identity = torch.zeros(value_dim, conv_size)
    identity[:, -1] = 1.0
    generator.w2.bias.copy_(identity.flatten())
    if static_conv:
        make_static_conv(block)


@torch.no_grad()
def make_static_conv(block: JetBlock) -> None:
    """Turn the dynamic conv into a static one: generator weights zero and frozen."""
    generator = block.dynamic_conv1d.kernel_generator
    generator.w1.weight.zero_()
    generator.w2.weight.zero_()
    generator.w1.weight.requires_grad_(False)
    generator.w2.weight.requires_grad_(False)
    block.static_conv = True


def attention_tensors(teacher_tensors: dict[str, torch.Tensor], layer: int) -> dict[str, torch.Tensor]:
    prefix = f"model.layers.{layer}.self_attn."
    return {name: teacher_tensors[prefix + name] for name in
            ("q_proj.weight", "k_proj.weight", "v_proj.weight", "o_proj.weight")}


def enable_training_kernels(model: nn.Module) -> None:
    """Cache-less JetBlock forwards use the chunked (differentiable) gated delta rule."""
    for module in model.modules():
        if isinstance(module, JetBlock):
            module.chunked_training = True


def build_student(config: JetNemotronConfig, teacher_tensors: dict[str, torch.Tensor],
                  block_kind: str = "jet", jet_sources: list[dict[str, torch.Tensor]] = (),
                  layer_map: list[int] | None = None, seed: int = 0) -> JetNemotronForCausalLM:
    """A Jet-Nemotron model of `config` with the teacher's weights; each JetBlock is taken
    from the first of `jet_sources` (state dicts under checkpoint names) holding all its
    tensors with the right shapes, else initialised by the rule. float32."""
    from .teacher import copy_teacher_weights

    torch.manual_seed(seed)
    model = JetNemotronForCausalLM(config).float()
    copy_teacher_weights(model, teacher_tensors, layer_map)
    for i, layer in enumerate(model.model.layers):
        block = layer.self_attn
        if not isinstance(block, JetBlock):
            continue
        prefix = f"model.layers.{i}.self_attn."
        own = {name: t for name, t in block.state_dict().items()}
        for source in jet_sources:
            if all(prefix + n in source and source[prefix + n].shape == t.shape for n, t in own.items()):
                block.load_state_dict({n: source[prefix + n] for n in own})
                if block_kind == "gdn":
                    make_static_conv(block)
                break
        else:
            teacher_layer = layer_map[i] if layer_map is not None else i
            init_jetblock(block, config, attention_tensors(teacher_tensors, teacher_layer),
                          static_conv=block_kind == "gdn")
    enable_training_kernels(model)
    return model


def set_trainable(model: JetNemotronForCausalLM, mode: str) -> list[str]:
    """`mixers`: only the token mixers of `jet` layers; `all`: everything except the
    embeddings (and a tied lm_head). Frozen static-conv generators stay frozen."""
    names = []
    for name, p in model.named_parameters():
        layer_is_jet = False
        if name.startswith("model.layers."):
            i = int(name.split(".")[2])
            layer_is_jet = model.config.layer_types[i] == "jet"
        if mode == "mixers":
            train = layer_is_jet and ".self_attn." in name
        else:
            train = "embed_tokens" not in name and not name.startswith("lm_head")
        if getattr(_owner_block(model, name), "static_conv", False) and "kernel_generator.w" in name \
                and name.endswith("weight"):
            train = False
        p.requires_grad_(train)
        if train:
            names.append(name)
    return names


def _owner_block(model: nn.Module, name: str):
    if ".self_attn." not in name:
        return None
    return model.get_submodule(name.split(".self_attn.")[0] + ".self_attn")


class SuperNetwork(nn.Module):
    """Stage 1: the teacher (as an all-`attn` Jet-Nemotron, frozen) plus one trainable
    JetBlock per layer. `forward(input_ids, layer_types)` runs each layer with the mixer
    its type names: the teacher attention (`attn`), the same attention limited to
    `swa_window` keys (`swa`), or the layer's JetBlock (`jet`)."""

    def __init__(self, config: JetNemotronConfig, teacher_tensors: dict[str, torch.Tensor], swa_window: int,
                 seed: int = 0):
        super().__init__()
        all_attn = copy.deepcopy(config)
        all_attn.layer_types = ["attn"] * config.num_hidden_layers
        all_jet = copy.deepcopy(config)
        all_jet.layer_types = ["jet"] * config.num_hidden_layers
        torch.manual_seed(seed)
        self.base = build_student(all_attn, teacher_tensors)
        self.jet_blocks = nn.ModuleList(JetBlock(all_jet, i) for i in range(config.num_hidden_layers))
        for i, block in enumerate(self.jet_blocks):
            init_jetblock(block, all_jet, attention_tensors(teacher_tensors, i))
            block.chunked_training = True
        for p in self.base.parameters():
            p.requires_grad_(False)
        self.swa_window = swa_window

    def forward(self, input_ids: torch.Tensor, layer_types: list[str] | None) -> torch.Tensor:
        """Logits of the layout `layer_types`; with None, the attention transfer errors
        (`transfer_errors`). Both go through `forward`, so DDP sees either."""
        if layer_types is None:
            return self.transfer_errors(input_ids)
        model: JetNemotronModel = self.base.model
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        x = model.embed_tokens(input_ids)
        for i, layer in enumerate(model.layers):
            h = layer.input_layernorm(x)
            if layer_types[i] == "jet":
                x = x + self.jet_blocks[i](h, positions, None)
            else:
                layer.self_attn.window = self.swa_window if layer_types[i] == "swa" else None
                x = x + layer.self_attn(h, positions, None)
            x = x + layer.mlp(layer.post_attention_layernorm(x))
        return self.base.lm_head(model.norm(x)).float()

    def transfer_errors(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Layer-wise attention transfer: the teacher runs unchanged, and each layer's JetBlock
        reads that layer's normalised input and is scored against its attention's output,
        by the squared error relative to the output's mean square. Returns the `[L]` errors;
        gradients reach each JetBlock from its own layer only, none flows through the teacher."""
        model: JetNemotronModel = self.base.model
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        errors = []
        with torch.no_grad():
            x = model.embed_tokens(input_ids)
        for i, layer in enumerate(model.layers):
            with torch.no_grad():
                h = layer.input_layernorm(x)
                layer.self_attn.window = None
                target = layer.self_attn(h, positions, None).float()
            out = self.jet_blocks[i](h, positions, None).float()
            errors.append((out - target).pow(2).mean() / target.pow(2).mean().clamp_min(1e-12))
            with torch.no_grad():
                x = x + target.to(x.dtype)
                x = x + layer.mlp(layer.post_attention_layernorm(x))
        return torch.stack(errors)

    def jet_state_dict(self) -> dict[str, torch.Tensor]:
        """Every layer's JetBlock under checkpoint names (`model.layers.i.self_attn.*`)."""
        return {f"model.layers.{i}.self_attn.{name}": t.detach().clone()
                for i, block in enumerate(self.jet_blocks) for name, t in block.state_dict().items()}


def kl_distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """Mean over tokens of KL(teacher || student) on next-token distributions."""
    s = F.log_softmax(student_logits.float().flatten(0, -2), dim=-1)
    t = F.log_softmax(teacher_logits.float().flatten(0, -2), dim=-1)
    return F.kl_div(s, t, log_target=True, reduction="batchmean")
