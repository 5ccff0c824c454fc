"""Decode throughput of Jet-Nemotron vs its full-attention twin, side by side in vLLM.

    .venv/bin/python bench/decode_throughput.py            # what `make bench` runs
    .venv/bin/python bench/decode_throughput.py --help     # sizes, lengths, batch, budget

Two models with dummy (random) weights, both in bfloat16, both served by vLLM:

* **jet**: the official Jet-Nemotron-2B layer pattern (28 layers; `attn` at 14 and 19,
  `swa` at 20 and 21 with a 1152-token window, JetBlocks elsewhere) with the official
  JetBlock dims (12 heads, K = 96, V = 256, conv 4), served by this plugin;
* **twin**: the same hidden/MLP/depth with full attention in every layer, served by
  vLLM's own `Qwen2ForCausalLM`.

`--scale S` divides the hidden size, the MLP size and the attention heads by S (attention
head_dim stays 128, or 64 where 128 does not divide; the JetBlock dims never change) so the
run fits a small machine; the scale is printed and recorded.

For each prompt length, a fixed batch of random-token prompts is prefilled and then
decoded greedily (`ignore_eos`). Decode throughput = tokens generated after the step in
which the last sequence of the batch received its first token / time of those steps,
from vLLM's engine-core step timestamps: only pure-decode steps with the whole batch
running are counted, no prefill.

Capacity: both engines get the same KV/state budget (`kv_cache_memory_bytes`). For
each prompt+decode length, the largest batch that fits is vLLM's own number
(`get_max_concurrency_for_kv_cache_config` on the engine's KV cache config, evaluated
at that length inside the worker), cross-checked against the bytes one sequence needs.

Writes bench/results/decode_throughput.json and bench/results/decode_throughput.png.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

# Plain-data results of a worker-side function come back through vLLM's RPC; sending the
# function itself needs vLLM's pickle fallback (local processes of this run only).
os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")
os.environ.setdefault("VLLM_LOG_STATS_INTERVAL", "60")

RESULTS_DIR = Path(__file__).resolve().parent / "results"
FULL_HIDDEN, FULL_INTERMEDIATE, FULL_HEADS, FULL_KV_HEADS = 1536, 8960, 12, 2
VOCAB = 151936


# ----- model folders -----------------------------------------------------------------


def shrunk_dims(scale: int) -> dict:
    """Hidden, MLP and attention heads of the 2B divided by `scale`, keeping the 6:1
    query:KV head ratio and an attention head_dim vLLM's CPU backend supports."""
    hidden = FULL_HIDDEN // scale
    if hidden * scale != FULL_HIDDEN or FULL_INTERMEDIATE % scale:
        raise ValueError(f"--scale {scale} does not divide hidden 1536 and MLP 8960")
    for head_dim in (128, 64):
        heads = hidden // head_dim
        kv_heads = heads * FULL_KV_HEADS // FULL_HEADS
        if heads * head_dim == hidden and kv_heads >= 1 and kv_heads * FULL_HEADS == heads * FULL_KV_HEADS:
            return dict(hidden_size=hidden, intermediate_size=FULL_INTERMEDIATE // scale,
                        num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=head_dim)
    raise ValueError(f"--scale {scale}: no attention head_dim in (128, 64) keeps the 12:2 head ratio "
                     f"at hidden {hidden}; use 1, 2 or 4")


