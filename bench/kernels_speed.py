"""Speed of the JetBlock's kernel operations on the CPU (default) or a CUDA GPU: the
implementations of each operation timed side by side in one process (alternating calls,
median over rounds).

    .venv/bin/python bench/kernels_speed.py                   # CPU: everything, about 10 minutes
    .venv/bin/python bench/kernels_speed.py --skip-e2e        # CPU kernels only, about 2 minutes
    .venv/bin/python bench/kernels_speed.py --threads 2       # torch threads (default 1, see README)
    .venv/bin/python bench/kernels_speed.py --device cuda     # needs a CUDA GPU and triton
    .venv/bin/python bench/kernels_speed.py --device cuda --rounds 50

Operations (bf16 unless said; gated-delta-rule states in float32 pools):
1. chunked prefill of the gated delta rule, 4 sequences of 2048 tokens, 12 heads, at
   K = V = 128 (a shape vLLM's C++ op accepts) and at the JetBlock's K = 96, V = 256;
2. decode step from the raw gates, batch 64, 12 heads, K = 96, V = 256;
3. dynamic causal conv prefill, 2048 tokens, V = 3072 channels, W = 4 (on the CPU also in
   float32, and in bf16 with the heap given back before every call); on CUDA also its
   decode step, batch 64;
4. on CUDA, gated RMSNorm over `[2048, 12, 256]` (tokens, heads, V).

Implementations, by the names the results use: `pytorch`, the PyTorch implementation of
`kernels/*/cpu.py` (what vLLM runs on the CPU; it runs on CUDA tensors too; for gated
RMSNorm, whose CPU path is its definition, `gated_rmsnorm_naive`); `triton`, the Triton
kernel; `dispatch`, the `kernels.dispatch` entry the vLLM model calls; `cpp`, vLLM's C++
CPU op called as vLLM's Qwen3-Next CPU path calls it; `token_loop` and `unfold`, the
definitions (`naive_recurrent_gated_delta_rule`, `dynamic_causal_conv_naive`).

--device cpu: ratios to baselines, against the targets of `TARGETS`: prefill `pytorch` vs
`cpp` (K = V = 128) and vs `token_loop` (both shapes), decode `pytorch` and `dispatch`
(which calls the C++ op for such steps) vs `cpp`, conv `pytorch` vs `unfold`; timed with
perf_counter. Then, unless --skip-e2e, vLLM bf16 decode tokens/s of the Jet-Nemotron-2B
layer pattern at hidden 1536 / --scale with dummy weights, with the C++ decode op and
without it (`JETNEMOTRON_CPU_DECODE_OP=0`), one engine after the other.

--device cuda: `triton` vs `pytorch` on the same CUDA tensors (and vs `token_loop` /
`unfold` for the prefills), timed with CUDA events. Without a CUDA device or triton it stops
with an error and writes nothing.

Writes bench/results/kernels_speed_<device>.json (every timing, the settings, the machine)
and prints a markdown table.
"""

from __future__ import annotations

import argparse
import ctypes
import importlib
import importlib.util
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

os.environ.setdefault("VLLM_ALLOW_INSECURE_SERIALIZATION", "1")  # collective_rpc of a local function

import torch  # noqa: E402
from decode_engine import official_layout, time_batch, write_models  # noqa: E402
from kernel_checks import cu_seqlens, gate_inputs, gdn_inputs, generator, random_pool  # noqa: E402

RESULTS_DIR = Path(__file__).resolve().parent / "results"
DEFAULT_ROUNDS = {"cpu": 7, "cuda": 20}
WARMUP_CALLS = 2  # untimed calls of each implementation before its timed rounds
TARGETS = {  # CPU benchmark -> (baseline it is compared with, required ratio, "ours faster" or "within")
    "prefill_vs_loop": ("token-by-token loop", 5.0, "faster"),
    "prefill_vs_cpp": ("vLLM C++ chunk_gated_delta_rule_cpu", 2.0, "within"),
    "decode_vs_cpp": ("vLLM C++ fused_sigmoid_gating_delta_rule_update_cpu", 1.5, "within"),
    "conv_vs_unfold": ("unfold-based definition", 3.0, "faster"),
}


