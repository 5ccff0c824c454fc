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
Jet-Nemotron-2B layer pattern (28 layers) with its width divided by S.

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
import gc
import json
import os
import platform
import sys
import tempfile
import time
import traceback
from pathlib import Path

# Plain-data results of a worker-side function come back through vLLM's RPC; sending the
# function itself needs vLLM's pickle fallback (local processes of this run only).
os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")
os.environ.setdefault("VLLM_LOG_STATS_INTERVAL", "60")
# Every engine compiles as on a cold cache, whatever an earlier run left in vLLM's AOT compile
# cache (which the plugin makes loadable on CPU: vllm_jetnemotron/cpu_aot_compile_load.py).
os.environ.setdefault("VLLM_USE_AOT_COMPILE", "0")

RESULTS_DIR = Path(__file__).resolve().parent / "results"
FULL_HIDDEN, FULL_INTERMEDIATE, FULL_HEADS, FULL_KV_HEADS = 1536, 8960, 12, 2
VOCAB = 151936
MODELS = ("jet", "twin", "hybrid")
LABELS = {"jet": "Jet-Nemotron (this plugin)", "twin": "full-attention twin (Qwen2)",
          "hybrid": "GDN hybrid (vLLM Qwen3-Next)"}
MOE_INTERMEDIATE = 128  # the hybrid's one routed expert (see write_models)
GDN_HEAD_DIM = 128  # vLLM's CPU GDN ops take K = V in {64, 128}; Qwen3-Next uses 128
DEFAULT_LENGTHS = [8192, 32768, 65536]
PROFILE_LENGTHS = [8192]


# ----- layouts and model folders -------------------------------------------------------


