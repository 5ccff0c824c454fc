"""`JetNemotronConfig`: the checkpoint schema shared by the vLLM model, the reference
model and the converter.

It reads the official `config.json` as is (Qwen2 fields plus `layer_types` and
`efficient_attention_config`) and validates it, naming the field for every bad value.
"""

from __future__ import annotations

import copy
import math
import types
import typing
from dataclasses import dataclass
from typing import Any

from huggingface_hub.dataclasses import strict
from transformers import PreTrainedConfig

LAYER_TYPES = ("attn", "swa", "jet")

# Defaults: the official Jet-Nemotron-2B layout.
_DEFAULT_LAYER_TYPES = ["jet"] * 14 + ["attn"] + ["jet"] * 4 + ["attn", "swa", "swa"] + ["jet"] * 6
_DEFAULT_EFFICIENT_ATTENTION = {
    "jet": {"num_heads": 12, "head_dim": 96, "expand_v": 2.6666666667, "conv_size": 4,
            "dconv_generator_reduction": 8, "norm_eps": "1e-5"},
    "swa": {"window_size": 1152},
}


class JetNemotronConfigError(ValueError):
    """A `config.json` value that does not describe a valid Jet-Nemotron model."""


@dataclass(frozen=True)
class JetBlockDims:
    """The JetBlock sizes derived from `efficient_attention_config.jet`."""

    num_heads: int
    head_k_dim: int
    head_v_dim: int
    conv_size: int
    generator_dim: int  # hidden size of the dynamic-conv kernel generator
    norm_eps: float

    @property
    def key_dim(self) -> int:
        return self.num_heads * self.head_k_dim

    @property
    def value_dim(self) -> int:
        return self.num_heads * self.head_v_dim


