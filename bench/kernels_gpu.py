"""GPU speed of the JetBlock's Triton kernels against the PyTorch implementations of the
same operations on the same GPU tensors (the CPU implementations of `kernels` are plain
PyTorch and run on CUDA tensors too), and against the token-by-token definition.

    .venv/bin/python bench/kernels_gpu.py               # needs a CUDA GPU and triton
    .venv/bin/python bench/kernels_gpu.py --rounds 50

1. Chunked prefill (`chunk_gated_delta_rule`), 4 sequences of 2048 tokens, 12 heads, at
   the JetBlock's dims (K = 96, V = 256) and at K = V = 128, bf16 q/k/v: Triton vs the
   PyTorch chunked implementation vs the token-by-token loop.
2. Decode step from the raw gates (`fused_recurrent_gated_delta_rule_from_gates`), batch
   64, 12 heads, K = 96, V = 256, bf16, float32 state pool: Triton vs PyTorch.
3. Dynamic causal conv (`dynamic_causal_conv`), 2048 tokens, V = 3072, W = 4, bf16:
   Triton vs the PyTorch blocked implementation vs the unfold-based definition; and the
   decode step (`dynamic_causal_conv_step`), batch 64.
4. Gated RMSNorm over `[2048, 12, 256]` (tokens, heads, V), bf16.

Timed with CUDA events after warm-up, median over rounds. Writes
bench/results/kernels_gpu.json and prints a markdown table. Without a CUDA device it
stops with an error and writes nothing.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def gpu_timer(device: torch.device):
    """Seconds of one call of fn on `device`, measured with CUDA events."""

    def time_call(fn) -> float:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize(device)
        return start.elapsed_time(end) / 1e3

    return time_call


def side_by_side(fns: dict, rounds: int, time_call) -> dict:
    """name -> median milliseconds; the functions alternate within each round."""
    for fn in fns.values():
        fn()
        fn()
    times = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            times[name].append(time_call(fn))
    return {name: 1e3 * statistics.median(ts) for name, ts in times.items()}


def gdn_inputs(shape: tuple, H: int, K: int, V: int, device, seed: int):
    g = torch.Generator(device="cpu").manual_seed(seed)
    q = torch.randn(*shape, H, K, generator=g).bfloat16().to(device)
    k = torch.randn(*shape, H, K, generator=g).bfloat16().to(device)
    v = torch.randn(*shape, H, V, generator=g).bfloat16().to(device)
    decay = F.logsigmoid(torch.randn(*shape, H, generator=g) + 3.0).to(device)
    beta = torch.rand(*shape, H, generator=g).to(device)
    return q, k, v, decay, beta


def bench_prefill(device, rounds: int, time_call, B: int = 4, L: int = 2048, H: int = 12) -> list[dict]:
    from vllm_jetnemotron.kernels.gated_delta_rule import cpu as pytorch_gdr
    from vllm_jetnemotron.kernels.gated_delta_rule import triton_chunk
    from vllm_jetnemotron.kernels.gated_delta_rule.naive import naive_recurrent_gated_delta_rule

    rows = []
    for K, V in ((96, 256), (128, 128)):
        q, k, v, g, beta = gdn_inputs((B * L,), H, K, V, device, seed=K + V)
        cu = (torch.arange(B + 1, dtype=torch.int32) * L).to(device)
        slots = torch.arange(B, dtype=torch.int32, device=device)
        fresh = torch.zeros(B, dtype=torch.bool, device=device)
        pool = torch.zeros(B, H, K, V, device=device)
        # [B * L, ...] -> [B, L, ...] for the batched token loop
        qb, kb, vb, gb, bb = (x.view(B, L, *x.shape[1:]) for x in (q, k, v, g, beta))
        ms = side_by_side({
            "triton": lambda: triton_chunk.chunk_gated_delta_rule(q, k, v, g, beta, cu, pool, slots, fresh),
            "pytorch": lambda: pytorch_gdr.chunk_gated_delta_rule(q, k, v, g, beta, cu, pool, slots, fresh),
            "token_loop": lambda: naive_recurrent_gated_delta_rule(qb, kb, vb, gb, bb, output_final_state=True),
        }, rounds, time_call)
        rows.append(dict(kernel=f"chunked prefill, {B} x {L} tokens, {H} heads, K = {K}, V = {V}, bf16", **ms))
    return rows


def bench_decode(device, rounds: int, time_call, N: int = 64, H: int = 12, K: int = 96, V: int = 256) -> list[dict]:
    from vllm_jetnemotron.kernels.gated_delta_rule import cpu as pytorch_gdr
    from vllm_jetnemotron.kernels.gated_delta_rule import triton_fused_recurrent

    q, k, v, _, _ = gdn_inputs((N, 1), H, K, V, device, seed=0)
    g = torch.Generator(device="cpu").manual_seed(1)
    a, b = (torch.randn(N, 1, H, generator=g).bfloat16().to(device) for _ in range(2))
    A_log = torch.rand(H, generator=g).mul(15).add(1).log().to(device)
    dt_bias = torch.randn(H, generator=g).to(device)
    pool = 0.1 * torch.randn(N + 16, H, K, V, generator=g).to(device)
    slots = torch.randperm(N + 16, generator=g)[:N].to(torch.int32).to(device)
    args = (q, k, v, a, b, A_log, dt_bias, pool, slots)
    ms = side_by_side({
        "triton": lambda: triton_fused_recurrent.fused_recurrent_gated_delta_rule_from_gates(*args),
        "pytorch": lambda: pytorch_gdr.fused_recurrent_gated_delta_rule_from_gates(*args),
    }, rounds, time_call)
    return [dict(kernel=f"decode step from the gates, batch {N}, {H} heads, K = {K}, V = {V}, bf16", **ms)]


def bench_conv(device, rounds: int, time_call, T: int = 2048, D: int = 3072, W: int = 4, N: int = 64) -> list[dict]:
    from vllm_jetnemotron.kernels.dynamic_conv import cpu as pytorch_conv
    from vllm_jetnemotron.kernels.dynamic_conv import triton_conv
    from vllm_jetnemotron.kernels.dynamic_conv.naive import dynamic_causal_conv_naive

    g = torch.Generator(device="cpu").manual_seed(2)
    x = torch.randn(T, D, generator=g).bfloat16().to(device)
    kernels = torch.randn(T, D, W, generator=g).bfloat16().to(device)
    cu = torch.tensor([0, T], dtype=torch.int32, device=device)
    pool = torch.zeros(N, W - 1, D, dtype=torch.bfloat16, device=device)
    slot = torch.zeros(1, dtype=torch.int32, device=device)
    fresh = torch.zeros(1, dtype=torch.bool, device=device)
    prefill = side_by_side({
        "triton": lambda: triton_conv.dynamic_causal_conv(x, kernels, cu, pool, slot, fresh),
        "pytorch": lambda: pytorch_conv.dynamic_causal_conv(x, kernels, cu, pool, slot, fresh),
        "unfold": lambda: dynamic_causal_conv_naive(x[None], kernels[None]),
    }, rounds, time_call)
    slots = torch.arange(N, dtype=torch.int32, device=device)
    step = side_by_side({
        "triton": lambda: triton_conv.dynamic_causal_conv_step(x[:N], kernels[:N], pool, slots),
        "pytorch": lambda: pytorch_conv.dynamic_causal_conv_step(x[:N], kernels[:N], pool, slots),
    }, rounds, time_call)
    return [dict(kernel=f"dynamic conv prefill, {T} tokens, V = {D}, W = {W}, bf16", **prefill),
            dict(kernel=f"dynamic conv decode step, batch {N}, V = {D}, W = {W}, bf16", **step)]


def bench_norm(device, rounds: int, time_call, T: int = 2048, H: int = 12, V: int = 256) -> list[dict]:
    from vllm_jetnemotron.kernels.gated_rmsnorm import triton_norm
    from vllm_jetnemotron.kernels.gated_rmsnorm.naive import gated_rmsnorm_naive

    g = torch.Generator(device="cpu").manual_seed(3)
    x, z = (torch.randn(T, H, V, generator=g).bfloat16().to(device) for _ in range(2))
    weight = torch.rand(V, generator=g).to(device)
    ms = side_by_side({
        "triton": lambda: triton_norm.gated_rmsnorm(x, z, weight, 1e-5),
        "pytorch": lambda: gated_rmsnorm_naive(x, z, weight, 1e-5),
    }, rounds, time_call)
    return [dict(kernel=f"gated RMSNorm, [{T}, {H}, {V}], bf16", **ms)]


def table(rows: list[dict]) -> str:
    lines = ["| kernel | Triton (ms) | PyTorch (ms) | token loop / unfold (ms) | Triton vs PyTorch |",
             "|---|---:|---:|---:|---:|"]
    for r in rows:
        baseline = r.get("token_loop", r.get("unfold"))
        lines.append(f"| {r['kernel']} | {r['triton']:.3f} | {r['pytorch']:.3f} | "
                     f"{'-' if baseline is None else f'{baseline:.3f}'} | {r['pytorch'] / r['triton']:.1f}x |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=20, help="timed calls per kernel (median reported)")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        sys.exit("bench/kernels_gpu.py needs a CUDA GPU: torch.cuda.is_available() is False on this machine "
                 f"(torch {torch.__version__}). For the CPU kernels run bench/kernels_cpu.py.")
    try:
        import triton
    except ImportError:
        sys.exit("bench/kernels_gpu.py needs triton (pip install triton); it is not importable here.")

    device = torch.device("cuda")
    time_call = gpu_timer(device)
    rows = []
    for bench in (bench_prefill, bench_decode, bench_conv, bench_norm):
        print(f"{bench.__name__} ...", flush=True)
        rows += bench(device, args.rounds, time_call)
    report = table(rows)
    info = {"gpu": torch.cuda.get_device_name(device), "torch": torch.__version__, "cuda": torch.version.cuda,
            "triton": triton.__version__, "python": platform.python_version()}
    command = " ".join([".venv/bin/python", "bench/kernels_gpu.py", *(argv if argv is not None else sys.argv[1:])])
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "kernels_gpu.json"
    path.write_text(json.dumps({"command": command, "machine": info, "rows": rows, "table": report}, indent=2))
    print("\n" + report + f"\n\nCommand: `{command}`; GPU: {info['gpu']}, torch {info['torch']}, "
          f"CUDA {info['cuda']}, triton {info['triton']}.\n\nwrote {path}")


if __name__ == "__main__":
    main()