def _round_up(x: float, m: int) -> int:
    return int(-(-x // m) * m)


def bench_layout() -> dict:
    """Hidden 1024, 12 layers; the 2B's MLP:hidden ratio (8960:1536) rounded up to a multiple
    of 128; attention heads of 128 with 4 query heads per KV head; full attention at the 2B's
    relative depths (14/28 -> 6, 19/28 -> 8) and its first SWA layer (20/28 -> 9)."""
    hidden = 1024
    layer_types = ["jet"] * 6 + ["attn", "jet", "attn", "swa", "jet", "jet"]
    return dict(
        name="bench", hidden_size=hidden,
        intermediate_size=_round_up(hidden * FULL_INTERMEDIATE / FULL_HIDDEN, 128),
        num_attention_heads=8, num_key_value_heads=2, head_dim=128,
        layer_types=layer_types,
        efficient_attention_config={
            "jet": {"num_heads": 8, "head_dim": 96, "expand_v": 2.6666666667, "conv_size": 4,
                    "dconv_generator_reduction": 8, "norm_eps": "1e-5"},
            "swa": {"window_size": 1152}},
    )


def official_layout(scale: int) -> dict:
    """The official 2B layer pattern and JetBlock dims, hidden/MLP/attention heads divided by
    `scale` keeping the 12:2 query:KV head ratio (head_dim 128, or 64 where 128 does not fit)."""
    from vllm_jetnemotron.converter.random_checkpoint import official_config

    hidden = FULL_HIDDEN // scale
    if hidden * scale != FULL_HIDDEN or FULL_INTERMEDIATE % scale:
        raise ValueError(f"--scale {scale} does not divide hidden 1536 and MLP 8960")
    official = official_config("2b")
    for head_dim in (128, 64):
        heads = hidden // head_dim
        kv_heads = heads * FULL_KV_HEADS // FULL_HEADS
        if heads * head_dim == hidden and kv_heads >= 1 and kv_heads * FULL_HEADS == heads * FULL_KV_HEADS:
            return dict(name=f"2b/{scale}", hidden_size=hidden,
                        intermediate_size=FULL_INTERMEDIATE // scale,
                        num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=head_dim,
                        layer_types=list(official.layer_types),
                        efficient_attention_config=official.efficient_attention_config)
    raise ValueError(f"--scale {scale}: no attention head_dim in (128, 64) keeps the 12:2 head ratio")


def jet_config(layout: dict, max_len: int):
    from vllm_jetnemotron.config import JetNemotronConfig
    from vllm_jetnemotron.converter.random_checkpoint import official_config

    fields = {k: layout[k] for k in ("hidden_size", "intermediate_size", "num_attention_heads",
                                     "num_key_value_heads", "layer_types", "efficient_attention_config")}
    base = official_config("2b").to_dict()
    cfg = JetNemotronConfig(**{**base, **fields, "num_hidden_layers": len(layout["layer_types"]),
                               "max_position_embeddings": max(base["max_position_embeddings"], max_len)})
    assert cfg.head_dim == layout["head_dim"], (cfg.head_dim, layout)
    return cfg


def default_gdn_heads(jet_cfg) -> int:
    """GDN heads (K = V = 128) whose recurrent state has the bytes of one JetBlock's."""
    d = jet_cfg.jet_dims
    return max(1, round(d.num_heads * d.head_k_dim * d.head_v_dim / GDN_HEAD_DIM ** 2))


def write_models(root: Path, layout: dict, max_len: int, gdn_heads: int | None):
    from vllm_jetnemotron.converter.random_checkpoint import copy_tokenizer

    jet_cfg = jet_config(layout, max_len)
    n_layers = jet_cfg.num_hidden_layers
    common = {
        "vocab_size": VOCAB,
        "hidden_size": jet_cfg.hidden_size,
        "intermediate_size": jet_cfg.intermediate_size,
        "num_hidden_layers": n_layers,
        "num_attention_heads": jet_cfg.num_attention_heads,
        "num_key_value_heads": jet_cfg.num_key_value_heads,
        "hidden_act": "silu",
        "rms_norm_eps": jet_cfg.rms_norm_eps,
        "rope_theta": jet_cfg.rope_parameters["rope_theta"],
        "max_position_embeddings": max(32768, max_len),
        "attention_dropout": 0.0,
        "bos_token_id": 151643,
        "eos_token_id": 151643,
        "torch_dtype": "bfloat16",
    }
    twin_cfg = {
        "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", **common,
        "tie_word_embeddings": True, "use_sliding_window": False, "sliding_window": None,
        "max_window_layers": n_layers,
    }
    heads = gdn_heads or default_gdn_heads(jet_cfg)
    full = [i for i, t in enumerate(jet_cfg.layer_types) if t == "attn"]
    hybrid_cfg = {
        "architectures": ["Qwen3NextForCausalLM"], "model_type": "qwen3_next", **common,
        "head_dim": jet_cfg.head_dim,
        # Qwen3-Next defaults that would make its attention layers differ from the twin's:
        # a sigmoid output gate (a second q-sized projection) and RoPE on a quarter of head_dim
        "attn_output_gate": False, "partial_rotary_factor": 1.0, "attention_bias": False,
        "tie_word_embeddings": False,  # vLLM's Qwen3-Next always has its own lm_head
        "layer_types": ["full_attention" if i in full else "linear_attention" for i in range(n_layers)],
        "linear_conv_kernel_dim": jet_cfg.jet_dims.conv_size,
        "linear_key_head_dim": GDN_HEAD_DIM, "linear_value_head_dim": GDN_HEAD_DIM,
        "linear_num_key_heads": heads, "linear_num_value_heads": heads,
        # Dense MLPs where vLLM allows: Qwen3NextForCausalLM.set_moe_parameters raises without a
        # single MoE layer, so the last layer ((i + 1) % decoder_sparse_step == 0) is an MoE block.
        # Its shared expert is the dense MLP (same GEMMs as every other layer's MLP, times a
        # sigmoid gate) and its one routed expert is tiny (top-1 of 1, MOE_INTERMEDIATE wide).
        # Without a shared expert vLLM's MoE runner fuses the router into a GEMM that fails on CPU
        # ('MoERunner' object has no attribute 'cpu_linear').
        "num_experts": 1, "num_experts_per_tok": 1, "decoder_sparse_step": n_layers,
        "moe_intermediate_size": MOE_INTERMEDIATE,
        "shared_expert_intermediate_size": jet_cfg.intermediate_size,
        "norm_topk_prob": True, "mlp_only_layers": [],
    }
    dirs = {}
    for kind, cfg in (("jet", None), ("twin", twin_cfg), ("hybrid", hybrid_cfg)):
        d = root / kind
        d.mkdir(parents=True)
        if cfg is None:
            jet_cfg.save_pretrained(d)
        else:
            (d / "config.json").write_text(json.dumps(cfg, indent=2))
        copy_tokenizer(d)
        dirs[kind] = d
    return dirs, {"jet": jet_cfg, "twin": twin_cfg, "hybrid": hybrid_cfg}


def mixer_summary(cfgs: dict) -> dict:
    """Per-layer weights and recurrent-state elements of a JetBlock and of a GDN layer."""
    jet, hyb = cfgs["jet"], cfgs["hybrid"]
    d, h = jet.jet_dims, jet.hidden_size
    jet_params = (h * (2 * d.key_dim + 2 * d.value_dim + 2 * d.num_heads) + d.value_dim * h
                  + h * d.generator_dim + d.generator_dim * d.value_dim * d.conv_size)
    hk, hv = hyb["linear_num_key_heads"], hyb["linear_num_value_heads"]
    kd, vd = hk * hyb["linear_key_head_dim"], hv * hyb["linear_value_head_dim"]
    gdn_params = h * (2 * kd + 2 * vd + 2 * hv) + vd * h + (2 * kd + vd) * hyb["linear_conv_kernel_dim"]
    return {
        "jetblock": {"heads": d.num_heads, "head_k_dim": d.head_k_dim, "head_v_dim": d.head_v_dim,
                     "weights": jet_params, "recurrent_state_elements": d.num_heads * d.head_k_dim * d.head_v_dim,
                     "conv_state_elements": (d.conv_size - 1) * d.value_dim},
        "gdn": {"heads": hv, "head_k_dim": hyb["linear_key_head_dim"], "head_v_dim": hyb["linear_value_head_dim"],
                "weights": gdn_params, "recurrent_state_elements": hv * hyb["linear_key_head_dim"] * hyb["linear_value_head_dim"],
                "conv_state_elements": (hyb["linear_conv_kernel_dim"] - 1) * (2 * kd + vd)},
    }


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


def state_bytes_of(capacity: dict | None) -> int:
    """Bytes per element of the recurrent state the engine allocated (float32 on AVX-512 CPUs)."""
    for g in (capacity or {}).get("groups", []):
        if "state_dtypes" in g:
            return 4 if "float32" in g["state_dtypes"][-1] else 2
    return 2


# ----- engines and prompts ---------------------------------------------------------------


def random_tokens(length: int, seed: int) -> list[int]:
    import torch

    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 151000, (length,), generator=g).tolist()


def shared_prefix_batch(prefix: list[int], batch: int, suffix_tokens: int, seed: int) -> list[list[int]]:
    """`batch` prompts: the shared prefix plus a distinct random suffix each."""
    return [prefix + random_tokens(suffix_tokens, seed + i) for i in range(batch)]


def start_engine(kind: str, path: Path, args, max_len: int):
    from vllm import LLM

    print(f"\n=== {kind}: starting vLLM ({path}) ===", flush=True)
    t0 = time.monotonic()
    llm = LLM(model=str(path), dtype="bfloat16", load_format="dummy",
              kv_cache_memory_bytes=args.kv_bytes, max_model_len=max_len,
              max_num_seqs=max(args.batch, 8), enforce_eager=args.eager, enable_prefix_caching=True,
              disable_log_stats=False, seed=0,
              **({"max_num_batched_tokens": args.max_num_batched_tokens} if args.max_num_batched_tokens else {}))
    return llm, time.monotonic() - t0


def stop_engine(llm) -> None:
    try:
        llm.llm_engine.engine_core.shutdown()
    finally:
        del llm
        gc.collect()


def engine_info(llm, args, max_len: int) -> dict:
    engine = llm.llm_engine
    cc = engine.vllm_config.cache_config
    return {
        "num_gpu_blocks": cc.num_gpu_blocks, "block_size": cc.block_size,
        "enable_prefix_caching": cc.enable_prefix_caching,
        "mamba_cache_mode": str(cc.mamba_cache_mode),
        "mamba_ssm_cache_dtype": str(getattr(cc, "mamba_ssm_cache_dtype", None)),
        "kv_cache_memory_bytes": args.kv_bytes,
        "max_model_len": max_len,
        "max_num_batched_tokens": engine.vllm_config.scheduler_config.max_num_batched_tokens,
        "logged_max_concurrency_at_max_model_len": getattr(cc, "kv_cache_max_concurrency", None),
    }


# ----- measurement -----------------------------------------------------------------------


def shared_prompt(length: int, args) -> list[int]:
    """The shared prompt of a length: by default the first `length` tokens of one random
    sequence, so each length's prompt extends the previous one and its first prefill computes
    only the new tokens (the rest comes from the prefix cache); with --independent-prompts a
    random prompt of its own."""
    if args.independent_prompts:
        return random_tokens(length, seed=1000 * length + 1)
    return random_tokens(max(args.lengths), seed=1)[:length]


def prefill_once(engine, prompt: list[int], tag: str) -> dict:
    """Prefill one prompt alone (one generated token); time it on both clocks. Tokens/s count
    the tokens computed (prompt minus prefix-cache hits)."""
    from vllm import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True, detokenize=False)
    t0 = time.monotonic()
    engine.add_request(tag, {"prompt_token_ids": prompt}, params)
    last = None
    while engine.has_unfinished_requests():
        for o in engine.step():
            last = o
    wall = time.monotonic() - t0
    m = last.metrics if last is not None else None
    engine_s = (m.first_token_ts - m.scheduled_ts) if m is not None and m.first_token_ts and m.scheduled_ts else None
    cached = int(getattr(last, "num_cached_tokens", 0) or 0)
    new = len(prompt) - cached
    return {
        "prompt_len": len(prompt), "num_cached_tokens": cached, "computed_tokens": new,
        "wall_s": wall, "engine_s": engine_s,
        "prefill_tokens_per_s": new / wall,
        "prefill_tokens_per_s_engine": new / engine_s if engine_s else None,
    }