# ----- machine -----------------------------------------------------------------------------


def machine(device: str) -> dict:
    """Versions and hardware of this run: the CPU always, the GPU, CUDA and triton on CUDA,
    the CPU's capabilities and vLLM on the CPU."""
    model = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {"cpu": model, "logical_cpus": os.cpu_count(), "python": platform.python_version(),
            "torch": torch.__version__, "torch_threads": torch.get_num_threads()}
    if device == "cuda":
        import triton

        info.update(gpu=torch.cuda.get_device_name(), cuda=torch.version.cuda, triton=triton.__version__)
    else:
        import vllm

        info.update(torch_cpu_capability=torch.backends.cpu.get_cpu_capability(),
                    amx=bool(torch.cpu._is_amx_tile_supported()), vllm=getattr(vllm, "__version__", "?"))
    return info


def machine_line(command: str, info: dict) -> str:
    if "gpu" in info:
        where = f"GPU: {info['gpu']}, torch {info['torch']}, CUDA {info['cuda']}, triton {info['triton']}"
    else:
        where = (f"machine: {info['cpu']}, {info['logical_cpus']} logical CPUs (shared), torch {info['torch']} "
                 f"with {info['torch_threads']} thread(s), vllm {info['vllm']}")
    return f"Command: `{command}`; {where}."


def require_cuda() -> None:
    """Stops, writing nothing, where --device cuda cannot run: no CUDA device or no triton."""
    if not torch.cuda.is_available():
        sys.exit("bench/kernels_speed.py --device cuda needs a CUDA GPU: torch.cuda.is_available() is False on "
                 f"this machine (torch {torch.__version__}). For the CPU kernels run it without --device.")
    if importlib.util.find_spec("triton") is None:
        sys.exit("bench/kernels_speed.py --device cuda needs triton (pip install triton); it is not importable here.")


# ----- allocator (CPU) ---------------------------------------------------------------------

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


# ----- timing --------------------------------------------------------------------------------


