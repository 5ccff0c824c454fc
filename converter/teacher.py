"""The teacher: a Hugging Face full-attention decoder (Qwen2 / Qwen2.5 / Qwen3 / Llama
layout), checked before any work starts, and the mapping of its weights into
Jet-Nemotron models (same parameter names: `model.layers.i.self_attn.q_proj`, ...).

Qwen2 and Llama attention is copied exactly (Llama without q/k/v bias gets zero biases).
Qwen3's per-head q/k RMSNorms have no place in the Jet-Nemotron format: they are dropped,
and the kept attention layers are trained in the final distillation to make up for it.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Annotated

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from vllm_jetnemotron.config import JetNemotronConfig

from .recipe import NonNegativeInt, PositiveInt

log = logging.getLogger("jet_nemotron_convert")

SUPPORTED_ARCHITECTURES = {
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
    "LlamaForCausalLM": "llama",
}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt",
                   "special_tokens_map.json", "added_tokens.json", "tokenizer.model",
                   "chat_template.jinja")


class TeacherError(ValueError):
    """A teacher folder the converter cannot use."""


class TeacherFields(BaseModel):
    """The `config.json` fields the converter reads, with the types Hugging Face writes."""

    model_config = ConfigDict(extra="allow", strict=True)

    architectures: Annotated[list[str], Field(min_length=1)]
    vocab_size: PositiveInt
    hidden_size: PositiveInt
    intermediate_size: PositiveInt
    num_hidden_layers: PositiveInt
    num_attention_heads: PositiveInt
    num_key_value_heads: PositiveInt | None = None
    head_dim: PositiveInt | None = None
    max_position_embeddings: PositiveInt | None = None
    hidden_act: str = "silu"
    rms_norm_eps: Annotated[float, Field(gt=0, strict=False)] | None = None
    rope_theta: Annotated[float, Field(gt=0, strict=False)] | None = None
    rope_scaling: dict | None = None
    rope_parameters: dict | None = None
    tie_word_embeddings: bool = False
    bos_token_id: NonNegativeInt | list[NonNegativeInt] | None = None
    eos_token_id: NonNegativeInt | list[NonNegativeInt] | None = None


def _read_teacher_config(config_file: Path) -> dict:
    try:
        config = json.loads(config_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise TeacherError(f"{config_file} is not valid JSON: {error}") from None
    if not isinstance(config, dict):
        raise TeacherError(f"{config_file} must hold a JSON object, got {type(config).__name__}")
    try:
        TeacherFields.model_validate(config)
    except ValidationError as error:
        problems = []
        for e in error.errors():
            field = ".".join(str(p) for p in e["loc"])
            value = "missing" if e["type"] == "missing" else f"{e['input']!r}: {e['msg']}"
            problems.append(f"{field} is {value}")
        raise TeacherError(f"{config_file}: " + "; ".join(problems)) from None
    return config


def check_teacher(path: str | Path) -> dict:
    """Validate the teacher folder without loading weights; returns its config dict."""
    path = Path(path)
    if not path.is_dir():
        raise TeacherError(f"teacher folder {path} does not exist")
    config_file = path / "config.json"
    if not config_file.is_file():
        raise TeacherError(f"teacher folder {path} has no config.json (expected a Hugging Face model folder)")
    config = _read_teacher_config(config_file)
    architectures = config.get("architectures") or []
    if not architectures or architectures[0] not in SUPPORTED_ARCHITECTURES:
        raise TeacherError(
            f"{config_file}: unsupported architecture {architectures!r}; the converter takes "
            f"{sorted(SUPPORTED_ARCHITECTURES)} (full-attention decoders)")
    weights = list(path.glob("*.safetensors")) + list(path.glob("pytorch_model*.bin"))
    if not weights:
        raise TeacherError(f"teacher folder {path} has no weights (*.safetensors or pytorch_model*.bin)")
    if not (path / "tokenizer.json").is_file() and not (path / "tokenizer.model").is_file() \
            and not (path / "vocab.json").is_file():
        raise TeacherError(f"teacher folder {path} has no tokenizer files (tokenizer.json, vocab.json or tokenizer.model)")
    if config.get("hidden_act", "silu") != "silu":
        raise TeacherError(f"{config_file}: hidden_act is {config.get('hidden_act')!r}; only 'silu' (SwiGLU) is supported")
    hidden, heads = config["hidden_size"], config["num_attention_heads"]
    head_dim = config.get("head_dim") or hidden // heads
    if head_dim * heads != hidden:
        raise TeacherError(
            f"{config_file}: head_dim {head_dim} x num_attention_heads {heads} != hidden_size {hidden}; "
            "the Jet-Nemotron format derives head_dim = hidden_size / num_attention_heads")
    rope_scaling = config.get("rope_scaling") or (config.get("rope_parameters") or {})
    rope_type = rope_scaling.get("rope_type", rope_scaling.get("type", "default")) if rope_scaling else "default"
    if rope_type not in (None, "default"):
        raise TeacherError(f"{config_file}: rope scaling {rope_type!r} is not supported (plain RoPE only)")
    return config


def rope_theta(config: dict) -> float:
    if "rope_theta" in config:
        return float(config["rope_theta"])
    return float((config.get("rope_parameters") or {}).get("rope_theta", 10000.0))


def student_config(teacher_config: dict, layer_types: list[str], jet: dict, swa_window: int,
                   provenance: dict | None = None) -> JetNemotronConfig:
    """The Jet-Nemotron config with the teacher's sizes and the given layer types."""
    eos = teacher_config.get("eos_token_id")
    eos = eos[0] if isinstance(eos, list) else eos
    bos = teacher_config.get("bos_token_id", eos)
    efficient = {"jet": dict(jet), "swa": {"window_size": swa_window}}
    extra = {"converter": provenance} if provenance else {}
    return JetNemotronConfig(
        vocab_size=teacher_config["vocab_size"],
        hidden_size=teacher_config["hidden_size"],
        intermediate_size=teacher_config["intermediate_size"],
        num_hidden_layers=len(layer_types),
        num_attention_heads=teacher_config["num_attention_heads"],
        num_key_value_heads=teacher_config.get("num_key_value_heads", teacher_config["num_attention_heads"]),
        max_position_embeddings=teacher_config.get("max_position_embeddings", 32768),
        rms_norm_eps=teacher_config.get("rms_norm_eps", 1e-6),
        tie_word_embeddings=teacher_config.get("tie_word_embeddings", False),
        rope_theta=rope_theta(teacher_config),
        layer_types=list(layer_types),
        efficient_attention_config=efficient,
        bos_token_id=bos if bos is not None else 0,
        eos_token_id=eos if eos is not None else 0,
        **extra,
    )