def max_tokens_for(args) -> int:
    """Tokens generated per request of a batch: the first (from prefill), `--decode-steps` timed
    decode steps, and slack for requests that start late. vLLM admits one new request per step
    when requests share a cached recurrent-state block (MambaManager: "Mamba can't rely on blocks
    generated by other requests in the current step"), so the hybrid models' batch starts over
    `batch` steps."""
    return 1 + args.decode_steps + args.batch + 4


def time_batch(engine, prompts: list[list[int]], max_tokens: int, decode_steps: int, tag: str) -> dict:
    """Submit `prompts` together, step the engine until all are done, and time `decode_steps`
    pure-decode steps of the whole batch (from the step in which the last sequence got its first
    token, before any has finished) from engine-core step timestamps (client clock as a
    cross-check). `fits` is False where the batch never ran as a whole."""
    from vllm import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True, detokenize=False)
    ids = [f"{tag}-{i}" for i in range(len(prompts))]
    load_before = os.getloadavg()[0]
    t_submit = time.monotonic()
    for rid, p in zip(ids, prompts):
        engine.add_request(rid, {"prompt_token_ids": p}, params)
    counts = dict.fromkeys(ids, 0)
    cached = dict.fromkeys(ids)
    finished: set[str] = set()
    steps = []  # (engine ts, client ts, tokens so far, sequences started, sequences finished)
    preemptions = 0
    while engine.has_unfinished_requests():
        outs = engine.step()
        now = time.monotonic()
        if not outs:
            continue
        ts = [o.metrics.last_token_ts for o in outs if o.metrics is not None and o.metrics.last_token_ts]
        for o in outs:
            counts[o.request_id] = len(o.outputs[0].token_ids)
            if o.num_cached_tokens is not None:
                cached[o.request_id] = int(o.num_cached_tokens)
            if o.finished:
                finished.add(o.request_id)
                if o.metrics is not None:
                    preemptions += o.metrics.num_preemptions
        steps.append((max(ts) if ts else now, now, sum(counts.values()),
                      sum(1 for c in counts.values() if c > 0), len(finished)))
    assert all(c == max_tokens for c in counts.values()), counts
    k = next(i for i, s in enumerate(steps) if s[3] == len(prompts))  # all have a token
    f = next(i for i, s in enumerate(steps) if s[4] > 0)  # the first has finished
    result = {
        "batch": len(prompts), "prompt_len": len(prompts[0]), "max_tokens": max_tokens,
        "num_cached_tokens": [cached[i] for i in ids], "preemptions": preemptions,
        "steps_until_whole_batch": k + 1,
        "fits": k < f and preemptions == 0,
        "loadavg_before": load_before, "loadavg_after": os.getloadavg()[0],
    }
    if not result["fits"]:
        # per step: (sequences with a token, sequences finished, tokens so far)
        result["steps"] = [(s[3], s[4], s[2]) for s in steps]
        return result
    decode = steps[k:min(f, k + decode_steps) + 1]
    n_steps = len(decode) - 1
    tokens = decode[-1][2] - decode[0][2]
    engine_time = decode[-1][0] - decode[0][0]
    client_time = decode[-1][1] - decode[0][1]
    if engine_time <= 0:
        raise ValueError("no pure-decode step to time")
    step_times = sorted(b[0] - a[0] for a, b in zip(decode, decode[1:]))
    median_step = step_times[len(step_times) // 2]
    result.update({
        "decode_steps": n_steps,
        "decode_tokens": tokens,
        "decode_time_s": engine_time,
        "decode_tokens_per_s": tokens / engine_time,
        "decode_tokens_per_s_client_clock": tokens / client_time,
        "decode_tokens_per_s_median_step": len(prompts) / median_step,
        "decode_step_ms_median": 1e3 * median_step,
        "batch_prefill_time_s": steps[k][1] - t_submit,
    })
    return result


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
                _capacity_in_worker, args=(capacity_lengths,), timeout=120)[0]
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


