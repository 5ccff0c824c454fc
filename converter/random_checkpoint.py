"""Write a randomly initialised Jet-Nemotron checkpoint in the official format.

    python -m vllm_jetnemotron.converter.random_checkpoint OUT_DIR --preset tiny

Presets: `tiny` (a few MB of layers, for tests), `small` (a few hundred MB;
`make serve MODEL=models/random-small`), `2b` and `4b` (the official architectures, full
size). The folder gets `config.json`, `model.safetensors`,
`generation_config.json` and the Qwen2.5 tokenizer files; it is written to a temporary
folder beside OUT_DIR and renamed at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
from importlib import resources
from pathlib import Path

import torch

from vllm_jetnemotron.config import JetNemotronConfig

from .atomic_files import folder_written_atomically

PRESETS: dict[str, dict] = {
    "tiny": dict(
        hidden_size=128, intermediate_size=256, num_hidden_layers=4, num_attention_heads=2,
        num_key_value_heads=1, initializer_range=0.1, max_position_embeddings=4096,
        layer_types=["jet", "attn", "jet", "swa"],
        efficient_attention_config={
            "jet": {"num_heads": 2, "head_dim": 32, "expand_v": 2.0, "conv_size": 4,
                    "dconv_generator_reduction": 4, "norm_eps": "1e-5"},
            "swa": {"window_size": 48}}),
    "small": dict(
        hidden_size=256, intermediate_size=768, num_hidden_layers=8, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=32768,
        layer_types=["jet", "jet", "jet", "attn", "jet", "swa", "jet", "jet"],
        efficient_attention_config={
            "jet": {"num_heads": 4, "head_dim": 32, "expand_v": 2.0, "conv_size": 4,
                    "dconv_generator_reduction": 8, "norm_eps": "1e-5"},
            "swa": {"window_size": 512}}),
}


def asset_path(name: str) -> Path:
    return Path(str(resources.files("vllm_jetnemotron.converter") / "assets" / name))


def official_config(name: str) -> JetNemotronConfig:
    """`name` is `2b` or `4b`: the official `config.json` shipped with this package."""
    return JetNemotronConfig(**json.loads(asset_path(f"jet-nemotron-{name}.config.json").read_text()))


def preset_config(preset: str, **overrides) -> JetNemotronConfig:
    if preset in ("2b", "4b"):
        return JetNemotronConfig(**{**official_config(preset).to_dict(), **overrides})
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; expected one of {sorted(PRESETS) + ['2b', '4b']}")
    return JetNemotronConfig(**{**PRESETS[preset], **overrides})


def copy_tokenizer(out_dir: Path) -> None:
    for src in asset_path("qwen2.5-tokenizer").iterdir():
        shutil.copyfile(src, out_dir / src.name)


def write_random_checkpoint(
    out_dir: str | os.PathLike,
    config: JetNemotronConfig,
    seed: int = 0,
    dtype: torch.dtype = torch.bfloat16,
) -> Path:
    """Initialise `JetNemotronForCausalLM(config)` from `seed` and save it to `out_dir`
    (which must not exist yet) with the tokenizer. Returns the folder."""
    from .modeling import JetNemotronForCausalLM

    out_dir = Path(out_dir)
    if out_dir.exists():
        raise FileExistsError(f"{out_dir} already exists; choose a new folder")
    torch.manual_seed(seed)
    config.dtype = dtype
    model = JetNemotronForCausalLM(config).to(dtype)
    with folder_written_atomically(out_dir) as tmp:
        model.save_pretrained(tmp)
        copy_tokenizer(tmp)
    return out_dir


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--preset", default="tiny", choices=sorted(PRESETS) + ["2b", "4b"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    args = parser.parse_args(argv)
    path = write_random_checkpoint(args.out_dir, preset_config(args.preset), args.seed, getattr(torch, args.dtype))
    print(f"wrote a random {args.preset} Jet-Nemotron checkpoint to {path}")


if __name__ == "__main__":
    main()
