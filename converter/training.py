"""The training loop every stage uses, and the evaluations of the searches.

`run_training` is a nanoGPT-style loop: the checkpoint is one dict (trainable weights,
optimiser, step, RNG state, losses, settings) written atomically every `save_every`
steps; re-running continues from it (or, where it cannot be read, starts again with a warning)
and, because each batch and each random choice is a function of (seed, stage, step, rank),
ends with the same weights as an uninterrupted run.
Under `torchrun` (WORLD_SIZE > 1) the model is wrapped in DistributedDataParallel (gloo on
CPU, NCCL on GPU) and each process takes its share of the batch; rank 0 writes files.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from .atomic_files import errors_naming, save_atomic
from .data import RetrievalSet, TrainingData, UserEvalSet

log = logging.getLogger("jet_nemotron_convert")


class StoppedEarly(Exception):
    """Raised after the checkpoint is saved when `--stop-after` steps have run."""


@dataclass
class Runtime:
    device: torch.device
    seed: int
    rank: int = 0
    world_size: int = 1
    stop_after: int | None = None  # optimiser steps this invocation may run (tests of resume)
    precision: str = "float32"     # "bfloat16": forwards under autocast (weights, optimiser float32)
    steps_run: int = field(default=0)

    def autocast(self):
        """The recipe's arithmetic for forwards: bf16 autocast (matmuls in bf16, the JetBlock
        recurrence, norms and losses in float32) or plain float32."""
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.precision == "bfloat16")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()

    def main_process_says(self, value: bool) -> bool:
        """The main process's `value`, on every process: for decisions that read files only
        the main process writes (each process checking for itself can see it half-way)."""
        if self.world_size == 1:
            return value
        flag = torch.tensor([int(value)], device=self.device)
        dist.broadcast(flag, src=0)
        return bool(flag.item())


def setup_runtime(device: str, seed: int, stop_after: int | None = None, precision: str = "float32") -> Runtime:
    """Pick the device and join the process group when started by torchrun."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda" and world_size > 1:
        dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(dev)
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo")
    return Runtime(device=dev, seed=seed, rank=rank, world_size=world_size, stop_after=stop_after,
                   precision=precision)


def lr_at(step: int, steps: int, lr: float, warmup: int) -> float:
    """Linear warm-up, then cosine decay to 10% of `lr`."""
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def read_checkpoint(path: Path, name: str) -> dict | None:
    """The saved training state, or None: none saved, or unreadable (a truncated or damaged
    file: this training starts again from step 0, with a warning)."""
    if not path.is_file():
        return None
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as error:  # torch reports a damaged file as RuntimeError, EOFError, UnpicklingError, OSError...
        log.warning("%s: cannot read %s (%s: %s); training it again from step 0", name, path,
                    type(error).__name__, str(error).split(". ")[0])
        return None