def time_on_cpu(fn: Callable[[], object]) -> float:
    """Seconds of one call, wall clock."""
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def time_on_cuda(fn: Callable[[], object]) -> float:
    """Seconds of one call on the current CUDA device, between two CUDA events."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / 1e3


class Case(NamedTuple):
    """One operation at one shape, its inputs built on a device: `impls`, the calls of each
    implementation that device has, by name."""

    label: str
    shape: dict
    impls: dict[str, Callable[[], object]]


def side_by_side(case: Case, names: tuple[str, ...], rounds: int, time_call, before=None) -> dict[str, list[float]]:
    """Times the implementations `names` of `case` alternately: `WARMUP_CALLS` untimed calls
    each, then per round one call of each in turn (`before()`, untimed, ahead of every
    timed call). Returns name -> seconds per round."""
    print(f"{case.label}: {' vs '.join(names)} ...", flush=True)
    for name in names:
        for _ in range(WARMUP_CALLS):
            case.impls[name]()
    times = {name: [] for name in names}
    for _ in range(rounds):
        for name in names:
            if before is not None:
                before()
            times[name].append(time_call(case.impls[name]))
    return times


# ----- the operations ------------------------------------------------------------------------


def prefill_case(device: torch.device, K: int, V: int, B: int = 4, L: int = 2048, H: int = 12) -> Case:
    """Chunked prefill of B sequences of L tokens, no initial states, final states to a pool."""
    from vllm_jetnemotron.kernels.gated_delta_rule import cpu as gdr_cpu
    from vllm_jetnemotron.kernels.gated_delta_rule.naive import naive_recurrent_gated_delta_rule

    q, k, v, g, beta = gdn_inputs((B * L,), H, K, V, torch.bfloat16, generator(K + V), device)  # [B * L, H, ...]
    cu = cu_seqlens([L] * B, device)
    pool = torch.zeros(8, H, K, V, device=device)
    slots = torch.tensor([5, 1, 3, 6], dtype=torch.int32, device=device)
    fresh = torch.zeros(B, dtype=torch.bool, device=device)
    packed = (q, k, v, g, beta, cu, pool, slots, fresh)
    # [B * L, ...] -> [B, L, ...] for the batched token loop
    qb, kb, vb, gb, bb = (x.view(B, L, *x.shape[1:]) for x in (q, k, v, g, beta))
    impls = {
        "pytorch": lambda: gdr_cpu.chunk_gated_delta_rule(*packed),
        "token_loop": lambda: naive_recurrent_gated_delta_rule(qb, kb, vb, gb, bb, output_final_state=True),
    }
    if device.type == "cuda":
        from vllm_jetnemotron.kernels.gated_delta_rule import triton_chunk

        impls["triton"] = lambda: triton_chunk.chunk_gated_delta_rule(*packed)
    elif K == V and K in (64, 128):  # the only head dims vLLM's C++ op accepts
        import vllm._custom_ops as ops

        beta_bf16 = beta.bfloat16()

        def cpp():
            pool[slots.long()] = 0  # vLLM zeroes the slots of sequences without a state
            # [B * L, ...] -> [1, B * L, ...]: one packed batch
            ops.chunk_gated_delta_rule_cpu(
                query=q[None], key=k[None], value=v[None], g=g[None], beta=beta_bf16[None],
                initial_state=pool, output_final_state=True, cu_seqlens=cu, head_first=False,
                use_qk_l2norm_in_kernel=True, initial_state_indices=slots)

        impls["cpp"] = cpp
    return Case(f"chunked prefill, {B} x {L} tokens, {H} heads, K = {K}, V = {V}, bf16",
                dict(sequences=B, tokens_per_sequence=L, heads=H, K=K, V=V, dtype="bfloat16"), impls)


def decode_case(device: torch.device, N: int = 64, H: int = 12, K: int = 96, V: int = 256) -> Case:
    """Decode step of N sequences from the raw gates, states updated in a pool of N + 16 slots."""
    from vllm_jetnemotron.kernels.gated_delta_rule import cpu as gdr_cpu

    gen = generator(0)
    q, k, v, _, _ = gdn_inputs((N,), H, K, V, torch.bfloat16, gen, device)  # [N, H, K], [N, H, V]
    a, b, A_log, dt_bias = gate_inputs((N,), H, torch.bfloat16, gen, device)  # a, b [N, H]
    pool = random_pool(N + 16, H, K, V, gen, device)
    slots = torch.randperm(N + 16, generator=gen)[:N].to(device=device, dtype=torch.int32)
    # [N, ...] -> [N, 1, ...]: one token per sequence
    step = (q[:, None], k[:, None], v[:, None], a[:, None], b[:, None], A_log, dt_bias, pool, slots)
    impls = {"pytorch": lambda: gdr_cpu.fused_recurrent_gated_delta_rule_from_gates(*step)}
    if device.type == "cuda":
        from vllm_jetnemotron.kernels.gated_delta_rule import triton_fused_recurrent

        impls["triton"] = lambda: triton_fused_recurrent.fused_recurrent_gated_delta_rule_from_gates(*step)
    else:
        import vllm._custom_ops as ops

        from vllm_jetnemotron.kernels import gated_delta_rule_step

        assert gdr_cpu._cpu_decode_op(q, k, v, a, b, pool, slots) is not None, "the C++ decode op is not available"
        cu = torch.arange(N + 1, dtype=torch.int32)
        dt_bias_bf16 = dt_bias.bfloat16()  # the op takes it in the activation dtype
        impls["dispatch"] = lambda: gated_delta_rule_step(q, k, v, a, b, A_log, dt_bias, pool, slots)
        # [N, ...] -> [1, N, ...]: one packed batch of one-token sequences
        impls["cpp"] = lambda: ops.fused_sigmoid_gating_delta_rule_update_cpu(
            A_log=A_log, dt_bias=dt_bias_bf16, q=q[None], k=k[None], v=v[None], a=a, b=b,
            initial_state_source=pool, initial_state_indices=slots, cu_seqlens=cu, use_qk_l2norm_in_kernel=True)
    return Case(f"decode step from the gates, batch {N}, {H} heads, K = {K}, V = {V}, bf16",
                dict(batch=N, heads=H, K=K, V=V, dtype="bfloat16", state="float32"), impls)


def conv_prefill_case(device: torch.device, dtype: torch.dtype, T: int = 2048, D: int = 3072, W: int = 4) -> Case:
    """Dynamic causal conv prefill of one sequence of T tokens, no history."""
    from vllm_jetnemotron.kernels.dynamic_conv import cpu as conv_cpu
    from vllm_jetnemotron.kernels.dynamic_conv.naive import dynamic_causal_conv_naive

    gen = generator(1)
    x = torch.randn(T, D, generator=gen).to(device=device, dtype=dtype)
    kernels = torch.randn(T, D, W, generator=gen).to(device=device, dtype=dtype)
    cu = cu_seqlens([T], device)
    pool = torch.zeros(2, W - 1, D, dtype=dtype, device=device)
    slot = torch.ones(1, dtype=torch.int32, device=device)
    fresh = torch.zeros(1, dtype=torch.bool, device=device)
    impls = {
        "pytorch": lambda: conv_cpu.dynamic_causal_conv(x, kernels, cu, pool, slot, fresh),
        "unfold": lambda: dynamic_causal_conv_naive(x[None], kernels[None]),  # [T, ...] -> [1, T, ...]
    }
    if device.type == "cuda":
        from vllm_jetnemotron.kernels.dynamic_conv import triton_conv

        # the length known on the host, as vLLM passes it
        impls["triton"] = lambda: triton_conv.dynamic_causal_conv(x, kernels, cu, pool, slot, fresh, max_seqlen=T)
    name = str(dtype).removeprefix("torch.")
    return Case(f"dynamic conv prefill, {T} tokens, V = {D}, W = {W}, {name}",
                dict(tokens=T, channels=D, window=W, dtype=name), impls)


def conv_step_case(device: torch.device, N: int = 64, D: int = 3072, W: int = 4) -> Case:
    """Dynamic causal conv decode step of N sequences, histories shifted in a pool."""
    from vllm_jetnemotron.kernels.dynamic_conv import cpu as conv_cpu

    gen = generator(2)
    x = torch.randn(N, D, generator=gen).to(device=device, dtype=torch.bfloat16)
    kernels = torch.randn(N, D, W, generator=gen).to(device=device, dtype=torch.bfloat16)
    pool = torch.zeros(N, W - 1, D, dtype=torch.bfloat16, device=device)
    slots = torch.arange(N, dtype=torch.int32, device=device)
    impls = {"pytorch": lambda: conv_cpu.dynamic_causal_conv_step(x, kernels, pool, slots)}
    if device.type == "cuda":
        from vllm_jetnemotron.kernels.dynamic_conv import triton_conv

        impls["triton"] = lambda: triton_conv.dynamic_causal_conv_step(x, kernels, pool, slots)
    return Case(f"dynamic conv decode step, batch {N}, V = {D}, W = {W}, bf16",
                dict(batch=N, channels=D, window=W, dtype="bfloat16"), impls)


def gated_rmsnorm_case(device: torch.device, T: int = 2048, H: int = 12, V: int = 256) -> Case:
    """Gated RMSNorm over `[T, H, V]`."""
    from vllm_jetnemotron.kernels.gated_rmsnorm.naive import gated_rmsnorm_naive

    gen = generator(3)
    x, z = (torch.randn(T, H, V, generator=gen).to(device=device, dtype=torch.bfloat16) for _ in range(2))
    weight = torch.rand(V, generator=gen).to(device)
    impls = {"pytorch": lambda: gated_rmsnorm_naive(x, z, weight, 1e-5)}
    if device.type == "cuda":
        from vllm_jetnemotron.kernels.gated_rmsnorm import triton_norm

        impls["triton"] = lambda: triton_norm.gated_rmsnorm(x, z, weight, 1e-5)
    return Case(f"gated RMSNorm, [{T}, {H}, {V}], bf16", dict(tokens=T, heads=H, V=V, dtype="bfloat16"), impls)


# ----- CPU: ratios to the baselines ----------------------------------------------------------


def ratio_entry(times: dict, ours: str, baseline: str, shape: dict, target: str | None = None) -> dict:
    """Median time of each side and the median over rounds of baseline / ours (> 1: ours
    faster) and ours / baseline; with `target` (a `TARGETS` key), whether it is met."""
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
    if target is not None:
        name, required, kind = TARGETS[target]
        entry["target"] = (f">= {required:g}x faster than the {name}" if kind == "faster"
                           else f"within {required:g}x of the {name}")
        entry["met"] = (entry["speedup"] >= required if kind == "faster"
                        else entry["ours_over_baseline"] <= required)
    return entry


def cpu_kernels(rounds: int, loop_rounds: int) -> dict:
    """The CPU ratio entries by key: `rounds` rounds (4x for the decode step, 2x for the
    conv), `loop_rounds` against the token loop."""
    cpu = torch.device("cpu")
    results = {}
    prefill = prefill_case(cpu, K=128, V=128)
    results["prefill_vs_cpp"] = ratio_entry(side_by_side(prefill, ("pytorch", "cpp"), rounds, time_on_cpu),
                                            "pytorch", "cpp", prefill.shape, "prefill_vs_cpp")
    results["prefill_vs_loop"] = ratio_entry(
        side_by_side(prefill, ("pytorch", "token_loop"), loop_rounds, time_on_cpu),
        "pytorch", "token_loop", prefill.shape, "prefill_vs_loop")
    prefill = prefill_case(cpu, K=96, V=256)
    results["prefill_vs_loop_jetblock_dims"] = ratio_entry(
        side_by_side(prefill, ("pytorch", "token_loop"), loop_rounds, time_on_cpu),
        "pytorch", "token_loop", prefill.shape)

    decode = decode_case(cpu)
    times = side_by_side(decode, ("pytorch", "dispatch", "cpp"), 4 * rounds, time_on_cpu)
    results["decode_pytorch_vs_cpp"] = ratio_entry(times, "pytorch", "cpp", decode.shape)
    results["decode_vs_cpp"] = ratio_entry(times, "dispatch", "cpp", decode.shape, "decode_vs_cpp")

    for key, dtype, heap in (("conv_vs_unfold", torch.bfloat16, "warm"),
                             ("conv_vs_unfold_fresh_heap", torch.bfloat16, "fresh"),
                             ("conv_vs_unfold_float32", torch.float32, "warm")):
        conv = conv_prefill_case(cpu, dtype)
        # "fresh": the process gives its free memory back before every call, so large
        # temporaries are mapped (and page-faulted) anew, as in a process that just started
        times = side_by_side(conv, ("pytorch", "unfold"), 2 * rounds, time_on_cpu,
                             before=_release_free_memory if heap == "fresh" else None)
        results[key] = ratio_entry(times, "pytorch", "unfold", {**conv.shape, "heap": heap},
                                   key if key in TARGETS else None)
    return results


# ----- CPU: end to end -----------------------------------------------------------------------


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

    from vllm_jetnemotron.jet_block import JetBlock
    from vllm_jetnemotron.kernels.gated_delta_rule import cpu as _gdr_cpu

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


def cpu_table(results: dict, e2e: dict | None) -> str:
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
    return "\n".join(lines)


# ----- CUDA: Triton vs PyTorch ---------------------------------------------------------------


def cuda_rows(rounds: int) -> list[dict]:
    """Per case, every implementation on the GPU timed side by side: its median ms by name
    and its seconds per round."""
    cuda = torch.device("cuda")
    rows = []
    for case in (prefill_case(cuda, K=96, V=256), prefill_case(cuda, K=128, V=128), decode_case(cuda),
                 conv_prefill_case(cuda, torch.bfloat16), conv_step_case(cuda), gated_rmsnorm_case(cuda)):
        times = side_by_side(case, tuple(case.impls), rounds, time_on_cuda)
        rows.append({"kernel": case.label, "shape": case.shape,
                     **{name: 1e3 * statistics.median(ts) for name, ts in times.items()}, "seconds": times})
    return rows


def cuda_table(rows: list[dict]) -> str:
    lines = ["| kernel | Triton (ms) | PyTorch (ms) | token loop / unfold (ms) | Triton vs PyTorch |",
             "|---|---:|---:|---:|---:|"]
    for r in rows:
        definition = r.get("token_loop", r.get("unfold"))
        lines.append(f"| {r['kernel']} | {r['triton']:.3f} | {r['pytorch']:.3f} | "
                     f"{'-' if definition is None else f'{definition:.3f}'} | {r['pytorch'] / r['triton']:.1f}x |")
    return "\n".join(lines)


# ----- main ----------------------------------------------------------------------------------


def write_results(out: Path, record: dict) -> None:
    """`record` (command, machine, timings, table) to <out>/kernels_speed_<device>.json; prints the table."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"kernels_speed_{record['device']}.json"
    path.write_text(json.dumps(record, indent=2))
    print("\n" + record["table"] + f"\n\nwrote {path}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--rounds", type=int, default=None,
                        help=f"timed rounds per comparison, median reported (default {DEFAULT_ROUNDS['cpu']} on the "
                             f"CPU, where the decode step gets 4x and the conv 2x; {DEFAULT_ROUNDS['cuda']} on CUDA)")
    parser.add_argument("--loop-rounds", type=int, default=3, help="CPU: rounds against the token-by-token loop")
    parser.add_argument("--threads", type=int, default=1,
                        help="CPU: torch threads for the kernel timings (default 1: see bench/README.md)")
    parser.add_argument("--skip-e2e", action="store_true", help="CPU: kernels only, no vLLM engines")
    parser.add_argument("--scale", type=int, default=4, choices=[1, 2, 4],
                        help="end to end: hidden 1536 / scale (JetBlock dims unchanged)")
    parser.add_argument("--e2e-batch", type=int, default=16)
    parser.add_argument("--e2e-prompt-len", type=int, default=64)
    parser.add_argument("--e2e-decode-tokens", type=int, default=32)
    parser.add_argument("--e2e-repeats", type=int, default=2)
    parser.add_argument("--kv-bytes", type=int, default=1 << 30, help="end to end: KV/state budget per engine")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR)
    args = parser.parse_args(argv)
    command = " ".join([".venv/bin/python", "bench/kernels_speed.py", *(argv if argv is not None else sys.argv[1:])])
    rounds = DEFAULT_ROUNDS[args.device] if args.rounds is None else args.rounds

    if args.device == "cuda":
        require_cuda()
    else:
        importlib.import_module("vllm")  # loads vLLM's C++ ops (torch.ops._C)
        torch.set_num_threads(args.threads)
        _keep_freed_memory()
    info = machine(args.device)
    record = {"command": command, "device": args.device, "machine": info, "loadavg_before": os.getloadavg()}
    if args.device == "cuda":
        record["rows"] = cuda_rows(rounds)
        record["loadavg_after"] = os.getloadavg()
        table = cuda_table(record["rows"])
    else:
        record["kernels"] = cpu_kernels(rounds, args.loop_rounds)
        record["loadavg_after"] = os.getloadavg()
        record["end_to_end"] = None if args.skip_e2e else bench_end_to_end(args)
        table = cpu_table(record["kernels"], record["end_to_end"])
    record["table"] = table + "\n\n" + machine_line(command, info)
    write_results(args.out, record)


if __name__ == "__main__":
    main()
