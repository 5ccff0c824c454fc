"""`decode_throughput.py --profile`: where the time of one decode step goes, per model and length.

    .venv/bin/python bench/decode_throughput.py --profile                      # 8K, batch 8, 3 models
    .venv/bin/python bench/decode_throughput.py --profile --lengths 8192 32768 --models jet

Each model runs in its own spawned process with vLLM's engine core in that process
(`VLLM_ENABLE_V1_MULTIPROCESSING=0`), so `torch.profiler` (CPU activities) sees every op. For each model and length
the setup is the throughput run's: one shared random prompt prefilled once, then a batch of that
prompt plus a distinct suffix each (the prefix comes from the cache), stepped by hand through
vLLM's engine: once every sequence has its first token, 3 warm-up decode steps, N decode steps
timed plainly, then N decode steps under the profiler (`--profile-steps`, default 16). Each
profiled step is a pure decode step of the whole batch, so nothing has to be subtracted (profiling
generate(1) and generate(1 + N) and subtracting gives the same figure plus the noise of two
prefills: on this shared machine it came out negative).

Every profiled op's self time goes to one group, by the op and the ops it runs inside (first rule
that applies):

* **recurrent core**: the recurrent layer's core op, `vllm::jet_block_core` (JetBlock: dynamic conv
  + gated delta rule) or `vllm::cpu_gdn_attention_core` (GDN: short conv + gated delta rule), and
  everything that runs inside it, split into
  * *delta-rule kernel*: ops named `*delta_rule*` (vLLM's C++ `_C::fused_sigmoid_gating_delta_rule_update_cpu`,
    `_C::chunk_gated_delta_rule_cpu`) and what runs inside them;
  * *conv, gates, other*: the rest of the core (`_C::causal_conv1d_update_cpu`, the dynamic conv,
    state gathers, the core's own Python time);
* **attention**: the attention ops (`vllm::unified_attention*`, the KV-cache write
  `vllm::unified_kv_cache_update`, vLLM's CPU attention kernels, SDPA) and what runs inside them;
* **GEMM**: oneDNN/mkldnn matrix products, `aten::addmm`/`mm`/`bmm`/`linear`/`matmul` and what they run;
* **rest, other ops**: norms (the output norm of JetBlock/GDN too: it is outside the core op),
  activations, RoPE, embedding, sampling, copies...;
* **rest, between ops**: step time not inside any profiled op (Python, scheduling, framework).

"REST" (the two rest groups) is the share of the step that is neither GEMM, nor attention, nor the
recurrent state update. Times under the profiler are inflated by its per-op overhead (mostly in
the many small ops of "rest"); the step time without the profiler is printed beside it.
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

from decode_engine import (context_label, environment, in_child, in_process_engine_env, layout_named, mixer_summary,
                           prefill_once, shared_prefix_batch, shared_prompt, start_engine,
                           stop_engine, write_models)

GROUPS = ("gemm", "attention", "core_delta_rule", "core_other", "rest_ops", "rest_between_ops")
GROUP_LABELS = {
    "gemm": "GEMM (oneDNN/mkldnn/addmm/linear)",
    "attention": "attention",
    "core_delta_rule": "recurrent core: delta-rule kernel",
    "core_other": "recurrent core: conv, gates, other",
    "rest_ops": "rest: other ops",
    "rest_between_ops": "rest: between ops (not in an op)",
}
DELTA_RULE = ("delta_rule",)
CORE = ("jet_block_core", "gdn_attention_core")
ATTENTION = ("unified_attention", "kv_cache_update", "attention", "paged_attention", "cpu_attn", "sdpa",
             "scaled_dot_product", "flash_attn", "reshape_and_cache")
GEMM = ("mkldnn", "onednn", "addmm", "aten::mm", "aten::bmm", "aten::baddbmm", "aten::linear",
        "aten::matmul", "gemm", "weight_packed_linear", "int8_scaled_mm", "scaled_mm", "wna16")


def _has(name: str, patterns) -> bool:
    n = name.lower()
    return any(p in n for p in patterns)


def classify(event) -> str:
    """The group of one profiled event: by its own name and its ancestors' (see the module doc)."""
    chain = []
    e = event
    while e is not None:
        chain.append(e.name)
        e = e.cpu_parent
    if any(_has(n, CORE) for n in chain):
        return "core_delta_rule" if any(_has(n, DELTA_RULE) for n in chain) else "core_other"
    if any(_has(n, DELTA_RULE) for n in chain):
        return "core_delta_rule"
    if any(_has(n, ATTENTION) for n in chain):
        return "attention"
    if any(_has(n, GEMM) for n in chain):
        return "gemm"
    return "rest_ops"


def _chain(event) -> list[str]:
    names = []
    while event is not None:
        names.append(event.name)
        event = event.cpu_parent
    return names[::-1]  # outermost first