def write_model_folders(root: Path, scale: int, max_len: int):
    from vllm_jetnemotron.config import JetNemotronConfig
    from vllm_jetnemotron.converter.random_checkpoint import copy_tokenizer, official_config

    dims = shrunk_dims(scale)
    arch = {k: dims[k] for k in ("hidden_size", "intermediate_size", "num_attention_heads",
                                  "num_key_value_heads")}
    official = official_config("2b")
    jet_cfg = JetNemotronConfig(**{**official.to_dict(), **arch})
    assert jet_cfg.head_dim == dims["head_dim"]
    jet_dir = root / "jet"
    jet_dir.mkdir(parents=True)
    jet_cfg.save_pretrained(jet_dir)
    copy_tokenizer(jet_dir)

    twin_cfg = {
        "architectures": ["Qwen2ForCausalLM"],
        "model_type": "qwen2",
        **arch,
        "num_hidden_layers": jet_cfg.num_hidden_layers,
        "vocab_size": VOCAB,
        "hidden_act": "silu",
        "rms_norm_eps": jet_cfg.rms_norm_eps,
        "rope_theta": jet_cfg.rope_parameters["rope_theta"],
        "tie_word_embeddings": True,
        "max_position_embeddings": max(32768, max_len),
        "use_sliding_window": False,
        "sliding_window": None,
        "max_window_layers": jet_cfg.num_hidden_layers,
        "attention_dropout": 0.0,
        "bos_token_id": 151643,
        "eos_token_id": 151643,
        "torch_dtype": "bfloat16",
    }
    twin_dir = root / "twin"
    twin_dir.mkdir(parents=True)
    (twin_dir / "config.json").write_text(json.dumps(twin_cfg, indent=2))
    copy_tokenizer(twin_dir)
    return jet_dir, twin_dir, jet_cfg, twin_cfg, dims


def analytic_bytes_per_sequence(kind: str, jet_cfg, twin_cfg, num_tokens: int,
                                state_bytes: int = 2) -> int:
    """Exact cache bytes one sequence of `num_tokens` needs (no block rounding)."""
    if kind == "jet":
        return jet_cfg.state_bytes_per_sequence(num_tokens, kv_bytes=2, state_bytes=state_bytes)
    head_dim = twin_cfg["hidden_size"] // twin_cfg["num_attention_heads"]
    per_token = 2 * twin_cfg["num_key_value_heads"] * head_dim * 2
    return twin_cfg["num_hidden_layers"] * num_tokens * per_token


# ----- what the worker reports about its KV/state cache ----------------------------------


def _capacity_in_worker(worker, lengths):
    """Runs inside the vLLM worker: the engine's KV cache layout and vLLM's maximum
    concurrency at each sequence length, as plain data."""
    import copy as _copy

    from vllm.v1.core.kv_cache_utils import get_max_concurrency_for_kv_cache_config

    kcfg = worker.model_runner.kv_cache_config
    vcfg = worker.vllm_config
    groups = []
    for g in kcfg.kv_cache_groups:
        spec = g.kv_cache_spec
        info = {"spec": type(spec).__name__, "num_layers": len(g.layer_names),
                "block_size": int(spec.block_size), "page_size_bytes": int(spec.page_size_bytes)}
        if hasattr(spec, "dtypes"):
            info["state_dtypes"] = [str(d) for d in spec.dtypes]
            info["state_shapes"] = [list(s) for s in spec.shapes]
            info["real_page_size_bytes"] = int(spec.real_page_size_bytes)
        if hasattr(spec, "sliding_window") and getattr(spec, "sliding_window", None):
            info["sliding_window"] = int(spec.sliding_window)
        groups.append(info)
    result = {
        "num_blocks": int(kcfg.num_blocks),
        # tensors of different cache groups alias one allocation: take its extent
        "allocated_bytes": int(max(t.offset + t.size for t in kcfg.kv_cache_tensors)),
        "mamba_cache_mode": str(vcfg.cache_config.mamba_cache_mode),
        "groups": groups,
        "max_concurrency": {},
        "blocks_per_request": {},
    }
    for n in lengths:
        cfg = _copy.copy(vcfg)
        model_config = _copy.copy(vcfg.model_config)
        model_config.max_model_len = int(n)
        object.__setattr__(cfg, "model_config", model_config)
        result["max_concurrency"][str(n)] = float(get_max_concurrency_for_kv_cache_config(cfg, kcfg))
        result["blocks_per_request"][str(n)] = [
            int(-(-g.kv_cache_spec.max_memory_usage_bytes(cfg) // g.kv_cache_spec.page_size_bytes))
            for g in kcfg.kv_cache_groups]
    return result


# ----- measurement -----------------------------------------------------------------------


def random_prompts(batch: int, length: int, seed: int) -> list[list[int]]:
    import torch

    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 151000, (length,), generator=g).tolist() for _ in range(batch)]


