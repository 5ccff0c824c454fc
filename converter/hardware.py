"""Stage 4 helpers: the (num_heads, head_dim K, expand_v) grid at a fixed recurrent-state
size, and JetBlock throughput measured with this project's serving kernels
(`vllm_jetnemotron.kernels.dispatch`: Triton on CUDA, PyTorch on CPU) on this machine."""

from __future__ import annotations

import time

import torch

from vllm_jetnemotron.kernels import dispatch


def state_size(jet: dict) -> int:
    """Recurrent-state elements per JetBlock: H * K * V."""
    k = jet["head_dim"]
    return jet["num_heads"] * k * round(k * float(jet["expand_v"]))


def candidate_grid(base: dict, target_state: int, num_heads: list[int], head_dims: list[int],
                   expand_v: list[float], max_candidates: int) -> list[dict]:
    """The base settings first, then every grid point with H * K * round(K * e) equal to
    `target_state` whose value dim the conv generator reduction divides, in grid order."""
    reduction = base.get("dconv_generator_reduction", 8)
    out = [dict(base)] if state_size(base) == target_state else []
    for h in num_heads:
        for k in head_dims:
            for e in expand_v:
                v = k * e
                if abs(v - round(v)) > 1e-6 or h * k * round(v) != target_state:
                    continue
                if (h * round(v)) % reduction:
                    continue
                jet = {**base, "num_heads": h, "head_dim": k, "expand_v": float(e)}
                if all((c["num_heads"], c["head_dim"], float(c["expand_v"])) != (h, k, float(e)) for c in out):
                    out.append(jet)
    return out[:max_candidates]


@torch.no_grad()
def jetblock_throughput(jet: dict, hidden: int, device: torch.device, batch: int = 16,
                        prefill_tokens: int = 1024, repeats: int = 3) -> dict:
    """Tokens per second of one JetBlock's stateful core plus its projections: decode
    (`batch` sequences, one token each) and prefill (one sequence of `prefill_tokens`)."""
    H, K = jet["num_heads"], jet["head_dim"]
    V = round(K * float(jet["expand_v"]))
    W = jet.get("conv_size", 4)
    D = H * V
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    proj = torch.randn(hidden, 2 * H * K + 2 * D + 2 * H + D * W // 8, device=device, dtype=dtype) * 0.02
    out_proj = torch.randn(D, hidden, device=device, dtype=dtype) * 0.02

    def core(x: torch.Tensor, prefill: bool):
        n = x.shape[0]
        y = x @ proj  # [n, all projections]
        q = y[:, :H * K].reshape(n, H, K)
        k = y[:, H * K:2 * H * K].reshape(n, H, K)
        v = y[:, 2 * H * K:2 * H * K + D].contiguous()
        g = -torch.nn.functional.softplus(y[:, -2 * H:-H].float())
        beta = y[:, -H:].float().sigmoid()
        kernels = torch.randn(n, D, W, device=device, dtype=dtype) * 0.1 if kernels_cache is None else kernels_cache[:n]
        if prefill:
            cu = torch.tensor([0, n], dtype=torch.int32, device=device)
            v = dispatch.dynamic_causal_conv(v, kernels, cu, conv_pool, slots[:1], has_state[:1])
            o = dispatch.chunk_gated_delta_rule(q, k, v.view(n, H, V), g, beta, cu, state_pool, slots[:1], has_state[:1])
        else:
            v = dispatch.dynamic_causal_conv_step(v, kernels, conv_pool, slots[:n])
            o = dispatch.fused_recurrent_gated_delta_rule(
                q[:, None], k[:, None], v.view(n, 1, H, V), g[:, None], beta[:, None], state_pool, slots[:n])
        return o.reshape(n, D) @ out_proj

    slots = torch.arange(batch, dtype=torch.int32, device=device)
    has_state = torch.zeros(batch, dtype=torch.bool, device=device)
    state_pool = torch.zeros(batch, H, K, V, dtype=torch.float32, device=device)
    conv_pool = torch.zeros(batch, W - 1, D, dtype=dtype, device=device)
    kernels_cache = torch.randn(prefill_tokens, D, W, device=device, dtype=dtype) * 0.1
    result = {}
    for mode, x in (("decode", torch.randn(batch, hidden, device=device, dtype=dtype)),
                    ("prefill", torch.randn(prefill_tokens, hidden, device=device, dtype=dtype))):
        core(x, mode == "prefill")  # warm-up
        best = float("inf")
        for _ in range(repeats):
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            core(x, mode == "prefill")
            if device.type == "cuda":
                torch.cuda.synchronize()
            best = min(best, time.perf_counter() - t0)
        result[f"{mode}_tokens_per_s"] = x.shape[0] / best
    return result
