"""Decode throughput of Jet-Nemotron, its full-attention twin and vLLM's own GDN hybrid, side by
side in vLLM (same dims, bf16, dummy weights, same KV/state budget).

    .venv/bin/python bench/decode_throughput.py                  # what `make bench` runs
    .venv/bin/python bench/decode_throughput.py --profile        # per-op time of one decode step
    .venv/bin/python bench/decode_throughput.py --help

Three models, one engine after the other, each compiled by vLLM's torch.compile as `vllm serve`
runs it by default on CPU (`--eager`: `enforce_eager` instead):

* **jet**: Jet-Nemotron (JetBlocks + a few `attn` / `swa` layers), served by this plugin;
* **twin**: the same hidden/MLP/depth with full attention in every layer (vLLM's
  `Qwen2ForCausalLM`);
* **hybrid**: vLLM's own gated-delta-net hybrid `Qwen3NextForCausalLM` with the same full
  attention layers, GDN layers (K = V = 128) in place of the JetBlocks and SWA layers, dense
  MLPs (vLLM insists on one MoE layer: in the last one the dense MLP is the shared expert, beside
  a single 128-wide routed expert) and as many GDN heads as give the same recurrent state
  bytes as a JetBlock (`--gdn-heads` to change).

`--layout bench` (default): hidden 1024, 12 layers (Jet: 9 JetBlocks with 8 heads, K = 96,
V = 256, conv 4, `attn` at 6 and 8, `swa` at 9). `--layout 2b --scale S`: the official
Jet-Nemotron-2B layer pattern (28 layers) with its width divided by S. `--layout smollm2`:
SmolLM2-135M-Instruct's configuration and the layout recipes/smollm2.yaml converts it to
(the capacity bench's pair, bench/capacity_throughput.py).

Per prompt length: one shared random prompt is prefilled alone (prefill tokens/s; each length's
prompt extends the previous length's, so only the new tokens are computed), then a batch of
requests, each that prompt plus a short distinct suffix, runs with prefix caching on (the prompt
comes from the cache; the hits are recorded) and is decoded greedily with `ignore_eos`. Decode
throughput = tokens generated over `--decode-steps` steps in which every sequence of the batch
decodes / time of those steps, from vLLM's engine-core step timestamps.

Each model runs in its own spawned process with vLLM's engine core in that process (one at a
time; all memory returned between models): with the multiprocess engine core the first request
after the shared prompt's prefill found none of its cached recurrent states.

Capacity: for each sequence length, the largest batch of distinct sequences each engine fits in
the same `--kv-bytes` (vLLM's `get_max_concurrency_for_kv_cache_config` evaluated in the worker),
cross-checked against the bytes one sequence needs.

Writes bench/results/decode_throughput.json and .png; `--profile` writes
bench/results/decode_profile.json instead (see bench/decode_profile.py).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
import traceback
from pathlib import Path

import decode_profile
from decode_engine import (LAYOUTS, capacity_in_worker, context_label, engine_info, environment, in_child,
                           in_process_engine_env, layout_named, mixer_summary, prefill_once, random_tokens,
                           shared_prefix_batch, shared_prompt, start_engine, state_bytes_of, stop_engine,
                           time_batch, write_models)

# Plain-data results of a worker-side function come back through vLLM's RPC; sending the
# function itself needs vLLM's pickle fallback (local processes of this run only).
os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")

RESULTS_DIR = Path(__file__).resolve().parent / "results"
MODELS = ("jet", "twin", "hybrid")
LABELS = {"jet": "Jet-Nemotron (this plugin)", "twin": "full-attention twin (Qwen2)",
          "hybrid": "GDN hybrid (vLLM Qwen3-Next)"}
DEFAULT_LENGTHS = [8192, 32768, 65536]
PROFILE_LENGTHS = [8192]


# ----- cache bytes of one sequence ------------------------------------------------------


def analytic_bytes_per_sequence(kind: str, cfgs: dict, num_tokens: int, state_bytes: int = 2) -> int:
    """Exact cache bytes one sequence of `num_tokens` needs (no block rounding, bf16 KV)."""
    jet = cfgs["jet"]
    kv_per_token_layer = 2 * jet.num_key_value_heads * jet.head_dim * 2
    if kind == "jet":
        return jet.state_bytes_per_sequence(num_tokens, kv_bytes=2, state_bytes=state_bytes)
    if kind == "twin":
        return cfgs["twin"]["num_hidden_layers"] * num_tokens * kv_per_token_layer
    hyb = cfgs["hybrid"]
    m = mixer_summary(cfgs)["gdn"]
    n_full = hyb["layer_types"].count("full_attention")
    n_gdn = hyb["layer_types"].count("linear_attention")
    return (n_full * num_tokens * kv_per_token_layer
            + n_gdn * (m["conv_state_elements"] * 2 + m["recurrent_state_elements"] * state_bytes))


# ----- measurement -----------------------------------------------------------------------


def max_tokens_for(args) -> int:
    """Tokens generated per request of a batch: the first (from prefill), `--decode-steps` timed
    decode steps, and slack for requests that start late. vLLM admits one new request per step
    when requests share a cached recurrent-state block (MambaManager: "Mamba can't rely on blocks
    generated by other requests in the current step"), so the hybrid models' batch starts over
    `batch` steps."""
    return 1 + args.decode_steps + args.batch + 4


def bench_model(kind: str, path: Path, args, max_len: int, capacity_lengths: list[int]) -> dict:
    result = {"lengths": {}}
    try:
        llm, start_s = start_engine(kind, path, args, max_len)
    except Exception as e:  # noqa: BLE001 - record and go on with the other models
        traceback.print_exc()
        return {"error": f"engine did not start: {e!r}", "lengths": {}}
    result["engine_start_s"] = start_s
    max_tokens = max_tokens_for(args)
    try:
        engine = llm.llm_engine
        result["cache_config"] = engine_info(llm, args, max_len)
        try:
            result["capacity"] = llm.collective_rpc(
                capacity_in_worker, args=(capacity_lengths,), timeout=120)[0]
        except Exception as e:  # noqa: BLE001 - capacity then comes from bytes only
            print(f"[{kind}] could not read the worker's KV cache config: {e!r}", flush=True)
            result["capacity"] = None

        print(f"[{kind}] warm-up", flush=True)
        time_batch(engine, [random_tokens(64, 999 + i) for i in range(args.batch)], 4 + args.batch, 2,
                  f"{kind}-warmup")
        for length in args.lengths:
            entry = result["lengths"][str(length)] = {}
            try:
                prefix = shared_prompt(length, args)
                p = prefill_once(engine, prefix, f"{kind}-{length}-prefix")
                entry["prefill"] = p
                print(f"[{kind}] L={length:6d}: prefill of the shared prompt {p['prefill_tokens_per_s']:8.1f} "
                      f"tok/s ({p['computed_tokens']} tokens computed, {p['num_cached_tokens']} from the prefix "
                      f"cache, {p['wall_s']:.1f} s)", flush=True)
                batch, attempt = args.batch, 0
                while batch >= 1:
                    prompts = shared_prefix_batch(prefix, batch, args.suffix_tokens,
                                                  seed=1000 * length + 100 * attempt + 7)
                    r = time_batch(engine, prompts, max_tokens, args.decode_steps, f"{kind}-{length}-b{batch}")
                    r["attempt"] = attempt
                    entry.setdefault("attempts", []).append(r)
                    hits = r["num_cached_tokens"]
                    if r["fits"]:
                        entry["decode"] = r
                        print(f"[{kind}] L={length:6d} batch {batch}: decode {r['decode_tokens_per_s']:8.2f} tok/s "
                              f"({r['decode_steps']} steps, median step {r['decode_step_ms_median']:.1f} ms, "
                              f"client clock {r['decode_tokens_per_s_client_clock']:.2f}); prefix-cache hits "
                              f"{min(hits)}..{max(hits)} of {len(prompts[0])} prompt tokens; whole batch "
                              f"running after {r['steps_until_whole_batch']} steps ({r['batch_prefill_time_s']:.1f} s); "
                              f"load {r['loadavg_after']:.2f}", flush=True)
                        break
                    print(f"[{kind}] L={length:6d}: batch {batch} did not run as a whole "
                          f"(preemptions {r['preemptions']}); halving", flush=True)
                    batch, attempt = batch // 2, attempt + 1
                if "decode" not in entry:
                    entry["error"] = "does not fit even at batch 1"
            except Exception as e:  # noqa: BLE001 - never lose the whole run to one length
                traceback.print_exc()
                entry["error"] = repr(e)
    finally:
        stop_engine(llm)
    return result


def _model_job(kind: str, path: str, args, max_len: int, capacity_lengths: list[int], out: str) -> None:
    """Child process: one engine, in this process (vLLM's multiprocess engine core did not find
    the recurrent states the first prefill cached: the first request of each batch got no
    prefix-cache hit and prefilled the whole prompt again; in-process every request hits)."""
    in_process_engine_env()
    t0 = time.monotonic()
    r = bench_model(kind, Path(path), args, max_len, capacity_lengths)
    r["wall_s"] = time.monotonic() - t0
    Path(out).write_text(json.dumps(r, default=str))


# ----- report ------------------------------------------------------------------------------


def summarize(models: dict, args, cfgs: dict) -> dict:
    per_length = []
    for length in args.lengths:
        n = length + args.suffix_tokens + max_tokens_for(args)
        row = {"prompt_len": length, "seq_len": n}
        for kind in args.models:
            m = models.get(kind, {})
            e = m.get("lengths", {}).get(str(length), {})
            d, p = e.get("decode"), e.get("prefill")
            row[f"{kind}_decode_tps"] = d["decode_tokens_per_s"] if d else None
            row[f"{kind}_decode_tps_median_step"] = d["decode_tokens_per_s_median_step"] if d else None
            row[f"{kind}_decode_step_ms_median"] = d["decode_step_ms_median"] if d else None
            row[f"{kind}_batch"] = d["batch"] if d else None
            row[f"{kind}_prefix_cache_hits"] = d["num_cached_tokens"] if d else None
            row[f"{kind}_batch_prompt_len"] = d["prompt_len"] if d else None
            row[f"{kind}_prefill_tps"] = p["prefill_tokens_per_s"] if p else None
            row[f"{kind}_error"] = e.get("error") or m.get("error")
            cap = m.get("capacity")
            row[f"{kind}_max_batch_vllm"] = (int(cap["max_concurrency"][str(n)] + 1e-9) if cap else None)
            per_seq = analytic_bytes_per_sequence(kind, cfgs, n, state_bytes_of(cap))
            row[f"{kind}_bytes_per_seq"] = per_seq
            row[f"{kind}_max_batch_bytes"] = args.kv_bytes // per_seq

        def ratio(a, b, key):
            x, y = row.get(f"{a}_{key}"), row.get(f"{b}_{key}")
            return x / y if x and y else None

        for other in ("twin", "hybrid"):
            row[f"jet_over_{other}_decode"] = ratio("jet", other, "decode_tps")
            row[f"jet_over_{other}_decode_median_step"] = ratio("jet", other, "decode_tps_median_step")
            row[f"jet_over_{other}_prefill"] = ratio("jet", other, "prefill_tps")
            row[f"jet_over_{other}_max_batch_vllm"] = ratio("jet", other, "max_batch_vllm")
        per_length.append(row)

    checks = {}
    for kind in args.models:
        m = models.get(kind, {})
        cap, cc = m.get("capacity"), m.get("cache_config")
        if cc is None:
            continue
        checks[kind] = {
            "logged_max_concurrency_at_max_model_len": cc["logged_max_concurrency_at_max_model_len"],
            "worker_max_concurrency_at_max_model_len":
                cap["max_concurrency"].get(str(cc["max_model_len"])) if cap else None,
            "num_blocks_engine": cc["num_gpu_blocks"],
            "num_blocks_worker": cap["num_blocks"] if cap else None,
            "block_size": cc["block_size"],
            "mamba_cache_mode": cc["mamba_cache_mode"],
        }
    return {"per_length": per_length, "capacity_checks": checks}


def _fmt(x, spec=".1f", none="-"):
    return none if x is None else format(x, spec)


def _ratio(x):
    return "-" if x is None else f"{x:.2f}x"


def print_table(summary: dict, args, cfgs: dict, layout: dict) -> str:
    jet = cfgs["jet"]
    mix = mixer_summary(cfgs)
    j, g = mix["jetblock"], mix["gdn"]
    n_jet = jet.layer_types.count("jet")
    n_attn, n_swa = jet.layer_types.count("attn"), jet.layer_types.count("swa")
    lines = []
    add = lines.append
    add(f"vLLM {args.vllm_version}, bf16, dummy weights, CPU ({os.cpu_count()} cores), layout `{layout['name']}`: "
        f"hidden {jet.hidden_size}, MLP {jet.intermediate_size}, {jet.num_hidden_layers} layers, attention "
        f"{jet.num_attention_heads}/{jet.num_key_value_heads} heads of {jet.head_dim}. "
        f"jet: {n_jet} JetBlocks ({j['heads']} heads, K = {j['head_k_dim']}, V = {j['head_v_dim']}, "
        f"{j['weights'] / 1e6:.2f} M weights each) + {n_attn} attn + {n_swa} swa; "
        f"twin: {jet.num_hidden_layers} full attention; hybrid: {cfgs['hybrid']['layer_types'].count('linear_attention')} "
        f"GDN ({g['heads']} heads, K = V = {g['head_k_dim']}, {g['weights'] / 1e6:.2f} M weights each, "
        f"same recurrent state as a JetBlock) + {cfgs['hybrid']['layer_types'].count('full_attention')} full attention. "
        f"Batch {args.batch}: one shared prompt of the given length + {args.suffix_tokens} distinct tokens per "
        f"request (prefix caching); decode tok/s over {args.decode_steps} decode steps with the whole batch "
        f"running ({max_tokens_for(args)} tokens generated per request); KV/state budget "
        f"{args.kv_bytes / 2**30:.2f} GiB per engine.")
    add("")
    models = args.models

    def cell(r, kind, key, spec):
        v = r.get(f"{kind}_{key}")
        if v is None:
            return "does not fit" if r.get(f"{kind}_error") and "fit" in r[f"{kind}_error"] else (
                "error" if r.get(f"{kind}_error") else "-")
        s = format(v, spec)
        b = r.get(f"{kind}_batch")
        if key == "decode_tps" and b is not None and b != args.batch:
            s += f" (batch {b})"
        return s

    others = [o for o in ("twin", "hybrid") if o in models] if "jet" in models else []
    hdr = ["context"] + [f"{k} decode tok/s" for k in models]
    hdr += [f"jet/{o}" for o in others] + [f"jet/{o} (median step)" for o in others]
    hdr += [f"{k} prefill tok/s" for k in models]
    add("| " + " | ".join(hdr) + " |")
    add("|" + "|".join(["---"] + ["---:"] * (len(hdr) - 1)) + "|")
    for r in summary["per_length"]:
        cells = [context_label(r["prompt_len"])]
        cells += [cell(r, k, "decode_tps", ".1f") for k in models]
        cells += [_ratio(r.get(f"jet_over_{o}_decode")) for o in others]
        cells += [_ratio(r.get(f"jet_over_{o}_decode_median_step")) for o in others]
        cells += [cell(r, k, "prefill_tps", ".0f") for k in models]
        add("| " + " | ".join(cells) + " |")
    add("")
    add("Decode tok/s: tokens generated over the timed steps / their time (engine-core timestamps); "
        "median step: batch / median step time, less sensitive to other jobs on the machine. Prefill "
        "tok/s: the first prefill of the shared prompt, tokens computed / time"
        + ("." if args.independent_prompts else
           " (each length's prompt extends the previous length's, so these are the tokens from the "
           "previous length, or 0, up to this one; the rest comes from the prefix cache)."))
    add("")
    hdr = ["sequence length"] + [f"{k} max batch" for k in models]
    if "jet" in models:
        hdr += [f"jet/{o}" for o in ("twin", "hybrid") if o in models]
    hdr += [f"{k} MiB/seq" for k in models] + ["prefix-cache hits (tokens, per request)"]
    add(f"Largest batch of distinct sequences in {args.kv_bytes / 2**30:.2f} GiB of KV/state (vLLM's block "
        "accounting; MiB/seq: exact cache bytes of one sequence):")
    add("")
    add("| " + " | ".join(hdr) + " |")
    add("|" + "|".join(["---"] + ["---:"] * (len(hdr) - 2) + ["---"]) + "|")
    for r in summary["per_length"]:
        cells = [str(r["seq_len"])]
        cells += [_fmt(r.get(f"{k}_max_batch_vllm"), "d") for k in models]
        if "jet" in models:
            cells += [_ratio(r.get(f"jet_over_{o}_max_batch_vllm")) for o in ("twin", "hybrid") if o in models]
        cells += [_fmt(r.get(f"{k}_bytes_per_seq") / 2**20, ".1f") for k in models]
        hits = []
        for k in models:
            h = r.get(f"{k}_prefix_cache_hits")
            if h:
                hits.append(f"{k} {min(h)}" + ("" if min(h) == max(h) else f"..{max(h)}")
                            + f"/{r[f'{k}_batch_prompt_len']}")
        cells.append(", ".join(hits) or "-")
        add("| " + " | ".join(cells) + " |")
    for r in summary["per_length"]:
        for k in models:
            b, m = r.get(f"{k}_batch"), r.get(f"{k}_max_batch_vllm")
            if b is not None and m is not None and b > m:
                add(f"Note: {k} at {context_label(r['prompt_len'])} decoded a batch of {b} although only {m} distinct "
                    f"sequences of {r['seq_len']} tokens fit the budget: the batch shares the prompt's KV blocks "
                    "(prefix caching).")
    for kind, c in summary["capacity_checks"].items():
        logged, worker = c["logged_max_concurrency_at_max_model_len"], c["worker_max_concurrency_at_max_model_len"]
        add(f"check {kind}: vLLM log 'Maximum concurrency' at max_model_len = "
            f"{logged if logged is None else f'{logged:.2f}'}x, worker-side recomputation = "
            f"{worker if worker is None else f'{worker:.2f}'}x; {c['num_blocks_engine']} blocks of "
            f"{c['block_size']} tokens, mamba_cache_mode={c['mamba_cache_mode']}")
    text = "\n".join(lines)
    print("\n" + text, flush=True)
    return text


def plot(summary: dict, args, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = summary["per_length"]
    L = [r["prompt_len"] for r in rows]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8), gridspec_kw={"width_ratios": [3, 2]})
    markers = {"jet": "o-", "twin": "s-", "hybrid": "^-"}
    ax = axes[0]
    for kind in args.models:
        pts = [(x, r[f"{kind}_decode_tps"]) for x, r in zip(L, rows) if r.get(f"{kind}_decode_tps")]
        if pts:
            ax.plot(*zip(*pts), markers[kind], label=LABELS[kind])
    ax.set_xscale("log", base=2)
    ax.set_ylim(bottom=0)
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel(f"decode tokens/s (batch {args.batch})")
    ax.set_title("Decode throughput")
    ax.legend()
    ax.grid(alpha=0.3)
    ax = axes[1]
    S = [r["seq_len"] for r in rows]
    for kind in args.models:
        pts = [(x, r[f"{kind}_max_batch_vllm"]) for x, r in zip(S, rows) if r.get(f"{kind}_max_batch_vllm")]
        if pts:
            ax.plot(*zip(*pts), markers[kind], label=LABELS[kind])
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("sequence length (tokens)")
    ax.set_ylabel("max concurrent sequences")
    ax.set_title(f"Batch that fits {args.kv_bytes / 2**30:.2f} GiB of KV/state")
    ax.legend()
    ax.grid(alpha=0.3, which="both")
    for ax, xs in zip(axes, (L, S)):
        ax.set_xticks(xs)
        ax.set_xticklabels([context_label(x) for x in xs])
        ax.minorticks_off() if ax is axes[0] else None
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layout", default="bench", choices=list(LAYOUTS),
                        help="bench (default): hidden 1024, 12 layers; 2b: the official 2B pattern, "
                             "width divided by --scale; smollm2: SmolLM2-135M's dims, its conversion's layout")
    parser.add_argument("--scale", type=int, default=2, choices=[1, 2, 4],
                        help="--layout 2b only: divide hidden/MLP/attention heads of the 2B by this")
    parser.add_argument("--lengths", type=int, nargs="+", default=None,
                        help=f"prompt lengths (default {DEFAULT_LENGTHS}; with --profile {PROFILE_LENGTHS})")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--suffix-tokens", type=int, default=32,
                        help="distinct tokens after the shared prompt in each request")
    parser.add_argument("--decode-steps", "--decode-tokens", dest="decode_steps", type=int, default=32,
                        help="decode steps timed with the whole batch running (default 32); each request "
                             "generates this + batch + 5 tokens (requests of hybrid models start one per step)")
    parser.add_argument("--kv-bytes", type=int, default=4 << 30,
                        help="KV/state budget of each engine in bytes (default 4 GiB)")
    parser.add_argument("--gdn-heads", type=int, default=None,
                        help="GDN heads of the hybrid (default: the recurrent-state bytes of a JetBlock)")
    parser.add_argument("--max-num-batched-tokens", type=int, default=None,
                        help="tokens per engine step, i.e. the prefill chunk (default: vLLM's, 4096 on CPU)")
    parser.add_argument("--independent-prompts", action="store_true",
                        help="a random shared prompt per length, prefilled from scratch (default: each "
                             "length's prompt extends the previous one, whose prefix comes from the cache)")
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--eager", action="store_true",
                        help="eager mode (`enforce_eager`) instead of vLLM's default on CPU, which "
                             "compiles the model with torch.compile (Inductor fuses the elementwise ops "
                             "between the GEMMs)")
    parser.add_argument("--profile", action="store_true",
                        help="instead of the throughput run: per-op time of one decode step per model "
                             "and length (engine in-process, torch.profiler); see bench/decode_profile.py")
    parser.add_argument("--profile-steps", type=int, default=16,
                        help="--profile: N of the 1 + N generated tokens (default 16)")
    parser.add_argument("--top-ops", type=int, default=25, help="--profile: ops listed per model")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR)
    args = parser.parse_args(argv)
    if args.lengths is None:
        args.lengths = list(PROFILE_LENGTHS if args.profile else DEFAULT_LENGTHS)
    args.lengths = sorted(set(args.lengths))
    args.models = [k for k in MODELS if k in args.models]
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.profile:
        decode_profile.main(args)
        return

    env = environment()
    args.vllm_version = env["vllm"]
    wall0 = time.monotonic()
    max_len = max(args.lengths) + args.suffix_tokens + max_tokens_for(args)
    seq_lens = [n + args.suffix_tokens + max_tokens_for(args) for n in args.lengths]
    layout = layout_named(args.layout, args.scale)
    args.out.mkdir(parents=True, exist_ok=True)
    models = {}
    with tempfile.TemporaryDirectory(prefix="jet-bench-") as tmp:
        dirs, cfgs = write_models(Path(tmp), layout, max_len, args.gdn_heads)
        print(f"layout {layout['name']}: hidden {layout['hidden_size']}, MLP {layout['intermediate_size']}, "
              f"{len(layout['layer_types'])} layers; GDN heads {cfgs['hybrid']['linear_num_value_heads']}", flush=True)
        for kind in args.models:
            t0 = time.monotonic()
            r = in_child(_model_job, kind, str(dirs[kind]), args, max_len, seq_lens, out=Path(tmp) / f"{kind}.json")
            models[kind] = r if r is not None else {"error": "the engine process died (see the log above)",
                                                    "lengths": {}}
            models[kind]["wall_s"] = time.monotonic() - t0
            print(f"[{kind}] done in {models[kind]['wall_s'] / 60:.1f} min", flush=True)

    summary = summarize(models, args, cfgs)
    title = (f"Jet-Nemotron vs full-attention twin vs GDN hybrid, vLLM {args.vllm_version}, bf16, layout "
             f"{layout['name']} (hidden {layout['hidden_size']}, {len(layout['layer_types'])} layers), batch "
             f"{args.batch}, {platform.processor() or platform.machine()} x{os.cpu_count()}")
    table = print_table(summary, args, cfgs, layout)
    wall = time.monotonic() - wall0
    out = {
        "benchmark": "decode_throughput",
        "goal": "decode, batch 8: jet/twin >= 1.3x at 8K, 3x at 32K, 4x at 64K; jet/hybrid >= 1.1x from 32K on",
        "settings": {
            "layout": layout, "scale": args.scale if args.layout == "2b" else None,
            "lengths": args.lengths, "batch": args.batch, "suffix_tokens": args.suffix_tokens,
            "independent_prompts": args.independent_prompts,
            "decode_steps": args.decode_steps, "max_tokens_per_request": max_tokens_for(args),
            "engine": "in-process (VLLM_ENABLE_V1_MULTIPROCESSING=0), one spawned process per model",
            "kv_cache_memory_bytes": args.kv_bytes,
            "max_model_len": max_len, "dtype": "bfloat16", "load_format": "dummy", "enforce_eager": args.eager,
            "enable_prefix_caching": True, "models": args.models,
        },
        "mixers": mixer_summary(cfgs),
        "environment": env,
        "models": {k: {"config": cfgs[k].to_dict() if k == "jet" else cfgs[k], **models[k]} for k in models},
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