def run_training(
    name: str,
    stage_dir: Path,
    model: nn.Module,
    loss_fn: Callable[[nn.Module, torch.Tensor, int], torch.Tensor],
    data: TrainingData,
    rt: Runtime,
    steps: int,
    lr: float,
    batch_size: int,
    seq_len: int,
    save_every: int,
    warmup: int = 10,
) -> list[float]:
    """Train `model` (its parameters with requires_grad) for `steps` AdamW steps on
    `loss_fn(module, input_ids, step)` (`module`: the DDP wrapper under torchrun), run under
    the runtime's autocast; resumes from `stage_dir/checkpoint.pt`. Returns the per-step
    losses (averaged over processes)."""
    from tqdm import tqdm

    stage_dir.mkdir(parents=True, exist_ok=True)
    checkpoint_file = stage_dir / "checkpoint.pt"
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    optimizer = torch.optim.AdamW(trainable.values(), lr=lr, betas=(0.9, 0.95), weight_decay=0.0)
    start, losses = 0, []
    state = read_checkpoint(checkpoint_file, name)
    if state is not None:
        with torch.no_grad():
            for n, t in state["model"].items():
                trainable[n].copy_(t)
        optimizer.load_state_dict(state["optimizer"])
        start, losses = state["step"], state["losses"]
        torch.set_rng_state(state["rng"])
        if start < steps:
            log.info("%s: resuming at step %d of %d", name, start, steps)
    module = model
    if rt.world_size > 1:
        module = nn.parallel.DistributedDataParallel(model, find_unused_parameters=True)
    per_rank = max(1, batch_size // rt.world_size)

    def save(step: int) -> None:
        if rt.is_main:
            save_atomic({"model": {n: p.detach().cpu() for n, p in trainable.items()},
                         "optimizer": optimizer.state_dict(), "step": step, "losses": losses,
                         "rng": torch.get_rng_state(),
                         "settings": {"steps": steps, "lr": lr, "batch_size": batch_size, "seq_len": seq_len}},
                        checkpoint_file)
        rt.barrier()

    log_file = stage_dir / "log.jsonl"
    model.train()
    with tqdm(total=steps, initial=start, desc=name, disable=not rt.is_main or start >= steps,
              dynamic_ncols=True, mininterval=1.0) as bar:  # closed by an exception too: errors start a line
        for step in range(start, steps):
            t0 = time.perf_counter()
            ids = data.batch(per_rank, seq_len, rt.seed, name, step, rt.rank).to(rt.device)
            with rt.autocast():
                loss = loss_fn(module, ids, step)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(trainable.values(), 1.0)
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step, steps, lr, warmup)
            optimizer.step()
            value = loss.detach()
            if rt.world_size > 1:
                dist.all_reduce(value)
                value /= rt.world_size
            losses.append(float(value))
            speed = per_rank * rt.world_size * seq_len / (time.perf_counter() - t0)
            bar.set_postfix(loss=f"{losses[-1]:.4f}", tok_s=f"{speed:.0f}")
            bar.update(1)
            if rt.is_main:
                with errors_naming(log_file), log_file.open("a") as f:
                    f.write(json.dumps({"step": step + 1, "loss": losses[-1], "lr": group["lr"],
                                        "tokens_per_s": round(speed, 1)}) + "\n")
            rt.steps_run += 1
            done = step + 1
            if done % save_every == 0 or done == steps:
                save(done)
            if rt.stop_after is not None and rt.steps_run >= rt.stop_after and done < steps:
                save(done)
                raise StoppedEarly(f"stopped after {rt.steps_run} steps (--stop-after) in stage {name} "
                                   f"at step {done}/{steps}; re-run the same command to continue")
    model.eval()
    return losses


# ----- evaluations (no gradients; identical on every process) ----------------------------

@torch.no_grad()
def lm_loss(logits_fn: Callable[[torch.Tensor], torch.Tensor], batches: list[torch.Tensor],
            device: torch.device) -> float:
    """Mean next-token cross-entropy over the batches."""
    total, count = 0.0, 0
    for ids in batches:
        ids = ids.to(device)
        logits = logits_fn(ids)
        loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten(), reduction="sum")
        total += float(loss)
        count += ids[:, 1:].numel()
    return total / count


@torch.no_grad()
def retrieval_recall(logits_fn: Callable[[torch.Tensor], torch.Tensor], data: RetrievalSet,
                     device: torch.device, batch_size: int = 8) -> tuple[int, int]:
    """(queries whose whole value is predicted exactly, queries): greedy, teacher-forced."""
    correct, count = 0, 0
    for ids, positions in zip(data.input_ids.split(batch_size), data.value_positions.split(batch_size)):
        ids, positions = ids.to(device), positions.to(device)  # positions: [B, Q, V]
        flat = positions.flatten(1)
        predicted = logits_fn(ids).argmax(-1).gather(1, flat - 1)  # [B, Q * V]
        right = (predicted == ids.gather(1, flat)).view(positions.shape).all(-1)  # [B, Q]
        correct += int(right.sum())
        count += right.numel()
    return correct, count


def wilson_interval(successes: int, trials: int, z: float = 1.96) -> tuple[float, float]:
    """The Wilson score interval of a binomial proportion (95% for z = 1.96)."""
    if trials == 0:
        return 0.0, 1.0
    p = successes / trials
    centre = (p + z * z / (2 * trials)) / (1 + z * z / trials)
    half = z * math.sqrt(p * (1 - p) / trials + z * z / (4 * trials * trials)) / (1 + z * z / trials)
    return max(0.0, centre - half), min(1.0, centre + half)


@torch.no_grad()
def answer_loss(logits_fn: Callable[[torch.Tensor], torch.Tensor], data: UserEvalSet,
                device: torch.device) -> float:
    """Mean cross-entropy of the answer tokens given the prompt."""
    total, count = 0.0, 0
    for ids, prompt_len in data.examples:
        ids = ids.to(device)[None]
        logits = logits_fn(ids)
        targets = ids[0, prompt_len:]
        total += float(F.cross_entropy(logits[0, prompt_len - 1:-1].float(), targets, reduction="sum"))
        count += targets.numel()
    return total / max(1, count)