def load_teacher(path: str | Path, device: torch.device) -> torch.nn.Module:
    """The teacher as a frozen Hugging Face model in float32 (bf16 on CUDA)."""
    from transformers import AutoModelForCausalLM

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype).to(device).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def teacher_state_dict(teacher: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Teacher tensors under Jet-Nemotron names (float32 copies on the CPU)."""
    out = {}
    for name, tensor in teacher.state_dict().items():
        if name.endswith(("q_norm.weight", "k_norm.weight")) or "rotary_emb" in name:
            continue
        out[name] = tensor.detach().float().cpu().clone()
    return out


def copy_teacher_weights(student: torch.nn.Module, teacher_tensors: dict[str, torch.Tensor],
                         layer_map: list[int] | None = None) -> list[str]:
    """Copy embeddings, final norm, lm_head, per-layer norms and MLPs, and the attention
    of `attn`/`swa` layers into `student` (layer i of the student takes teacher layer
    `layer_map[i]`, default i). Missing attention biases (Llama) become zeros. Returns
    the student parameter names that were set."""
    own = student.state_dict()
    copied = []
    for name in own:
        source = name
        if name.startswith("model.layers."):
            parts = name.split(".")
            i = int(parts[2])
            parts[2] = str(layer_map[i] if layer_map is not None else i)
            source = ".".join(parts)
        if source in teacher_tensors and teacher_tensors[source].shape == own[name].shape:
            own[name].copy_(teacher_tensors[source])
            copied.append(name)
        elif name.endswith(("q_proj.bias", "k_proj.bias", "v_proj.bias")) and ".self_attn." in name \
                and source.replace(".bias", ".weight") in teacher_tensors:
            own[name].zero_()  # Llama layout: attention without bias
            copied.append(name)
    if "lm_head.weight" in own and "lm_head.weight" not in teacher_tensors:
        own["lm_head.weight"].copy_(teacher_tensors["model.embed_tokens.weight"])
    return copied


def copy_tokenizer_files(teacher_dir: str | Path, out_dir: Path) -> list[str]:
    """The teacher's tokenizer files (and generation_config.json) into `out_dir`."""
    import shutil

    copied = []
    for name in TOKENIZER_FILES + ("generation_config.json",):
        src = Path(teacher_dir) / name
        if src.is_file():
            shutil.copyfile(src, out_dir / name)
            copied.append(name)
    return copied