def in_process_engine_env() -> None:
    """Before vLLM and torch load in a child: the engine core in this process, and one OpenMP
    thread, as vLLM's multiprocess CPU engine runs on this 2-core machine (it binds its engine
    to one core and keeps the other for the client). Without it vLLM's C++ ops run two OpenMP
    threads, and on 2 cores shared with other jobs a decode step took 700 ms instead of 30."""
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    os.environ.setdefault("OMP_NUM_THREADS", "1")


def _model_job(kind: str, path: str, args, max_len: int, capacity_lengths: list[int], out: str) -> None:
    """Child process: one engine, in this process (vLLM's multiprocess engine core did not find
    the recurrent states the first prefill cached: the first request of each batch got no
    prefix-cache hit and prefilled the whole prompt again; in-process every request hits)."""
    in_process_engine_env()
    t0 = time.monotonic()
    r = bench_model(kind, Path(path), args, max_len, capacity_lengths)
    r["wall_s"] = time.monotonic() - t0
    Path(out).write_text(json.dumps(r, default=str))


def in_child(target, *args, out: Path) -> dict | None:
    """Run `target(*args, out)` in a fresh spawned process (one engine at a time, all its memory
    returned when it exits); its JSON result, or None if it died."""
    import multiprocessing as mp

    proc = mp.get_context("spawn").Process(target=target, args=(*args, str(out)))
    proc.start()
    proc.join()
    if proc.exitcode != 0 or not out.exists():
        return None
    return json.loads(out.read_text())