def aggregate(events) -> tuple[dict, dict, float]:
    """{group: us}, {op: {"us", "calls", "groups": {group: us}, "chain"}} and the time inside
    top-level ops (us) of a profiler's events."""
    groups = dict.fromkeys(GROUPS, 0.0)
    ops: dict[str, dict] = {}
    in_ops = 0.0
    for e in events:
        g = classify(e)
        us = float(e.self_cpu_time_total)
        groups[g] += us
        rec = ops.setdefault(e.name, {"us": 0.0, "calls": 0, "groups": {}, "chain": None})
        rec["us"] += us
        rec["calls"] += 1
        rec["groups"][g] = rec["groups"].get(g, 0.0) + us
        if rec["chain"] is None:
            rec["chain"] = " > ".join(_chain(e))
        if e.cpu_parent is None:
            in_ops += float(e.cpu_time_total)
    return groups, ops, in_ops


def step_window(engine, n: int, prof=None) -> float:
    """Run `n` engine steps (under `prof` if given); wall seconds."""
    if prof is not None:
        prof.start()
    t0 = time.perf_counter()
    for _ in range(n):
        engine.step()
    wall = time.perf_counter() - t0
    if prof is not None:
        prof.stop()
    return wall


def profile_length(llm, length: int, args) -> dict:
    """One shared prompt prefilled alone, then the batch (prompt + distinct suffix each) is
    prefilled from the prefix cache and decoded: a few warm-up decode steps, N decode steps timed
    plainly, N decode steps under the profiler. Every timed step has the whole batch decoding."""
    from torch.profiler import ProfilerActivity, profile
    from vllm import SamplingParams

    N, warm = args.profile_steps, 3
    engine = llm.llm_engine
    prefix = shared_prompt(length, args)
    prefill = prefill_once(engine, prefix, f"profile-{length}-prefix")
    prompts = shared_prefix_batch(prefix, args.batch, args.suffix_tokens, seed=1000 * length + 7)
    # hybrid models admit one request per step while the batch shares a cached state, so the
    # first requests generate a token per request admitted after them before the batch is whole
    params = SamplingParams(max_tokens=1 + len(prompts) + warm + 2 * N + 2, ignore_eos=True, detokenize=False,
                            temperature=0.0)
    ids = [f"profile-{length}-{i}" for i in range(len(prompts))]
    for rid, p in zip(ids, prompts):
        engine.add_request(rid, {"prompt_token_ids": p}, params)
    started, hits = set(), {}
    while len(started) < len(ids):  # prefill of the suffixes (prefix from the cache)
        for o in engine.step():
            if o.outputs and o.outputs[0].token_ids:
                started.add(o.request_id)
            if o.num_cached_tokens is not None:
                hits[o.request_id] = int(o.num_cached_tokens)
    step_window(engine, warm)
    plain = step_window(engine, N)
    prof = profile(activities=[ProfilerActivity.CPU])
    profiled = step_window(engine, N, prof)
    while engine.has_unfinished_requests():
        engine.step()
    groups, ops, in_ops = aggregate(prof.events())
    step_us = profiled / N * 1e6
    groups = {g: v / N for g, v in groups.items()}
    groups["rest_between_ops"] = max(0.0, step_us - in_ops / N)
    top = sorted(ops.items(), key=lambda kv: -kv[1]["us"])
    rest = groups["rest_ops"] + groups["rest_between_ops"]
    recurrent = groups["core_delta_rule"] + groups["core_other"]
    return {
        "prompt_len": length, "batch": args.batch, "batch_prompt_len": length + args.suffix_tokens,
        "decode_steps_profiled": N, "shared_prompt_prefill": prefill,
        "prefix_cache_hits": [hits.get(i) for i in ids],
        "step_ms_profiled": step_us / 1e3,
        "step_ms_plain": plain / N * 1e3,
        "decode_tokens_per_s_plain": args.batch * N / plain,
        "groups_ms": {g: v / 1e3 for g, v in groups.items()},
        "recurrent_ms": recurrent / 1e3,
        "rest_ms": rest / 1e3,
        "fractions": {**{g: v / step_us for g, v in groups.items()}, "recurrent": recurrent / step_us,
                      "rest": rest / step_us},
        "top_ops": [{"op": name, "ms_per_step": r["us"] / N / 1e3, "calls_per_step": r["calls"] / N,
                     "group": max(r["groups"], key=r["groups"].get), "example_chain": r["chain"]}
                    for name, r in top[: args.top_ops]],
    }


def _hits(r: dict) -> str:
    h = [x for x in r["prefix_cache_hits"] if x is not None]
    return "?" if not h else (str(min(h)) if min(h) == max(h) else f"{min(h)}..{max(h)}")


