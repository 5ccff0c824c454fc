"""Stage 4 helpers: the (num_heads, head_dim K, expand_v) grid at a fixed recurrent-state
size, and JetBlock throughput measured with this project's serving kernels
(`vllm_jetnemotron.kernels.dispatch`: Triton on CUDA, PyTorch on CPU) on this machine."""

from __future__ import annotations

import time

import torch

from vllm_jetnemotron.config import JetNemotronConfigError, check_jet_settings, jet_block_dims
from vllm_jetnemotron.kernels import dispatch


def state_size(jet: dict) -> int:
    """Recurrent-state elements per JetBlock: H * K * V."""
    d = jet_block_dims(jet)
    return d.num_heads * d.head_k_dim * d.head_v_dim


def candidate_grid(base: dict, target_state: int, num_heads: list[int], head_dims: list[int],
                   expand_v: list[float], max_candidates: int) -> list[dict]:
    """The base settings first, then every grid point of whole JetBlock sizes (the config's
    rules) with H * K * V equal to `target_state`, in grid order."""
    out = [dict(base)] if state_size(base) == target_state else []
    seen = {(base["num_heads"], base["head_dim"], float(base["expand_v"]))}
    for h in num_heads:
        for k in head_dims:
            for e in expand_v:
                jet = {**base, "num_heads": h, "head_dim": k, "expand_v": float(e)}
                try:
                    check_jet_settings(jet)
                except JetNemotronConfigError:
                    continue
                if state_size(jet) == target_state and (h, k, float(e)) not in seen:
                    seen.add((h, k, float(e)))
                    out.append(jet)
    return out[:max_candidates]


@torch.no_grad()
def jetblock_throughput(jet: dict, hidden: int, device: torch.device, batch: int = 16,
                        prefill_tokens: int = 1024, repeats: int = 3) -> dict:
    """Tokens per second of one JetBlock (projections, conv generator, stateful core, gated
    norm; random weights): decode (`batch` sequences, one token each) and prefill (one
    sequence of `prefill_tokens`)."""
    d = jet_block_dims(jet)
    H, K, V, W, D, G = d.num_heads, d.head_k_dim, d.head_v_dim, d.conv_size, d.value_dim, d.generator_dim
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32

    def weight(rows: int, cols: int) -> torch.Tensor:
        return torch.randn(rows, cols, device=device, dtype=dtype) * 0.02

    # the input projections side by side: q, k [H * K each], v, output gate z [D each],
    # a, b [H each], conv generator hidden [G]
    in_proj = weight(hidden, 2 * d.key_dim + 2 * D + 2 * H + G)
    generator_out, out_proj = weight(G, D * W), weight(D, hidden)
    norm_weight = torch.ones(V, device=device, dtype=dtype)

    def core(x: torch.Tensor, prefill: bool):
        n = x.shape[0]
        q, k, v, z, a, b, hidden_g = (x @ in_proj).split([d.key_dim, d.key_dim, D, D, H, H, G], dim=-1)
        q, k = q.reshape(n, H, K), k.reshape(n, H, K)
        kernels = (torch.nn.functional.silu(hidden_g) @ generator_out).view(n, D, W)
        v = v.contiguous()
        if prefill:
            cu = torch.tensor([0, n], dtype=torch.int32, device=device)
            v = dispatch.dynamic_conv_prefill(v, kernels, cu, conv_pool, slots[:1], has_state[:1])
            o = dispatch.gated_delta_rule_prefill(q, k, v.view(n, H, V), a, b, A_log, dt_bias, cu, state_pool,
                                                  slots[:1], has_state[:1])
        else:
            v = dispatch.dynamic_conv_step(v, kernels, conv_pool, slots[:n])
            o = dispatch.gated_delta_rule_step(q, k, v.view(n, H, V), a, b, A_log, dt_bias, state_pool, slots[:n])
        o = dispatch.gated_rmsnorm(o.reshape(n, H, V), z.reshape(n, H, V), norm_weight, d.norm_eps)
        return o.reshape(n, D) @ out_proj

    A_log, dt_bias = torch.zeros(H, device=device), torch.zeros(H, device=device)
    slots = torch.arange(batch, dtype=torch.int32, device=device)
    has_state = torch.zeros(batch, dtype=torch.bool, device=device)
    state_pool = torch.zeros(batch, H, K, V, dtype=torch.float32, device=device)
    conv_pool = torch.zeros(batch, W - 1, D, dtype=dtype, device=device)
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