# ----- the API bench/kernels_cpu.py uses (the former version of this bench) ---------------


def random_prompts(batch: int, length: int, seed: int) -> list[list[int]]:
    """`batch` independent random prompts of `length` tokens."""
    import torch

    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 151000, (length,), generator=g).tolist() for _ in range(batch)]


def run_batch(engine, prompts: list[list[int]], max_tokens: int, tag: str) -> dict:
    """`time_batch` timing every step after the whole batch has its first token."""
    r = time_batch(engine, prompts, max_tokens, max_tokens, tag)
    if not r["fits"]:
        raise RuntimeError(f"the batch of {len(prompts)} never ran as a whole: {r.get('steps')}")
    return r


def write_model_folders(root: Path, scale: int, max_len: int):
    """Jet and twin folders of the 2B layer pattern with the width divided by `scale`:
    (jet_dir, twin_dir, jet_cfg, twin_cfg, dims)."""
    layout = official_layout(scale)
    dirs, cfgs = write_models(root, layout, max_len, None)
    dims = {k: layout[k] for k in ("hidden_size", "intermediate_size", "num_attention_heads",
                                   "num_key_value_heads", "head_dim")}
    return dirs["jet"], dirs["twin"], cfgs["jet"], cfgs["twin"], dims


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


def context_label(n: int) -> str:
    return f"{n // 1024}K" if n % 1024 == 0 else str(n)


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


def environment() -> dict:
    import torch
    import vllm

    return {"vllm": vllm.__version__, "torch": torch.__version__, "python": sys.version.split()[0],
            "cpu_count": os.cpu_count(), "machine": platform.machine(), "processor": platform.processor(),
            "device": "cuda" if torch.cuda.is_available() else "cpu"}


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layout", default="bench", choices=["bench", "2b"],
                        help="bench (default): hidden 1024, 12 layers; 2b: the official 2B pattern, "
                             "width divided by --scale")
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
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        import decode_profile

        decode_profile.main(args)
        return

    env = environment()
    args.vllm_version = env["vllm"]
    wall0 = time.monotonic()
    max_len = max(args.lengths) + args.suffix_tokens + max_tokens_for(args)
    seq_lens = [n + args.suffix_tokens + max_tokens_for(args) for n in args.lengths]
    layout = bench_layout() if args.layout == "bench" else official_layout(args.scale)
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