def _positive_int(value: Any, field: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise JetNemotronConfigError(f"{field} must be a positive integer, got {value!r}")
    return value


def _has_type(value: Any, annotation: Any) -> bool:
    """Whether a JSON value fits a parameter annotation (int | None, list[str], ...);
    bool is no int, an int is a float."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        return any(_has_type(value, a) for a in args)
    if annotation is type(None):
        return value is None
    if origin is list:
        return isinstance(value, list) and all(_has_type(v, args[0]) for v in value)
    if origin is not None:
        return isinstance(value, origin)
    if annotation is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, annotation)


def _check_argument_types(init, arguments: dict[str, Any]) -> None:
    """Raise `JetNemotronConfigError` naming the first argument whose value does not have
    the type its annotation in `init` gives (checked before transformers sees any)."""
    for name, annotation in typing.get_type_hints(init).items():
        if name in arguments and name != "return" and not _has_type(arguments[name], annotation):
            expected = getattr(annotation, "__name__", None) or str(annotation).replace("typing.", "")
            raise JetNemotronConfigError(
                f"{name} must be of type {expected}, got {arguments[name]!r} "
                f"({type(arguments[name]).__name__})")


@strict
class JetNemotronConfig(PreTrainedConfig):
    """Configuration of a Jet-Nemotron hybrid model (official schema)."""

    model_type = "jet_nemotron"
    keys_to_ignore_at_inference = ["past_key_values"]

    def __init__(
        self,
        vocab_size: int = 151936,
        hidden_size: int = 1536,
        intermediate_size: int = 8960,
        num_hidden_layers: int = 28,
        num_attention_heads: int = 12,
        num_key_value_heads: int = 2,
        hidden_act: str = "silu",
        max_position_embeddings: int = 131072,
        initializer_range: float = 0.02,
        rms_norm_eps: float = 1e-6,
        use_cache: bool = True,
        tie_word_embeddings: bool = True,
        rope_theta: float = 1000000.0,
        rope_scaling: dict | None = None,
        attention_dropout: float = 0.0,
        layer_types: list[str] | None = None,
        efficient_attention_config: dict | None = None,
        bos_token_id: int | list[int] | None = 151643,
        eos_token_id: int | list[int] | None = 151643,
        **kwargs,
    ):
        _check_argument_types(JetNemotronConfig.__init__, locals())
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_key_value_heads
        self.hidden_act = hidden_act
        self.max_position_embeddings = max_position_embeddings
        self.initializer_range = initializer_range
        self.rms_norm_eps = rms_norm_eps
        self.use_cache = use_cache
        self.attention_dropout = attention_dropout
        self.tie_word_embeddings = tie_word_embeddings
        self.bos_token_id = bos_token_id
        self.eos_token_id = eos_token_id
        super().__init__(**kwargs)
        # transformers 5 keeps RoPE settings in `rope_parameters` (the form vLLM's
        # `get_rope` takes); `to_dict` writes the official `rope_theta`/`rope_scaling`.
        rope = dict(rope_scaling or {})
        rope.setdefault("rope_type", rope.pop("type", "default"))
        self.rope_parameters = {**rope, "rope_theta": rope_theta}
        # Set after the base class ran its validators, which reject layer type names
        # they do not know; ours run in `validate_layer_type` below.
        self.layer_types = list(layer_types if layer_types is not None else _DEFAULT_LAYER_TYPES)
        self.efficient_attention_config = (
            efficient_attention_config if efficient_attention_config is not None
            else copy.deepcopy(_DEFAULT_EFFICIENT_ATTENTION))
        self.validate_layer_type()  # raise our error itself, not wrapped by transformers

    # ----- derived values -------------------------------------------------------------

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        rope = dict(out.pop("rope_parameters"))
        out.pop("rope_scaling", None)
        out["rope_theta"] = rope.pop("rope_theta")
        out["rope_scaling"] = None if rope == {"rope_type": "default"} else rope
        return out

    @property
    def sliding_window_size(self) -> int | None:
        """Keys a `swa` query sees, itself included; None when no layer is `swa`."""
        if "swa" not in self.layer_types:
            return None
        return self.efficient_attention_config["swa"]["window_size"]

    @property
    def jet_dims(self) -> JetBlockDims:
        return jet_block_dims(self.efficient_attention_config["jet"])

    def layers_of_type(self, layer_type: str) -> list[int]:
        return [i for i, t in enumerate(self.layer_types) if t == layer_type]

    def state_bytes_per_sequence(self, num_tokens: int, kv_bytes: int = 2, state_bytes: int = 2) -> int:
        """Cache bytes one sequence of `num_tokens` needs: KV of `attn`/`swa` layers plus
        the JetBlock conv and recurrent states (element sizes given in bytes)."""
        kv_per_token = 2 * self.num_key_value_heads * self.head_dim * kv_bytes
        total = len(self.layers_of_type("attn")) * num_tokens * kv_per_token
        if "swa" in self.layer_types:
            swa_tokens = min(num_tokens, self.sliding_window_size)
            total += len(self.layers_of_type("swa")) * swa_tokens * kv_per_token
        if "jet" in self.layer_types:
            d = self.jet_dims
            conv = (d.conv_size - 1) * d.value_dim * kv_bytes
            recurrent = d.num_heads * d.head_k_dim * d.head_v_dim * state_bytes
            total += len(self.layers_of_type("jet")) * (conv + recurrent)
        return total

    # ----- validation -----------------------------------------------------------------

    def validate_layer_type(self) -> None:
        """Raise `JetNemotronConfigError` naming the first field that is invalid.

        Runs after `__init__` and before saving (transformers' validator hook)."""
        for field in ("hidden_size", "intermediate_size", "num_hidden_layers",
                      "num_attention_heads", "num_key_value_heads", "vocab_size"):
            _positive_int(getattr(self, field), field)
        if self.hidden_act != "silu":
            raise JetNemotronConfigError(f"hidden_act must be 'silu', got {self.hidden_act!r}")
        if self.hidden_size % self.num_attention_heads:
            raise JetNemotronConfigError(
                f"num_attention_heads ({self.num_attention_heads}) must divide "
                f"hidden_size ({self.hidden_size})")
        if self.num_attention_heads % self.num_key_value_heads:
            raise JetNemotronConfigError(
                f"num_key_value_heads ({self.num_key_value_heads}) must divide "
                f"num_attention_heads ({self.num_attention_heads})")
        if not isinstance(self.layer_types, list) or len(self.layer_types) != self.num_hidden_layers:
            raise JetNemotronConfigError(
                f"layer_types has {len(self.layer_types)} entries but num_hidden_layers is "
                f"{self.num_hidden_layers}; give one of {LAYER_TYPES} per layer")
        for i, layer_type in enumerate(self.layer_types):
            if layer_type not in LAYER_TYPES:
                raise JetNemotronConfigError(
                    f"layer_types[{i}] is {layer_type!r}; expected one of {LAYER_TYPES}")
        if not isinstance(self.efficient_attention_config, dict):
            raise JetNemotronConfigError("efficient_attention_config must be a JSON object")
        if "swa" in self.layer_types:
            self._validate_swa()
        if "jet" in self.layer_types:
            check_jet_settings(self.efficient_attention_config.get("jet"))

    def _validate_swa(self) -> None:
        swa = self.efficient_attention_config.get("swa")
        if not isinstance(swa, dict):
            raise JetNemotronConfigError(
                "efficient_attention_config.swa is missing but layer_types has 'swa' layers "
                f"{self.layers_of_type('swa')}; it needs {{'window_size': N}}")
        _positive_int(swa.get("window_size"), "efficient_attention_config.swa.window_size")


def jet_block_dims(jet: dict[str, Any]) -> JetBlockDims:
    """The JetBlock sizes of `efficient_attention_config.jet` settings (checked by
    `check_jet_settings`)."""
    head_k_dim = jet["head_dim"]
    value_dim = round(head_k_dim * float(jet["expand_v"])) * jet["num_heads"]
    return JetBlockDims(
        num_heads=jet["num_heads"],
        head_k_dim=head_k_dim,
        head_v_dim=value_dim // jet["num_heads"],
        conv_size=jet.get("conv_size", 4),
        generator_dim=value_dim // jet.get("dconv_generator_reduction", 8),
        norm_eps=float(jet.get("norm_eps", 1e-5)),
    )


def check_jet_settings(jet: Any) -> None:
    """Raise JetNemotronConfigError naming the field unless `jet` gives whole JetBlock sizes."""
    prefix = "efficient_attention_config.jet"
    if not isinstance(jet, dict):
        raise JetNemotronConfigError(
            f"{prefix} is missing but layer_types has 'jet' layers; it needs num_heads, "
            "head_dim, expand_v, conv_size, dconv_generator_reduction and norm_eps")
    num_heads = _positive_int(jet.get("num_heads"), f"{prefix}.num_heads")
    head_dim = _positive_int(jet.get("head_dim"), f"{prefix}.head_dim")
    _positive_int(jet.get("conv_size", 4), f"{prefix}.conv_size")
    reduction = _positive_int(jet.get("dconv_generator_reduction", 8),
                              f"{prefix}.dconv_generator_reduction")
    try:
        expand_v = float(jet.get("expand_v"))
    except (TypeError, ValueError):
        raise JetNemotronConfigError(
            f"{prefix}.expand_v must be a number, got {jet.get('expand_v')!r}") from None
    head_v_dim = head_dim * expand_v
    if head_v_dim < 1 or not math.isclose(head_v_dim, round(head_v_dim), abs_tol=1e-4):
        raise JetNemotronConfigError(
            f"{prefix}.expand_v = {jet['expand_v']!r} gives a value head dim of "
            f"head_dim * expand_v = {head_v_dim:g}, which is not an integer")
    value_dim = round(head_v_dim) * num_heads
    if value_dim % reduction:
        raise JetNemotronConfigError(
            f"{prefix}.dconv_generator_reduction ({reduction}) must divide the value dim "
            f"num_heads * head_dim * expand_v = {value_dim}")
    try:
        float(jet.get("norm_eps", 1e-5))
    except (TypeError, ValueError):
        raise JetNemotronConfigError(
            f"{prefix}.norm_eps must be a number, got {jet.get('norm_eps')!r}") from None


def checkpoint_tensor_shapes(config: JetNemotronConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor an official-format checkpoint of `config` holds, with its shape
    (`lm_head.weight` only when the embeddings are not tied)."""
    hidden, inter = config.hidden_size, config.intermediate_size
    q_dim = config.num_attention_heads * config.head_dim
    kv_dim = config.num_key_value_heads * config.head_dim
    shapes: dict[str, tuple[int, ...]] = {
        "model.embed_tokens.weight": (config.vocab_size, hidden),
        "model.norm.weight": (hidden,),
    }
    if not config.tie_word_embeddings:
        shapes["lm_head.weight"] = (config.vocab_size, hidden)
    for i, layer_type in enumerate(config.layer_types):
        p = f"model.layers.{i}."
        shapes[p + "input_layernorm.weight"] = (hidden,)
        shapes[p + "post_attention_layernorm.weight"] = (hidden,)
        shapes[p + "mlp.gate_proj.weight"] = (inter, hidden)
        shapes[p + "mlp.up_proj.weight"] = (inter, hidden)
        shapes[p + "mlp.down_proj.weight"] = (hidden, inter)
        a = p + "self_attn."
        if layer_type in ("attn", "swa"):
            for name, dim in (("q_proj", q_dim), ("k_proj", kv_dim), ("v_proj", kv_dim)):
                shapes[a + name + ".weight"] = (dim, hidden)
                shapes[a + name + ".bias"] = (dim,)
            shapes[a + "o_proj.weight"] = (hidden, q_dim)
            continue
        d = config.jet_dims
        for name, dim in (("q_proj", d.key_dim), ("k_proj", d.key_dim), ("v_proj", d.value_dim),
                          ("g_proj", d.value_dim), ("b_proj", d.num_heads), ("a_proj", d.num_heads)):
            shapes[a + name + ".weight"] = (dim, hidden)
        shapes[a + "o_proj.weight"] = (hidden, d.value_dim)
        shapes[a + "A_log"] = (d.num_heads,)
        shapes[a + "dt_bias"] = (d.num_heads,)
        g = a + "dynamic_conv1d.kernel_generator."
        shapes[g + "w1.weight"] = (d.generator_dim, hidden)
        shapes[g + "w2.weight"] = (d.value_dim * d.conv_size, d.generator_dim)
        shapes[g + "w2.bias"] = (d.value_dim * d.conv_size,)
        shapes[a + "o_norm.weight"] = (d.head_v_dim,)
    return shapes