def format_profile(kind: str, r: dict, target: float | None) -> str:
    w = 48
    lines = [f"MODEL {kind} L={r['prompt_len']} batch={r['batch']}: decode step {r['step_ms_profiled']:.1f} ms "
             f"under the profiler, {r['step_ms_plain']:.1f} ms without "
             f"({r['decode_tokens_per_s_plain']:.1f} tok/s); prefix-cache hits {_hits(r)}"
             f"/{r['batch_prompt_len']} prompt tokens per request"]
    for g in GROUPS:
        lines.append(f"  {GROUP_LABELS[g]:<{w}} {r['groups_ms'][g]:8.2f} ms  {100 * r['fractions'][g]:5.1f}%")
    lines.append(f"  {'recurrent core, total':<{w}} {r['recurrent_ms']:8.2f} ms  {100 * r['fractions']['recurrent']:5.1f}%")
    t = f"   (target <= {100 * target:.0f}% for jet at 8K, batch 8)" if target is not None else ""
    lines.append(f"  {'REST = neither GEMM, attention nor recurrent core':<{w}} {r['rest_ms']:8.2f} ms  "
                 f"{100 * r['fractions']['rest']:5.1f}%{t}")
    lines.append(f"  top {len(r['top_ops'])} ops (self time per decode step, group of most of it):")
    for o in r["top_ops"]:
        lines.append(f"    {o['ms_per_step']:8.3f} ms {o['calls_per_step']:7.1f} calls  {o['group']:<17} {o['op'][:80]}")
    return "\n".join(lines)


def _profile_job(kind: str, path: str, args, max_len: int, out: str) -> None:
    """Child process: one in-process engine, every length; results and printed text to `out`."""
    in_process_engine_env()
    results: dict = {}
    texts = []
    llm, _ = start_engine(kind, Path(path), args, max_len)
    try:
        for length in args.lengths:
            try:
                r = profile_length(llm, length, args)
            except Exception as e:  # noqa: BLE001 - keep the other lengths and models
                import traceback

                traceback.print_exc()
                results[str(length)] = {"error": repr(e)}
                continue
            results[str(length)] = r
            text = format_profile(kind, r, 0.15 if kind == "jet" and length == 8192 else None)
            texts.append(text)
            print("\n" + text, flush=True)
    finally:
        stop_engine(llm)
    Path(out).write_text(json.dumps({"results": results, "texts": texts}, default=str))


def main(args) -> None:
    env = environment()
    wall0 = time.monotonic()
    max_len = max(args.lengths) + args.suffix_tokens + 2 * args.profile_steps + 16
    layout = layout_named(args.layout, args.scale)
    args.out.mkdir(parents=True, exist_ok=True)
    results: dict = {}
    texts = []
    with tempfile.TemporaryDirectory(prefix="jet-profile-") as tmp:
        dirs, cfgs = write_models(Path(tmp), layout, max_len, args.gdn_heads)
        for kind in args.models:
            r = in_child(_profile_job, kind, str(dirs[kind]), args, max_len, out=Path(tmp) / f"{kind}.json")
            if r is None:
                results[kind] = {"error": "the engine process died (see the log above)"}
                continue
            results[kind] = r["results"]
            texts += r["texts"]
    summary = ["| model | context | step (ms, profiler) | step (ms, plain) | "
               + " | ".join(GROUP_LABELS[g] for g in GROUPS) + " | REST (neither GEMM, attention nor recurrent core) |",
               "|---|---|" + "---:|" * (len(GROUPS) + 3)]
    for kind, per_len in results.items():
        for length, r in per_len.items():
            if "groups_ms" not in r:
                continue
            summary.append(f"| {kind} | {context_label(int(length))} | {r['step_ms_profiled']:.1f} | {r['step_ms_plain']:.1f} | "
                           + " | ".join(f"{r['groups_ms'][g]:.1f} ({100 * r['fractions'][g]:.0f}%)" for g in GROUPS)
                           + f" | {r['rest_ms']:.1f} ({100 * r['fractions']['rest']:.0f}%) |")
    summary_text = "\n".join(summary)
    print("\n" + summary_text, flush=True)
    wall = time.monotonic() - wall0
    out = {
        "benchmark": "decode_profile",
        "settings": {"layout": layout, "lengths": args.lengths, "batch": args.batch,
                     "suffix_tokens": args.suffix_tokens, "profile_steps": args.profile_steps,
                     "kv_cache_memory_bytes": args.kv_bytes, "models": args.models,
                     "groups": GROUP_LABELS},
        "mixers": mixer_summary(cfgs),
        "environment": env,
        "models": results,
        "text": "\n\n".join(texts),
        "table": summary_text,
        "wall_time_s": wall,
    }
    (args.out / "decode_profile.json").write_text(json.dumps(out, indent=2, default=str))
    print(f"\nwrote {args.out / 'decode_profile.json'} (wall time {wall / 60:.1f} min)", flush=True)
