"""Tokens per second of the converter's step kinds on a teacher, float32 against bf16 autocast
(the recipe's `precision`), and what bf16 changes in the numbers the stages compare:

    OMP_NUM_THREADS=1 .venv/bin/python bench/converter_steps.py TEACHER [--seq-len 256 --batch 4]

* teacher forward (stage 0, the targets of every distillation, every placement score);
* attention transfer step (stage 1: one teacher forward, each JetBlock fitted to its layer);
* distillation step of the super-network (stage 1's once-for-all steps; stages 3-6 alike);
* the loss gaps: teacher validation loss, bf16 minus float32, on real text (the standard
  library's source), and the KL between the bf16 and the float32 teacher's next-token
  distributions; the transfer loss of one step in both.

JetBlocks use the recipe's dims (`--jet-heads`, `--jet-head-dim`, `--expand-v`). Writes
bench/results/converter_steps.json.
"""

from __future__ import annotations

import argparse
import inspect
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F

RESULTS = Path(__file__).resolve().parent / "results" / "converter_steps.json"


def timed(fn, repeats: int) -> float:
    fn()  # warm-up
    t0 = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - t0) / repeats


def main() -> None:
    from transformers import AutoTokenizer

    from vllm_jetnemotron.converter.students import SuperNetwork, kl_distillation_loss
    from vllm_jetnemotron.converter.teacher import check_teacher, load_teacher, student_config, teacher_state_dict

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("teacher")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--jet-heads", type=int, default=9)
    p.add_argument("--jet-head-dim", type=int, default=64)
    p.add_argument("--expand-v", type=float, default=2.0)
    p.add_argument("--repeats", type=int, default=2)
    args = p.parse_args()

    torch.manual_seed(0)
    config = check_teacher(args.teacher)
    teacher = load_teacher(args.teacher, torch.device("cpu"))
    jet = {"num_heads": args.jet_heads, "head_dim": args.jet_head_dim, "expand_v": args.expand_v, "conv_size": 4,
           "dconv_generator_reduction": 8, "norm_eps": "1e-5"}
    layers = config["num_hidden_layers"]
    net = SuperNetwork(student_config(config, ["attn"] * layers, jet, 64), teacher_state_dict(teacher), 64)
    optimizer = torch.optim.AdamW([q for q in net.parameters() if q.requires_grad], lr=1e-4)
    tokenizer = AutoTokenizer.from_pretrained(args.teacher)
    text = "\n\n".join(inspect.getsource(m) for m in (json, argparse, inspect))
    tokens = torch.tensor(tokenizer(text)["input_ids"])
    n = args.batch * args.seq_len
    ids = tokens[:n].view(args.batch, args.seq_len)
    types = ["jet"] * layers
    types[layers // 3], types[2 * layers // 3] = "attn", "swa"

    def autocast(bf16: bool):
        return torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16)

    def teacher_forward(bf16: bool):
        with torch.no_grad(), autocast(bf16):
            return teacher(input_ids=ids).logits.float()

    def step(loss_fn, bf16: bool) -> float:
        with autocast(bf16):
            loss = loss_fn()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        return float(loss)

    def transfer():
        return net(ids, None).sum()

    def distillation():
        with torch.no_grad():
            target = teacher(input_ids=ids).logits.float()
        return kl_distillation_loss(net(ids, types), target)

    result = {"teacher": args.teacher, "tokens_per_step": n, "threads": torch.get_num_threads(), "tokens_per_s": {}}
    for precision, bf16 in (("float32", False), ("bfloat16", True)):
        rates = {"teacher forward": n / timed(lambda: teacher_forward(bf16), args.repeats),
                 "attention transfer step": n / timed(lambda: step(transfer, bf16), args.repeats),
                 "distillation step": n / timed(lambda: step(distillation, bf16), 1)}
        result["tokens_per_s"][precision] = {k: round(v, 1) for k, v in rates.items()}
        print(precision, result["tokens_per_s"][precision], flush=True)

    with torch.no_grad():
        fp32, bf16 = teacher_forward(False), teacher_forward(True)
        loss32 = F.cross_entropy(fp32[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
        loss16 = F.cross_entropy(bf16[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
        result["teacher_loss"] = {"float32": float(loss32), "bfloat16": float(loss16),
                                  "relative_gap": float(loss16 / loss32 - 1),
                                  "kl_per_token_bf16_from_fp32": float(kl_distillation_loss(bf16, fp32))}
        with autocast(False):
            transfer32 = net(ids, None)
        with autocast(True):
            transfer16 = net(ids, None)
        result["transfer_loss"] = {"float32": float(transfer32.sum()), "bfloat16": float(transfer16.sum()),
                                   "largest_layer_gap": float((transfer16 - transfer32).abs().max())}
    print(json.dumps(result, indent=1))
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