def run_batch(engine, prompts: list[list[int]], max_tokens: int, tag: str) -> dict:
    """Submit `prompts` together, step the engine to the end, and time the pure-decode
    phase from engine-core step timestamps (client clock as a cross-check)."""
    from vllm import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    ids = [f"{tag}-{i}" for i in range(len(prompts))]
    load_before = os.getloadavg()[0]
    t_submit = time.monotonic()
    for rid, p in zip(ids, prompts):
        engine.add_request(rid, {"prompt_token_ids": p}, params)
    counts = dict.fromkeys(ids, 0)
    steps = []  # (engine ts, client ts, tokens so far, sequences with >= 1 token)
    preemptions = 0
    while engine.has_unfinished_requests():
        outs = engine.step()
        now = time.monotonic()
        if not outs:
            continue
        ts = [o.metrics.last_token_ts for o in outs if o.metrics is not None and o.metrics.last_token_ts]
        for o in outs:
            counts[o.request_id] = len(o.outputs[0].token_ids)
            if o.finished and o.metrics is not None:
                preemptions += o.metrics.num_preemptions
        steps.append((max(ts) if ts else now, now, sum(counts.values()),
                      sum(1 for c in counts.values() if c > 0)))
    assert all(c == max_tokens for c in counts.values()), counts
    k = next(i for i, s in enumerate(steps) if s[3] == len(prompts))
    decode = steps[k:]
    n_steps = len(decode) - 1
    tokens = decode[-1][2] - decode[0][2]
    engine_time = decode[-1][0] - decode[0][0]
    client_time = decode[-1][1] - decode[0][1]
    if n_steps < 1 or engine_time <= 0:
        raise ValueError("no pure-decode step to time: use --decode-tokens >= 2")
    step_times = sorted(b[0] - a[0] for a, b in zip(decode, decode[1:]))
    median_step = step_times[len(step_times) // 2]
    return {
        "batch": len(prompts),
        "prompt_len": len(prompts[0]),
        "max_tokens": max_tokens,
        "decode_steps": n_steps,
        "decode_tokens": tokens,
        "decode_time_s": engine_time,
        "decode_tokens_per_s": tokens / engine_time,
        "decode_tokens_per_s_client_clock": tokens / client_time,
        "decode_tokens_per_s_median_step": len(prompts) / median_step,
        "decode_step_ms_median": 1e3 * median_step,
        "prefill_time_s": steps[k][1] - t_submit,
        "prefill_tokens_per_s": len(prompts) * len(prompts[0]) / (steps[k][1] - t_submit),
        "preemptions": preemptions,
        "loadavg_before": load_before,
        "loadavg_after": os.getloadavg()[0],
    }


def bench_model(kind: str, path: Path, args, max_len: int, capacity_lengths: list[int]) -> dict:
    from vllm import LLM

    print(f"\n=== {kind}: starting vLLM ({path}) ===", flush=True)
    t0 = time.monotonic()
    llm = LLM(model=str(path), dtype="bfloat16", load_format="dummy",
              kv_cache_memory_bytes=args.kv_bytes, max_model_len=max_len,
              max_num_seqs=max(args.batch, 8), enforce_eager=True,
              disable_log_stats=False, seed=0)
    result = {"engine_start_s": time.monotonic() - t0, "runs": []}
    try:
        engine = llm.llm_engine
        cc = engine.vllm_config.cache_config
        result["cache_config"] = {
            "num_gpu_blocks": cc.num_gpu_blocks, "block_size": cc.block_size,
            "enable_prefix_caching": cc.enable_prefix_caching,
            "mamba_cache_mode": str(cc.mamba_cache_mode),
            "kv_cache_memory_bytes": args.kv_bytes,
            "max_model_len": max_len,
            "logged_max_concurrency_at_max_model_len": getattr(cc, "kv_cache_max_concurrency", None),
        }
        result["max_num_batched_tokens"] = engine.vllm_config.scheduler_config.max_num_batched_tokens
        try:
            result["capacity"] = llm.collective_rpc(
                _capacity_in_worker, args=(capacity_lengths,), timeout=120)[0]
        except Exception as e:  # noqa: BLE001 - capacity then comes from bytes only
            print(f"[{kind}] could not read the worker's KV cache config: {e!r}", flush=True)
            result["capacity"] = None

        print(f"[{kind}] warm-up", flush=True)
        run_batch(engine, random_prompts(args.batch, 64, seed=999), 4, f"{kind}-warmup")
        for length in args.lengths:
            for rep in range(args.repeats):
                prompts = random_prompts(args.batch, length, seed=1000 * length + rep)
                r = run_batch(engine, prompts, args.decode_tokens, f"{kind}-{length}-{rep}")
                r["repeat"] = rep
                result["runs"].append(r)
                print(f"[{kind}] L={length:5d} rep {rep}: decode {r['decode_tokens_per_s']:8.2f} tok/s "
                      f"({r['decode_steps']} steps, median step {r['decode_step_ms_median']:.1f} ms, "
                      f"client clock {r['decode_tokens_per_s_client_clock']:.2f}), "
                      f"prefill {r['prefill_tokens_per_s']:.1f} tok/s in {r['prefill_time_s']:.1f} s, "
                      f"load {r['loadavg_after']:.2f}", flush=True)
    finally:
        llm.llm_engine.engine_core.shutdown()
        del llm
    return result


# ----- report ------------------------------------------------------------------------------


def summarize(models: dict, args, jet_cfg, twin_cfg) -> dict:
    per_length = []
    for length in args.lengths:
        row = {"prompt_len": length, "seq_len": length + args.decode_tokens}
        for kind in ("jet", "twin"):
            runs = [r for r in models[kind]["runs"] if r["prompt_len"] == length]
            tps = sorted(r["decode_tokens_per_s"] for r in runs)
            row[f"{kind}_decode_tps"] = tps[len(tps) // 2] if len(tps) % 2 else sum(tps[len(tps) // 2 - 1:len(tps) // 2 + 1]) / 2
            row[f"{kind}_decode_tps_all"] = tps
            med = sorted(r["decode_tokens_per_s_median_step"] for r in runs)
            row[f"{kind}_decode_tps_median_step"] = med[len(med) // 2]
            row[f"{kind}_prefill_tps"] = sorted(r["prefill_tokens_per_s"] for r in runs)[len(runs) // 2]
        row["decode_ratio"] = row["jet_decode_tps"] / row["twin_decode_tps"]
        row["decode_ratio_median_step"] = row["jet_decode_tps_median_step"] / row["twin_decode_tps_median_step"]
        row["prefill_ratio"] = row["jet_prefill_tps"] / row["twin_prefill_tps"]

        n = row["seq_len"]
        for kind in ("jet", "twin"):
            cap = models[kind].get("capacity")
            state_bytes = 2
            if cap is not None:
                row[f"{kind}_max_batch_vllm"] = math.floor(cap["max_concurrency"][str(n)] + 1e-9)
                row[f"{kind}_max_concurrency_vllm"] = cap["max_concurrency"][str(n)]
                for g in cap["groups"]:
                    if "state_dtypes" in g:
                        state_bytes = 4 if "float32" in g["state_dtypes"][-1] else 2
            else:
                row[f"{kind}_max_batch_vllm"] = None
            per_seq = analytic_bytes_per_sequence(kind, jet_cfg, twin_cfg, n, state_bytes)
            row[f"{kind}_bytes_per_seq"] = per_seq
            row[f"{kind}_max_batch_bytes"] = args.kv_bytes // per_seq
        vj, vt = row["jet_max_batch_vllm"], row["twin_max_batch_vllm"]
        row["max_batch_ratio_vllm"] = vj / vt if vj and vt else None
        row["max_batch_ratio_bytes"] = row["jet_max_batch_bytes"] / max(row["twin_max_batch_bytes"], 1)
        per_length.append(row)

    checks = {}
    for kind in ("jet", "twin"):
        cap, cc = models[kind].get("capacity"), models[kind]["cache_config"]
        checks[kind] = {
            "logged_max_concurrency_at_max_model_len": cc["logged_max_concurrency_at_max_model_len"],
            "worker_max_concurrency_at_max_model_len":
                cap["max_concurrency"].get(str(cc["max_model_len"])) if cap else None,
            "num_blocks_engine": cc["num_gpu_blocks"],
            "num_blocks_worker": cap["num_blocks"] if cap else None,
            "block_size": cc["block_size"],
            "mamba_cache_mode": cc["mamba_cache_mode"],
        }

    # The same capacity by bytes at the unshrunk 2B width (no engine needed).
    from vllm_jetnemotron.converter.random_checkpoint import official_config

    full_jet = official_config("2b")
    dims = shrunk_dims(1)
    full_twin = {**twin_cfg, **{k: dims[k] for k in ("hidden_size", "intermediate_size",
                                                      "num_attention_heads", "num_key_value_heads")}}
    state_bytes = 4 if any("float32" in g.get("state_dtypes", [""])[-1]
                           for g in (models["jet"].get("capacity") or {}).get("groups", [])) else 2
    full_width = []
    for length in args.lengths:
        n = length + args.decode_tokens
        j = analytic_bytes_per_sequence("jet", full_jet, full_twin, n, state_bytes)
        t = analytic_bytes_per_sequence("twin", full_jet, full_twin, n, state_bytes)
        full_width.append({"seq_len": n, "jet_bytes_per_seq": j, "twin_bytes_per_seq": t,
                           "jet_max_batch_bytes": args.kv_bytes // j, "twin_max_batch_bytes": args.kv_bytes // t,
                           "max_batch_ratio_bytes": (args.kv_bytes // j) / max(args.kv_bytes // t, 1)})
    return {"per_length": per_length, "capacity_checks": checks,
            "full_width_capacity_bytes": full_width, "jet_state_bytes_per_element": state_bytes}


def print_table(summary: dict, args, dims: dict) -> str:
    lines = []
    add = lines.append
    scale_note = ("full 2B width" if args.scale == 1 else
                  f"width shrunk {args.scale}x: hidden {FULL_HIDDEN} -> {dims['hidden_size']}, MLP "
                  f"{FULL_INTERMEDIATE} -> {dims['intermediate_size']}, attention heads "
                  f"{FULL_HEADS}/{FULL_KV_HEADS} -> {dims['num_attention_heads']}/{dims['num_key_value_heads']} "
                  f"(head_dim {dims['head_dim']}); JetBlock dims unchanged")
    add(f"Jet-Nemotron-2B layout vs full-attention twin, vLLM {args.vllm_version}, bf16, dummy weights, "
        f"batch {args.batch}, {args.decode_tokens} generated tokens per sequence")
    add(f"Model size: {scale_note}")
    add("")
    add("Decode throughput (generated tokens/s over pure-decode steps, whole batch):")
    hdr = f"{'prompt':>7} | {'jet tok/s':>10} | {'twin tok/s':>10} | {'jet/twin':>8} | {'(median-step ratio)':>19} | {'prefill jet/twin':>16}"
    add(hdr)
    add("-" * len(hdr))
    for r in summary["per_length"]:
        add(f"{r['prompt_len']:>7} | {r['jet_decode_tps']:>10.2f} | {r['twin_decode_tps']:>10.2f} | "
            f"{r['decode_ratio']:>7.2f}x | {r['decode_ratio_median_step']:>18.2f}x | {r['prefill_ratio']:>15.2f}x")
    add("")
    add(f"Largest batch in the same KV/state budget ({args.kv_bytes / 2**30:.2f} GiB), per sequence length "
        "(prompt + generated):")
    hdr = (f"{'seq len':>7} | {'jet (vLLM)':>10} | {'twin (vLLM)':>11} | {'jet/twin':>8} | "
           f"{'jet (bytes)':>11} | {'twin (bytes)':>12} | {'jet/twin':>8} | {'jet MiB/seq':>11} | {'twin MiB/seq':>12}")
    add(hdr)
    add("-" * len(hdr))
    for r in summary["per_length"]:
        ratio_v = f"{r['max_batch_ratio_vllm']:>7.2f}x" if r["max_batch_ratio_vllm"] else f"{'n/a':>8}"
        add(f"{r['seq_len']:>7} | {str(r['jet_max_batch_vllm']):>10} | {str(r['twin_max_batch_vllm']):>11} | "
            f"{ratio_v} | {r['jet_max_batch_bytes']:>11} | {r['twin_max_batch_bytes']:>12} | "
            f"{r['max_batch_ratio_bytes']:>7.2f}x | {r['jet_bytes_per_seq'] / 2**20:>11.2f} | "
            f"{r['twin_bytes_per_seq'] / 2**20:>12.2f}")
    add("(vLLM: the engine's own block accounting; bytes: budget / exact cache bytes of one sequence)")
    for kind, c in summary["capacity_checks"].items():
        logged, worker = c["logged_max_concurrency_at_max_model_len"], c["worker_max_concurrency_at_max_model_len"]
        add(f"check {kind}: vLLM log 'Maximum concurrency' at max_model_len = "
            f"{logged if logged is None else f'{logged:.2f}'}x, worker-side recomputation = "
            f"{worker if worker is None else f'{worker:.2f}'}x; {c['num_blocks_engine']} blocks of "
            f"{c['block_size']} tokens, mamba_cache_mode={c['mamba_cache_mode']}")
    if args.scale != 1:
        add("")
        add("Same budget at the unshrunk 2B width (bytes only, "
            f"JetBlock state {summary['jet_state_bytes_per_element']} bytes/element as vLLM allocates it):")
        for r in summary["full_width_capacity_bytes"]:
            add(f"  seq len {r['seq_len']:>6}: jet {r['jet_max_batch_bytes']:>4} "
                f"({r['jet_bytes_per_seq'] / 2**20:.1f} MiB/seq), twin {r['twin_max_batch_bytes']:>4} "
                f"({r['twin_bytes_per_seq'] / 2**20:.1f} MiB/seq), jet/twin {r['max_batch_ratio_bytes']:.2f}x")
    text = "\n".join(lines)
    print("\n" + text, flush=True)
    return text


def plot(summary: dict, args, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = summary["per_length"]
    L = [r["prompt_len"] for r in rows]
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.8))
    ax = axes[0]
    ax.plot(L, [r["jet_decode_tps"] for r in rows], "o-", label="Jet-Nemotron (plugin)")
    ax.plot(L, [r["twin_decode_tps"] for r in rows], "s-", label="full-attention twin (Qwen2)")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("prompt length (tokens)")
    ax.set_ylabel(f"decode tokens/s (batch {args.batch})")
    ax.set_title("Decode throughput")
    ax.legend()
    ax.grid(alpha=0.3)
    ax = axes[1]
    ax.plot(L, [r["decode_ratio"] for r in rows], "o-", color="C2", label="measured")
    ax.axhline(1.0, color="gray", lw=0.8)
    ax.set_ylim(0, max(2.3, 1.15 * max(r["decode_ratio"] for r in rows)))
    ax.axhline(2.0, color="C3", ls="--", lw=1, label="project goal (2x at 8K)")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("prompt length (tokens)")
    ax.set_ylabel("Jet / twin decode throughput")
    ax.set_title("Decode speed-up")
    ax.legend()
    ax.grid(alpha=0.3)
    ax = axes[2]
    S = [r["seq_len"] for r in rows]
    key = "max_batch_vllm" if rows[0]["jet_max_batch_vllm"] is not None else "max_batch_bytes"
    ax.plot(S, [r[f"jet_{key}"] for r in rows], "o-", color="C0", label="Jet-Nemotron (vLLM blocks)")
    ax.plot(S, [r[f"twin_{key}"] for r in rows], "s-", color="C1", label="twin (vLLM blocks)")
    ax.plot(S, [r["jet_max_batch_bytes"] for r in rows], "o:", color="C0", alpha=0.6, label="Jet-Nemotron (exact bytes)")
    ax.plot(S, [r["twin_max_batch_bytes"] for r in rows], "s:", color="C1", alpha=0.6, label="twin (exact bytes)")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("sequence length (prompt + generated)")
    ax.set_ylabel("max concurrent sequences")
    ax.set_title(f"Batch that fits {args.kv_bytes / 2**30:.2f} GiB of KV/state")
    ax.legend()
    ax.grid(alpha=0.3, which="both")
    for ax, xs in zip(axes, (L, L, S)):
        ax.set_xticks(xs)
        ax.set_xticklabels([str(x) for x in xs])
        ax.minorticks_off() if ax is not axes[2] else None
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scale", type=int, default=2, choices=[1, 2, 4],
                        help="divide hidden/MLP/attention heads of the 2B by this (default 2: fits "
                             "~15 min on 2 CPU cores; 1 = full 2B width)")
    parser.add_argument("--lengths", type=int, nargs="+", default=[512, 2048, 8192])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--decode-tokens", type=int, default=32,
                        help="tokens generated per sequence (the first comes from prefill)")
    parser.add_argument("--repeats", type=int, default=1, help="batches per length (median reported)")
    parser.add_argument("--kv-bytes", type=int, default=2 << 30,
                        help="KV/state budget of each engine in bytes (default 2 GiB)")
    parser.add_argument("--models", nargs="+", default=["jet", "twin"], choices=["jet", "twin"])
    parser.add_argument("--out", type=Path, default=RESULTS_DIR)
    args = parser.parse_args(argv)
    if set(args.models) != {"jet", "twin"}:
        parser.error("the comparison needs both models")

    import torch
    import vllm

    args.vllm_version = vllm.__version__
    wall0 = time.monotonic()
    max_len = max(args.lengths) + args.decode_tokens
    seq_lens = [n + args.decode_tokens for n in args.lengths]
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="jet-bench-") as tmp:
        jet_dir, twin_dir, jet_cfg, twin_cfg, dims = write_model_folders(Path(tmp), args.scale, max_len)
        if args.scale != 1:
            print(f"NOTE: model width shrunk {args.scale}x (hidden {FULL_HIDDEN} -> {dims['hidden_size']}, "
                  f"MLP {FULL_INTERMEDIATE} -> {dims['intermediate_size']}, heads {FULL_HEADS}/{FULL_KV_HEADS} -> "
                  f"{dims['num_attention_heads']}/{dims['num_key_value_heads']}); layer pattern and "
                  f"JetBlock dims are the official 2B ones", flush=True)
        models = {}
        for kind, path in (("jet", jet_dir), ("twin", twin_dir)):
            models[kind] = bench_model(kind, path, args, max_len, seq_lens)
        jet_dict = jet_cfg.to_dict()

    summary = summarize(models, args, jet_cfg, twin_cfg)
    title = (f"Jet-Nemotron-2B layout vs full-attention twin, vLLM {args.vllm_version}, bf16, "
             f"{'full width' if args.scale == 1 else f'width / {args.scale}'}, batch {args.batch}, "
             f"{platform.processor() or platform.machine()} x{os.cpu_count()}")
    table = print_table(summary, args, dims)
    wall = time.monotonic() - wall0
    out = {
        "benchmark": "decode_throughput",
        "goal": "Jet/twin decode throughput ratio > 2x at 8192 tokens, growing with length",
        "settings": {
            "scale": args.scale, "shrink_factor_hidden": args.scale, "dims": dims,
            "lengths": args.lengths, "batch": args.batch, "decode_tokens": args.decode_tokens,
            "repeats": args.repeats, "kv_cache_memory_bytes": args.kv_bytes, "max_model_len": max_len,
            "dtype": "bfloat16", "load_format": "dummy", "enforce_eager": True,
        },
        "environment": {
            "vllm": args.vllm_version, "torch": torch.__version__, "python": sys.version.split()[0],
            "cpu_count": os.cpu_count(), "machine": platform.machine(), "processor": platform.processor(),
            "device": "cuda" if torch.cuda.is_available() else "cpu",
        },
        "models": {
            "jet": {"config": jet_dict, **models["jet"]},
            "twin": {"config": twin_cfg, **models["twin"]},
        },
        "summary": summary,
        "table": table,
        "wall_time_s": wall,
    }
    (args.out / "decode_throughput.json").write_text(json.dumps(out, indent=2, default=str))
    plot(summary, args, args.out / "decode_throughput.png", title)
    print(f"\nwrote {args.out / 'decode_throughput.json'} and {args.out / 'decode_throughput.png'} "
          f"(wall time {wall / 60:.1f} min)", flush=True)


if __name__ == "__main__":
    main()
