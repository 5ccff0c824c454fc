"""CPU speed of the JetBlock kernels vLLM runs, each as a ratio to a baseline measured
side by side in one run (alternating calls, median over rounds).

    .venv/bin/python bench/kernels_cpu.py                # everything, about 10 minutes
    .venv/bin/python bench/kernels_cpu.py --skip-e2e     # kernels only, about 2 minutes
    .venv/bin/python bench/kernels_cpu.py --threads 2    # torch threads (default 1, see README)

1. Chunked prefill of the gated delta rule (`chunk_gated_delta_rule` of
   `kernels/gated_delta_rule/cpu.py`, the kernel of `gated_delta_rule_prefill`), 4
   sequences of 2048 tokens, 12 heads, K = V = 128 (a shape vLLM's C++ op supports), bf16 q/k/v:
   against the token-by-token PyTorch loop (`naive_recurrent_gated_delta_rule`, the 4
   sequences batched) and vLLM's C++ `chunk_gated_delta_rule_cpu` called as vLLM's
   Qwen3-Next CPU path calls it (q/k/v `[1, T, H, D]` bf16, g float32, beta bf16, float32
   state pool). Also at the JetBlock's own dims (K = 96, V = 256) against the loop.
2. Decode step, batch 64, 12 heads, K = 96, V = 256, bf16 activations, float32 state
   pool: vLLM's C++ `fused_sigmoid_gating_delta_rule_update_cpu` against the PyTorch step
   (`fused_recurrent_gated_delta_rule_from_gates`) and against what the vLLM model runs
   (`kernels.dispatch.gated_delta_rule_step`, which calls the C++ op for such steps).
3. Dynamic causal conv prefill (`kernels.dispatch.dynamic_conv_prefill`, on the CPU
   `dynamic_causal_conv`), 2048 tokens, V = 3072 channels, W = 4, in bf16 (what vLLM
   serves) and float32: against the unfold-based definition (`dynamic_causal_conv_naive`).
4. End to end (unless --skip-e2e): vLLM bf16 decode tokens/s of the Jet-Nemotron-2B layer
   pattern at hidden 1536 / --scale with dummy weights, with the C++ decode op and without
   it (`JETNEMOTRON_CPU_DECODE_OP=0`), one engine after the other.

Writes bench/results/kernels_cpu.json (every timing, the settings, the machine) and prints
a markdown table.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")  # collective_rpc of a local function

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from decode_engine import official_layout, time_batch, write_models  # noqa: E402

RESULTS_DIR = Path(__file__).resolve().parent / "results"
TARGETS = {  # benchmark -> (baseline it is compared with, required ratio, "ours faster" or "within")
    "prefill_vs_loop": ("token-by-token loop", 5.0, "faster"),
    "prefill_vs_cpp": ("vLLM C++ chunk_gated_delta_rule_cpu", 2.0, "within"),
    "decode_vs_cpp": ("vLLM C++ fused_sigmoid_gating_delta_rule_update_cpu", 1.5, "within"),
    "conv_vs_unfold": ("unfold-based definition", 3.0, "faster"),
}


# ----- machine -----------------------------------------------------------------------------


def machine() -> dict:
    model = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    flags = torch.backends.cpu.get_cpu_capability()
    import vllm

    return {
        "cpu": model,
        "logical_cpus": os.cpu_count(),
        "torch_cpu_capability": flags,
        "amx": bool(torch.cpu._is_amx_tile_supported()),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "vllm": getattr(vllm, "__version__", "?"),
        "torch_threads": torch.get_num_threads(),
    }


# ----- allocator and timing ----------------------------------------------------------------

_LIBC = ctypes.CDLL("libc.so.6") if platform.system() == "Linux" else None


def _keep_freed_memory() -> None:
    """glibc: serve every allocation from the heap and keep freed memory, so that a large
    temporary reuses pages already mapped (what a long-running server's heap, or the
    tcmalloc vLLM's CPU platform preloads when it is bundled, does). Without it, every
    temporary above 32 MiB is a fresh mmap whose first touch page-faults, which on this VM
    costs about as much as the computation; the unfold-based baselines pay that, the
    blocked kernels do not."""
    if _LIBC is not None:
        _LIBC.mallopt(-3, 1 << 30)  # M_MMAP_THRESHOLD
        _LIBC.mallopt(-1, 1 << 31)  # M_TRIM_THRESHOLD


def _release_free_memory() -> None:
    if _LIBC is not None:
        _LIBC.malloc_trim(0)



def side_by_side(fns: dict, rounds: int, before=None) -> dict:
    """Times each function once per round, the functions one after another within a round
    (after one warm-up call each; `before()`, untimed, ahead of every call). Returns
    name -> list of seconds."""
    for fn in fns.values():
        fn()
    times = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            if before is not None:
                before()
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return times


def ratio_entry(times: dict, ours: str, baseline: str, key: str | None = None, **shape) -> dict:
    """Median time of each side and the median over rounds of baseline / ours (> 1: ours
    faster) and ours / baseline."""
    per_round = [b / o for o, b in zip(times[ours], times[baseline])]
    entry = {
        "ours": ours, "baseline": baseline, "shape": shape,
        "ours_ms": 1e3 * statistics.median(times[ours]),
        "baseline_ms": 1e3 * statistics.median(times[baseline]),
        "speedup": statistics.median(per_round),
        "ours_over_baseline": statistics.median(1 / r for r in per_round),
        "speedup_per_round": per_round,
        "ours_s": times[ours], "baseline_s": times[baseline],
    }
    if key is not None:
        name, required, kind = TARGETS[key]
        entry["target"] = (f">= {required:g}x faster than the {name}" if kind == "faster"
                           else f"within {required:g}x of the {name}")
        entry["met"] = (entry["speedup"] >= required if kind == "faster"
                        else entry["ours_over_baseline"] <= required)
    return entry


# ----- 1. chunked prefill ------------------------------------------------------------------


def gdn_inputs(num_tokens: int, H: int, K: int, V: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(num_tokens, H, K, generator=g).bfloat16()
    k = torch.randn(num_tokens, H, K, generator=g).bfloat16()
    v = torch.randn(num_tokens, H, V, generator=g).bfloat16()
    decay = F.logsigmoid(torch.randn(num_tokens, H, generator=g) + 3.0)  # log-decay, float32
    beta = torch.rand(num_tokens, H, generator=g)
    return q, k, v, decay, beta


def bench_prefill(rounds: int, loop_rounds: int) -> dict:
    import vllm._custom_ops as ops

    from vllm_jetnemotron.kernels import naive_recurrent_gated_delta_rule
    from vllm_jetnemotron.kernels.gated_delta_rule.cpu import chunk_gated_delta_rule

    B, L, H = 4, 2048, 12
    results = {}
    for K, V, with_cpp in [(128, 128, True), (96, 256, False)]:
        q, k, v, g, beta = gdn_inputs(B * L, H, K, V, seed=K + V)
        cu = torch.arange(B + 1, dtype=torch.int32) * L
        slots = torch.tensor([5, 1, 3, 6], dtype=torch.int32)
        fresh = torch.zeros(B, dtype=torch.bool)
        pool = torch.zeros(8, H, K, V)
        beta_bf16 = beta.bfloat16()
        # [B * L, ...] -> [B, L, ...] for the batched token loop
        qb, kb, vb, gb, bb = (x.view(B, L, *x.shape[1:]) for x in (q, k, v, g, beta))

        def ours():
            chunk_gated_delta_rule(q, k, v, g, beta, cu, pool, slots, fresh)

        def loop():
            naive_recurrent_gated_delta_rule(qb, kb, vb, gb, bb, output_final_state=True)

        def cpp():
            pool[slots.long()] = 0  # vLLM zeroes the slots of sequences without a state
            ops.chunk_gated_delta_rule_cpu(
                query=q[None], key=k[None], value=v[None], g=g[None], beta=beta_bf16[None],
                initial_state=pool, output_final_state=True, cu_seqlens=cu, head_first=False,
                use_qk_l2norm_in_kernel=True, initial_state_indices=slots)

        shape = dict(sequences=B, tokens_per_sequence=L, heads=H, K=K, V=V, dtype="bfloat16")
        print(f"prefill K={K} V={V}: timing ...", flush=True)
        if with_cpp:
            times = side_by_side({"chunk_gated_delta_rule": ours, "cpp": cpp}, rounds)
            results["prefill_vs_cpp"] = ratio_entry(times, "chunk_gated_delta_rule", "cpp", "prefill_vs_cpp",
                                                    **shape)
            times = side_by_side({"chunk_gated_delta_rule": ours, "token_loop": loop}, loop_rounds)
            results["prefill_vs_loop"] = ratio_entry(times, "chunk_gated_delta_rule", "token_loop",
                                                     "prefill_vs_loop", **shape)
        else:
            times = side_by_side({"chunk_gated_delta_rule": ours, "token_loop": loop}, loop_rounds)
            results["prefill_vs_loop_jetblock_dims"] = ratio_entry(times, "chunk_gated_delta_rule", "token_loop",
                                                                   **shape)
    return results


# ----- 2. decode step ------------------------------------------------------------------------


def bench_decode(rounds: int) -> dict:
    import vllm._custom_ops as ops

    from vllm_jetnemotron.kernels import gated_delta_rule_step
    from vllm_jetnemotron.kernels.gated_delta_rule import cpu as gdr_cpu

    N, H, K, V = 64, 12, 96, 256
    g = torch.Generator().manual_seed(0)
    q, k = (F.silu(torch.randn(N, H, K, generator=g)).bfloat16() for _ in range(2))
    v = torch.randn(N, H, V, generator=g).bfloat16()
    a, b = (torch.randn(N, H, generator=g).bfloat16() for _ in range(2))
    A_log = torch.rand(H, generator=g).mul(15).add(1).log()
    dt_bias = torch.randn(H, generator=g)
    pool = 0.1 * torch.randn(N + 16, H, K, V, generator=g)
    slots = torch.randperm(N + 16, generator=g)[:N].to(torch.int32)
    cu = torch.arange(N + 1, dtype=torch.int32)
    dt_bias_bf16 = dt_bias.bfloat16()
    assert gdr_cpu._cpu_decode_op(q, k, v, a, b, pool, slots) is not None, "the C++ decode op is not available"

    def cpp():
        ops.fused_sigmoid_gating_delta_rule_update_cpu(
            A_log=A_log, dt_bias=dt_bias_bf16, q=q[None], k=k[None], v=v[None], a=a, b=b,
            initial_state_source=pool, initial_state_indices=slots, cu_seqlens=cu, use_qk_l2norm_in_kernel=True)

    def pytorch_step():
        # [N, ...] -> [N, 1, ...]: one token per sequence
        gdr_cpu.fused_recurrent_gated_delta_rule_from_gates(
            q[:, None], k[:, None], v[:, None], a[:, None], b[:, None], A_log, dt_bias, pool, slots)

    def vllm_model_path():
        gated_delta_rule_step(q, k, v, a, b, A_log, dt_bias, pool, slots)

    print("decode: timing ...", flush=True)
    times = side_by_side({"pytorch_step": pytorch_step, "dispatch": vllm_model_path, "cpp": cpp}, rounds)
    shape = dict(batch=N, heads=H, K=K, V=V, dtype="bfloat16", state="float32")
    return {
        "decode_pytorch_vs_cpp": ratio_entry(times, "pytorch_step", "cpp", **shape),
        "decode_vs_cpp": ratio_entry(times, "dispatch", "cpp", "decode_vs_cpp", **shape),
    }


# ----- 3. dynamic conv -----------------------------------------------------------------------


def bench_conv(rounds: int) -> dict:
    from vllm_jetnemotron.kernels import dynamic_causal_conv_naive, dynamic_conv_prefill

    T, D, W = 2048, 3072, 4
    results = {}
    for dtype, heap in ((torch.bfloat16, "warm"), (torch.bfloat16, "fresh"), (torch.float32, "warm")):
        g = torch.Generator().manual_seed(1)
        x = torch.randn(T, D, generator=g).to(dtype)
        kernels = torch.randn(T, D, W, generator=g).to(dtype)
        cu = torch.tensor([0, T])
        pool = torch.zeros(2, W - 1, D, dtype=dtype)
        slot, fresh = torch.tensor([1]), torch.tensor([False])
        def ours():
            dynamic_conv_prefill(x, kernels, cu, pool, slot, fresh)

        def unfold():
            dynamic_causal_conv_naive(x[None], kernels[None])

        name = str(dtype).removeprefix("torch.")
        print(f"dynamic conv {name}, {heap} heap: timing ...", flush=True)
        # "fresh": the process gives its free memory back before every call, so large
        # temporaries are mapped (and page-faulted) anew, as in a process that just started
        times = side_by_side({"dynamic_causal_conv": ours, "unfold": unfold}, rounds,
                             before=_release_free_memory if heap == "fresh" else None)
        key = {("bfloat16", "warm"): "conv_vs_unfold", ("bfloat16", "fresh"): "conv_vs_unfold_fresh_heap",
               ("float32", "warm"): "conv_vs_unfold_float32"}[name, heap]
        results[key] = ratio_entry(times, "dynamic_causal_conv", "unfold",
                                   "conv_vs_unfold" if key == "conv_vs_unfold" else None,
                                   tokens=T, channels=D, window=W, dtype=name, heap=heap)
    return results


# ----- 4. end to end -------------------------------------------------------------------------


def random_prompts(batch: int, length: int, seed: int) -> list[list[int]]:
    """`batch` independent random prompts of `length` tokens."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 151000, (length,), generator=g).tolist() for _ in range(batch)]


def run_batch(engine, prompts: list[list[int]], max_tokens: int, tag: str) -> dict:
    """`time_batch` timing every step after the whole batch has its first token."""
    r = time_batch(engine, prompts, max_tokens, max_tokens, tag)
    if not r["fits"]:
        raise RuntimeError(f"the batch of {len(prompts)} never ran as a whole: {r.get('steps')}")
    return r


def _decode_path_in_worker(worker) -> dict:
    """Runs inside the vLLM worker: whether the JetBlocks' decode steps qualify for the C++
    op (recurrent state dtype, op present, environment switch)."""
    import os as _os

    import torch as _torch

    from vllm_jetnemotron.kernels.gated_delta_rule import cpu as _gdr_cpu
    from vllm_jetnemotron.jet_block import JetBlock

    model = worker.model_runner.model
    block = next(m for m in model.modules() if isinstance(m, JetBlock))
    conv_state, recurrent_state = block.kv_cache
    return {
        "recurrent_state_dtype": str(recurrent_state.dtype),
        "op_present": hasattr(_torch.ops._C, _gdr_cpu._CPU_DECODE_OP),
        "env": _os.environ.get(_gdr_cpu.CPU_DECODE_OP_ENV, "(unset)"),
        "model_dtype": str(worker.vllm_config.model_config.dtype),
    }


def bench_end_to_end(args) -> dict:
    from vllm import LLM

    results = {"scale": args.scale, "batch": args.e2e_batch, "prompt_len": args.e2e_prompt_len,
               "decode_tokens": args.e2e_decode_tokens, "runs": {}}
    with tempfile.TemporaryDirectory() as tmp:
        layout = official_layout(args.scale)  # the 2B layer pattern, width divided by --scale
        jet_dir = write_models(Path(tmp), layout, 4096, None)[0]["jet"]
        results["dims"] = {k: layout[k] for k in ("hidden_size", "intermediate_size", "num_attention_heads",
                                                  "num_key_value_heads", "head_dim")}
        for label, switch in (("cpp_decode_op", "1"), ("pytorch_decode_step", "0")):
            os.environ["JETNEMOTRON_CPU_DECODE_OP"] = switch  # inherited by the engine's processes
            print(f"\n=== end to end, {label}: starting vLLM ===", flush=True)
            llm = LLM(model=str(jet_dir), dtype="bfloat16", load_format="dummy", kv_cache_memory_bytes=args.kv_bytes,
                      max_model_len=4096, max_num_seqs=args.e2e_batch, enforce_eager=True,
                      enable_prefix_caching=False, seed=0)
            try:
                run = {"worker": llm.collective_rpc(_decode_path_in_worker, timeout=60)[0], "batches": []}
                engine = llm.llm_engine
                run_batch(engine, random_prompts(args.e2e_batch, 16, seed=7), 4, f"{label}-warmup")
                for rep in range(args.e2e_repeats):
                    prompts = random_prompts(args.e2e_batch, args.e2e_prompt_len, seed=100 + rep)
                    r = run_batch(engine, prompts, args.e2e_decode_tokens, f"{label}-{rep}")
                    run["batches"].append(r)
                    print(f"[{label}] rep {rep}: {r['decode_tokens_per_s']:.1f} tok/s, median step "
                          f"{r['decode_step_ms_median']:.1f} ms, load {r['loadavg_after']:.2f}", flush=True)
                results["runs"][label] = run
            finally:
                llm.llm_engine.engine_core.shutdown()
                del llm
        os.environ.pop("JETNEMOTRON_CPU_DECODE_OP", None)
    for label, run in results["runs"].items():
        run["decode_tokens_per_s"] = statistics.median(b["decode_tokens_per_s"] for b in run["batches"])
        run["decode_tokens_per_s_median_step"] = statistics.median(
            b["decode_tokens_per_s_median_step"] for b in run["batches"])
    fast, slow = results["runs"]["cpp_decode_op"], results["runs"]["pytorch_decode_step"]
    results["decode_gain"] = fast["decode_tokens_per_s"] / slow["decode_tokens_per_s"]
    results["decode_gain_median_step"] = (fast["decode_tokens_per_s_median_step"]
                                          / slow["decode_tokens_per_s_median_step"])
    return results


# ----- report --------------------------------------------------------------------------------


def table(results: dict, e2e: dict | None, command: str, info: dict) -> str:
    rows = [
        ("Chunked prefill (4 x 2048 tokens, 12 heads, K = V = 128, bf16)", "prefill_vs_loop"),
        ("Chunked prefill (4 x 2048 tokens, 12 heads, K = V = 128, bf16)", "prefill_vs_cpp"),
        ("Chunked prefill at JetBlock dims (4 x 2048, 12 heads, K = 96, V = 256, bf16)",
         "prefill_vs_loop_jetblock_dims"),
        ("Decode step, PyTorch (batch 64, 12 heads, K = 96, V = 256, bf16, fp32 state)", "decode_pytorch_vs_cpp"),
        ("Decode step as the vLLM model runs it (`kernels.dispatch`, same shape)", "decode_vs_cpp"),
        ("Dynamic conv (2048 tokens, V = 3072, W = 4, bf16)", "conv_vs_unfold"),
        ("Dynamic conv (same, bf16), fresh heap: temporaries page-faulted", "conv_vs_unfold_fresh_heap"),
        ("Dynamic conv (same, float32)", "conv_vs_unfold_float32"),
    ]
    lines = [
        "| kernel | ours (ms) | baseline | baseline (ms) | ours vs baseline | target | met |",
        "|---|---:|---|---:|---:|---|---|",
    ]
    for label, key in rows:
        r = results[key]
        if r["speedup"] >= 1:
            rel = f"{r['speedup']:.2f}x faster"
        else:
            rel = f"{r['ours_over_baseline']:.2f}x slower"
        met = "" if "met" not in r else ("yes" if r["met"] else "**no**")
        lines.append(f"| {label} | {r['ours_ms']:.1f} | {r['baseline']} | {r['baseline_ms']:.1f} | {rel} | "
                     f"{r.get('target', '-')} | {met} |")
    if e2e is not None:
        fast, slow = e2e["runs"]["cpp_decode_op"], e2e["runs"]["pytorch_decode_step"]
        lines += [
            "",
            f"End to end, vLLM bf16 decode of the 2B layer pattern at hidden {e2e['dims']['hidden_size']} "
            f"(dummy weights, batch {e2e['batch']}, {e2e['prompt_len']}-token prompts, "
            f"{e2e['decode_tokens']} new tokens, prefix caching off):",
            "",
            "| decode step of the JetBlocks | decode tokens/s | from the median step |",
            "|---|---:|---:|",
            f"| PyTorch (`JETNEMOTRON_CPU_DECODE_OP=0`) | {slow['decode_tokens_per_s']:.1f} | "
            f"{slow['decode_tokens_per_s_median_step']:.1f} |",
            f"| vLLM C++ op (default) | {fast['decode_tokens_per_s']:.1f} | "
            f"{fast['decode_tokens_per_s_median_step']:.1f} |",
            f"| gain | {e2e['decode_gain']:.2f}x | {e2e['decode_gain_median_step']:.2f}x |",
        ]
    lines += ["", f"Command: `{command}`; machine: {info['cpu']}, {info['logical_cpus']} logical CPUs "
              f"(shared), torch {info['torch']} with {info['torch_threads']} thread(s), vllm {info['vllm']}."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads for the kernel timings (default 1: see bench/README.md)")
    parser.add_argument("--rounds", type=int, default=7, help="rounds of the fast kernels (median reported)")
    parser.add_argument("--loop-rounds", type=int, default=3, help="rounds against the token-by-token loop")
    parser.add_argument("--skip-e2e", action="store_true", help="kernels only, no vLLM engines")
    parser.add_argument("--scale", type=int, default=4, choices=[1, 2, 4],
                        help="end to end: hidden 1536 / scale (JetBlock dims unchanged)")
    parser.add_argument("--e2e-batch", type=int, default=16)
    parser.add_argument("--e2e-prompt-len", type=int, default=64)
    parser.add_argument("--e2e-decode-tokens", type=int, default=32)
    parser.add_argument("--e2e-repeats", type=int, default=2)
    parser.add_argument("--kv-bytes", type=int, default=1 << 30, help="end to end: KV/state budget per engine")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR)
    args = parser.parse_args(argv)
    command = " ".join([".venv/bin/python", "bench/kernels_cpu.py", *(argv if argv is not None else sys.argv[1:])])

    import vllm  # noqa: F401  (loads vLLM's C++ ops)

    torch.set_num_threads(args.threads)
    _keep_freed_memory()
    info = machine()
    load_before = os.getloadavg()
    results = {}
    results.update(bench_prefill(args.rounds, args.loop_rounds))
    results.update(bench_decode(4 * args.rounds))
    results.update(bench_conv(2 * args.rounds))
    load_after = os.getloadavg()
    e2e = None if args.skip_e2e else bench_end_to_end(args)

    report = table(results, e2e, command, info)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "kernels_cpu.json"
    path.write_text(json.dumps({
        "command": command, "machine": info, "loadavg_before": load_before, "loadavg_after": load_after,
        "kernels": results, "end_to_end": e2e, "table": report}, indent=2))
    print("\n" + report)
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
