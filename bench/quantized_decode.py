"""Decode throughput of the Jet-Nemotron bench model in bf16 and quantized as
`jet-nemotron-convert quantize` writes it (compressed-tensors w8a8 and w4a16), side by side
in vLLM: same dims, dummy weights, same prompt, batch and KV/state budget.

    .venv/bin/python bench/quantized_decode.py                      # 8K, batch 8
    .venv/bin/python bench/quantized_decode.py --lengths 8192 32768 --layout 2b --scale 2

The quantized models are the bf16 config plus the `quantization_config` the converter
writes for each scheme; vLLM's dummy loader fills their parameters, so only speed is
measured (quality: tests/test_quantized_vllm.py). Each engine runs in its own process, as in
bench/decode_throughput.py, whose measurement (one shared prompt from the prefix cache, a
batch decoded greedily, engine-core step timestamps) this reuses.

Writes bench/results/quantized_decode.json.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import tempfile
import time
from pathlib import Path

import decode_profile
import decode_throughput as dt
from decode_engine import LAYOUTS, context_label, environment, in_child, layout_named, write_models

SCHEMES = ("bf16", "w8a8", "w4a16")


QUANTIZED_WEIGHT = re.compile(r"\.((q|k|v|g|o|gate|up|down)_proj|kernel_generator\.w[12])\.weight$")


def linear_weight_bytes(config, scheme: str) -> int:
    """Bytes of the weights `scheme` quantizes (every decoder linear but the JetBlock gates),
    float32 scales included."""
    from vllm_jetnemotron.config import checkpoint_tensor_shapes

    total = 0
    for name, shape in checkpoint_tensor_shapes(config).items():
        if not QUANTIZED_WEIGHT.search(name):
            continue
        out_features, in_features = shape
        if scheme == "bf16":
            total += 2 * out_features * in_features
        elif scheme == "w8a8":
            total += out_features * in_features + 4 * out_features
        else:
            total += out_features * in_features // 2 + 4 * out_features * (in_features // 128)
    return total


def write_quantized_config(bf16_dir: Path, scheme: str) -> Path:
    from vllm_jetnemotron.converter.quantize import quantization_config

    folder = bf16_dir.parent / f"jet-{scheme}"
    shutil.copytree(bf16_dir, folder)
    qc = quantization_config(scheme)
    qc.format = {"w8a8": "int-quantized", "w4a16": "pack-quantized"}[scheme]
    qc.quantization_status = "compressed"
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"] = qc.model_dump(mode="json")
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    return folder


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layout", default="bench", choices=list(LAYOUTS))
    parser.add_argument("--scale", type=int, default=2, choices=[1, 2, 4])
    parser.add_argument("--lengths", type=int, nargs="+", default=[8192])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--eager", action="store_true", help="eager mode instead of vLLM's torch.compile")
    parser.add_argument("--schemes", nargs="+", default=list(SCHEMES), choices=SCHEMES)
    parser.add_argument("--profile", action="store_true",
                        help="instead: per-op time of one decode step per scheme (bench/decode_profile.py)")
    parser.add_argument("--out", type=Path, default=dt.RESULTS_DIR)
    own, rest = parser.parse_known_args(argv)
    args = dt.parse_args(["--layout", own.layout, "--scale", str(own.scale), "--batch", str(own.batch),
                          "--lengths", *map(str, own.lengths), "--models", "jet",
                          *(["--eager"] if own.eager else []), *(["--profile"] if own.profile else []),
                          *rest])
    args.vllm_version = environment()["vllm"]
    max_len = max(args.lengths) + args.suffix_tokens + dt.max_tokens_for(args)
    if args.profile:
        max_len = max(args.lengths) + args.suffix_tokens + 2 * args.profile_steps + 16
    seq_lens = [n + args.suffix_tokens + dt.max_tokens_for(args) for n in args.lengths]
    layout = layout_named(args.layout, args.scale)
    wall0 = time.monotonic()
    results = {}
    with tempfile.TemporaryDirectory(prefix="jet-quant-bench-") as tmp:
        dirs, cfgs = write_models(Path(tmp), layout, max_len, None)
        for scheme in own.schemes:
            folder = dirs["jet"] if scheme == "bf16" else write_quantized_config(dirs["jet"], scheme)
            if args.profile:
                r = in_child(decode_profile._profile_job, "jet", str(folder), args, max_len,
                             out=Path(tmp) / f"{scheme}.json")
                print(f"\n=== {scheme} ===\n" + "\n".join(r["texts"]) if r else f"{scheme}: the engine died")
                continue
            r = in_child(dt._model_job, "jet", str(folder), args, max_len, seq_lens,
                         out=Path(tmp) / f"{scheme}.json")
            results[scheme] = r if r is not None else {"error": "the engine process died (see the log above)"}
    if args.profile:
        return
    rows = []
    for length in args.lengths:
        row = {"prompt_len": length}
        for scheme in own.schemes:
            decode = results[scheme].get("lengths", {}).get(str(length), {}).get("decode")
            row[f"{scheme}_decode_tps"] = decode["decode_tokens_per_s"] if decode else None
            row[f"{scheme}_linear_weight_bytes"] = linear_weight_bytes(cfgs["jet"], scheme)
        base = row.get("bf16_decode_tps")
        for scheme in own.schemes:
            tps = row[f"{scheme}_decode_tps"]
            row[f"{scheme}_over_bf16_decode"] = tps / base if tps and base else None
        rows.append(row)
    out = {"benchmark": "quantized_decode",
           "goal": "decode at batch 8, 8K: w8a8 >= 1.6x and w4a16 >= 2.5x bf16",
           "settings": {"layout": layout["name"], "lengths": args.lengths, "batch": args.batch,
                        "compile": not args.eager, "kv_cache_memory_bytes": args.kv_bytes,
                        "load_format": "dummy", "schemes": own.schemes},
           "environment": environment(), "table": rows, "models": results,
           "wall_time_s": time.monotonic() - wall0}
    own.out.mkdir(parents=True, exist_ok=True)
    path = own.out / "quantized_decode.json"
    path.write_text(json.dumps(out, indent=2, default=str))
    print(f"\n| context | {' | '.join(f'{s} tok/s (x bf16)' for s in own.schemes)} | linear weights MB "
          f"({' / '.join(own.schemes)}) |")
    print("|---|" + "---:|" * (len(own.schemes) + 1))
    for row in rows:
        cells = [f"{dt._fmt(row[f'{s}_decode_tps'])} ({dt._fmt(row[f'{s}_over_bf16_decode'], '.2f')}x)"
                 for s in own.schemes]
        sizes = " / ".join(f"{row[f'{s}_linear_weight_bytes'] / 2**20:.0f}" for s in own.schemes)
        print(f"| {context_label(row['prompt_len'])} | {' | '.join(cells)} | {sizes} |")
    print(f"wrote {path} (wall time {(time.monotonic() - wall0) / 60:.1f} min)")


if __name__ == "__main__":
    main()
