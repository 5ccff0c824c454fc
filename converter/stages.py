"""The PostNAS stages (converter/README.md, "Stages"). `run_stage` runs one entry of the stage
table (`pipeline.STAGES`: folder, recipe slice, inputs) in its workdir folder; the stage
functions get the shared `Context`, their folder and the outputs of the earlier stages
they read:

    0-teacher/    result.json            the teacher's own metrics (the scores' reference)
    1-supernet/   jet_blocks.pt          every layer's JetBlock trained in the super-network
    2-placement/  result.json            beam search over attn / swa placement; layer ablations
    3-blocks/     <kind>/, chosen_jet_blocks.pt  JetBlock vs gated DeltaNet (static conv)
    4-hardware/   <H>-<K>-<e>/, chosen_jet_blocks.pt  grid at a fixed state size
    5-final/      model.pt               final distillation of the chosen architecture
    5-baselines/  <name>/model.pt        the same recipe for uniform / all-JetBlock layouts
    6-draft/      model.pt               all-attention draft distilled from the final model
    6-eagle3/     model.pt               EAGLE-3 head distilled from the final model

Every folder gets `fingerprint.json` when its stage starts and `result.json` plus a
`done` file when it finishes. A finished stage is skipped on the next run, an unfinished
one resumes from its checkpoint (see `training.run_training`), and one whose inputs
changed is redone (see `pipeline`). The export and the report read only the results and
the saved weights.
"""

from __future__ import annotations

import itertools
import json
import logging
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

from vllm_jetnemotron.config import JetNemotronConfig

from .data import RetrievalSet, TrainingData, UserEvalSet, step_generator
from .eagle3 import Eagle3Head, TargetPass, default_aux_layers, speculative_greedy
from .hardware import candidate_grid, jetblock_throughput, state_size
from .pipeline import BY_NAME, STAGE_NAMES, Stage, changed_keys, read_fingerprint, recipe_slice, result_digest
from .students import SuperNetwork, build_student, kl_distillation_loss, set_trainable
from .teacher import student_config
from .atomic_files import save_atomic, write_json_atomic, write_text_atomic
from .training import Runtime, answer_loss, lm_loss, retrieval_recall, run_training, wilson_interval

log = logging.getLogger("jet_nemotron_convert")


@dataclass
class Context:
    recipe: dict
    rt: Runtime
    workdir: Path
    teacher_config: dict
    teacher: nn.Module  # Hugging Face model, frozen
    teacher_tensors: dict[str, torch.Tensor]
    training: TrainingData
    final_training: TrainingData  # with final.data_mix: the served model's and its drafters' data
    val_batches: list[torch.Tensor]
    retrieval: RetrievalSet
    user_sets: list[UserEvalSet]
    input_digests: dict  # content hashes of the teacher's weights, the tokenised data, the eval files
    results: dict[str, dict] = field(default_factory=dict)  # by stage name, as the stages finish

    @property
    def num_layers(self) -> int:
        return self.teacher_config["num_hidden_layers"]

    def config(self, layer_types: list[str], jet: dict | None = None, provenance: dict | None = None
               ) -> JetNemotronConfig:
        return student_config(self.teacher_config, layer_types, jet or self.recipe["jet"],
                              self.recipe["budget"]["swa_window"], provenance)

    def teacher_logits(self, ids: torch.Tensor) -> torch.Tensor:
        return self.teacher(input_ids=ids).logits.float()

    def train(self, name: str, stage_dir: Path, model: nn.Module, student_logits, steps: int, lr: float,
              teacher_logits=None, warmup: int = 10, data: TrainingData | None = None) -> list[float]:
        """Distil `student_logits(module, ids, step)` towards `teacher_logits(ids)` (KL)."""
        target_logits = teacher_logits or self.teacher_logits

        def distillation(module: nn.Module, ids: torch.Tensor, step: int) -> torch.Tensor:
            with torch.no_grad():
                target = target_logits(ids)
            return kl_distillation_loss(student_logits(module, ids, step), target)

        return self.fit(name, stage_dir, model, distillation, steps, lr, warmup, data)

    def fit(self, name: str, stage_dir: Path, model: nn.Module, loss_fn, steps: int, lr: float,
            warmup: int = 10, data: TrainingData | None = None) -> list[float]:
        r = self.recipe
        return run_training(name, stage_dir, model, loss_fn, data or self.training, self.rt, steps, lr,
                            r["batch_size"], r["seq_len"], r["save_every"], warmup=min(warmup, max(1, steps // 5)))


@dataclass(frozen=True)
class StageOutput:
    """What a later stage gets of an earlier one: its folder (saved weights) and result."""

    folder: Path
    result: dict


# ----- running a stage ------------------------------------------------------------------

def stage_fingerprint(ctx: Context, stage: Stage) -> dict:
    inputs = {**ctx.input_digests, "seed": ctx.rt.seed,
              **{name: result_digest(ctx.workdir, name) for name in stage.reads}}
    return {"recipe": recipe_slice(ctx.recipe, stage), "inputs": inputs}


def run_stage(ctx: Context, name: str) -> dict:
    """Run stage `name` (or take its finished result) and record it in `ctx.results`.
    The recipe slices were checked against the workdir before (`pipeline.check_recipe_unchanged`),
    so a fingerprint that differs from the recorded one here means changed inputs: the
    folder is cleared and the stage redone."""
    stage = BY_NAME[name]
    folder = ctx.workdir / stage.folder
    fingerprint = stage_fingerprint(ctx, stage)
    recorded = read_fingerprint(folder) if ctx.rt.is_main else None
    if ctx.rt.main_process_says(folder.exists() and recorded != fingerprint):
        if ctx.rt.is_main:
            changes = changed_keys(recorded["inputs"], fingerprint["inputs"]) if recorded else ["not recorded"]
            log.info("stage %s: its inputs changed (%s): redoing it", name, ", ".join(changes))
            shutil.rmtree(folder)
        ctx.rt.barrier()
    if is_done(ctx, folder):
        result = read_result(folder)
    else:
        if ctx.rt.is_main:
            folder.mkdir(parents=True, exist_ok=True)
            write_json_atomic(fingerprint, folder / "fingerprint.json")
        ctx.rt.barrier()
        inputs = {r: StageOutput(ctx.workdir / BY_NAME[r].folder, ctx.results[r]) for r in stage.reads}
        result = finish(ctx, folder, {**STAGE_FUNCTIONS[name](ctx, folder, inputs), "fingerprint": fingerprint})
    ctx.results[name] = result
    return result


# ----- shared pieces ------------------------------------------------------------------

def is_done(ctx: Context, stage_dir: Path) -> bool:
    """Whether the stage finished in an earlier run, as the main process sees it (it
    writes `done` when it finishes a stage, while the others may not have checked yet)."""
    return ctx.rt.main_process_says((stage_dir / "done").is_file())


def finish(ctx: Context, stage_dir: Path, result: dict) -> dict:
    if ctx.rt.is_main:
        stage_dir.mkdir(parents=True, exist_ok=True)
        write_json_atomic(result, stage_dir / "result.json")
        write_text_atomic("done\n", stage_dir / "done")
    ctx.rt.barrier()
    return result


def read_result(stage_dir: Path) -> dict:
    return json.loads((stage_dir / "result.json").read_text())


def evaluate(ctx: Context, logits_fn) -> dict:
    """Validation loss and perplexity, retrieval accuracy (share of held-out queries
    recalled exactly, with its 95% interval), user eval answer losses."""
    device = ctx.rt.device

    def run(ids: torch.Tensor) -> torch.Tensor:
        with ctx.rt.autocast():
            return logits_fn(ids).float()

    loss = lm_loss(run, ctx.val_batches, device)
    recalled, queries = retrieval_recall(run, ctx.retrieval, device, ctx.recipe["batch_size"])
    metrics = {"val_loss": loss, "val_ppl": float(torch.tensor(loss).exp()), "retrieval": recalled / queries,
               "retrieval_ci95": list(wilson_interval(recalled, queries))}
    if ctx.user_sets:
        metrics["user"] = {s.name: answer_loss(run, s, device) for s in ctx.user_sets}
    return metrics


def score(ctx: Context, teacher_metrics: dict, metrics: dict) -> float:
    """Higher is better: -w_loss * relative LM-loss gap to the teacher + w_retrieval *
    retrieval accuracy - w_user * mean relative answer-loss gap."""
    w = ctx.recipe["placement"]["weights"]
    t = teacher_metrics
    value = -w["loss"] * (metrics["val_loss"] / t["val_loss"] - 1) + w["retrieval"] * metrics["retrieval"]
    if metrics.get("user"):
        gaps = [metrics["user"][n] / t["user"][n] - 1 for n in metrics["user"]]
        value -= w["user"] * sum(gaps) / len(gaps)
    return value


def model_logits(model: nn.Module):
    return lambda ids: model(input_ids=ids).logits.float()


def uniform_layer_types(num_layers: int, attn: int, swa: int) -> list[str]:
    """`attn + swa` evenly spaced slots; the attn ones evenly spread among them."""
    total = attn + swa
    types = ["jet"] * num_layers
    slots = [min(num_layers - 1, int((j + 0.5) * num_layers / total)) for j in range(total)]
    attn_slots = {int((m + 0.5) * total / attn) for m in range(attn)} if attn else set()
    for j, layer in enumerate(slots):
        types[layer] = "attn" if j in attn_slots else "swa"
    return types


def trained_jet_blocks(inputs: dict[str, StageOutput], *names: str) -> list[dict[str, torch.Tensor]]:
    """The JetBlock weights the named earlier stages trained, in the order given; a
    student takes, for each layer, the first that fits it (`build_student`)."""
    files = {"supernet": "jet_blocks.pt", "blocks": "chosen_jet_blocks.pt", "hardware": "chosen_jet_blocks.pt"}
    return [torch.load(inputs[name].folder / files[name], map_location="cpu") for name in names]


def jet_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: t.detach().cpu().clone() for n, t in model.state_dict().items()
            if ".self_attn." in n and model.config.layer_types[int(n.split(".")[2])] == "jet"}


# ----- stage 0: the teacher's own numbers ---------------------------------------------

def stage_teacher(ctx: Context, stage_dir: Path, inputs: dict) -> dict:
    return evaluate(ctx, ctx.teacher_logits)


# ----- stage 1: super-network -----------------------------------------------------------

def build_supernet(ctx: Context) -> SuperNetwork:
    return SuperNetwork(ctx.config(["attn"] * ctx.num_layers), ctx.teacher_tensors,
                        ctx.recipe["budget"]["swa_window"], ctx.rt.seed).to(ctx.rt.device)


def sampled_layer_types(ctx: Context, step: int) -> list[str]:
    """The once-for-all sample of a step: 0 .. attn+swa layers keep attention (each `attn`
    or `swa` in the budget's proportion), the rest use their JetBlock."""
    budget = ctx.recipe["budget"]
    total = budget["attn"] + budget["swa"]
    g = step_generator(ctx.rt.seed, "supernet-layers", step)
    count = int(torch.randint(0, total + 1, (1,), generator=g))
    chosen = torch.randperm(ctx.num_layers, generator=g)[:count].tolist()
    types = ["jet"] * ctx.num_layers
    for layer in chosen:
        types[layer] = "swa" if float(torch.rand(1, generator=g)) * total < budget["swa"] else "attn"
    return types


def stage_supernet(ctx: Context, stage_dir: Path, inputs: dict) -> dict:
    """`transfer_steps` of layer-wise attention transfer (every JetBlock fitted to its
    layer's attention output on the teacher's own hidden states: one teacher forward and
    no backward through the model per step), then `steps` of once-for-all distillation."""
    net = build_supernet(ctx)
    settings = ctx.recipe["supernet"]
    result = {}
    if settings["transfer_steps"]:
        result["transfer_losses"] = ctx.fit("transfer", stage_dir / "transfer", net,
                                            lambda module, ids, step: module(ids, None).sum(),
                                            settings["transfer_steps"], settings["transfer_lr"],
                                            warmup=settings["warmup"])
        result["transfer_errors"] = transfer_errors(ctx, net)
    result["losses"] = ctx.train("supernet", stage_dir, net,
                                 lambda module, ids, step: module(ids, sampled_layer_types(ctx, step)),
                                 settings["steps"], settings["lr"], warmup=settings["warmup"])
    if ctx.rt.is_main:
        save_atomic(net.jet_state_dict(), stage_dir / "jet_blocks.pt")
    return result


@torch.no_grad()
def transfer_errors(ctx: Context, net: SuperNetwork) -> list[float]:
    """Each layer's attention transfer error on the validation batches: how well its
    JetBlock stands in for its attention, layer by layer (placement evidence)."""
    net.eval()
    with ctx.rt.autocast():
        errors = sum(net(ids.to(ctx.rt.device), None) for ids in ctx.val_batches) / len(ctx.val_batches)
    net.train()
    return [round(float(e), 5) for e in errors]


# ----- stage 2: placement search --------------------------------------------------------

def stage_placement(ctx: Context, stage_dir: Path, inputs: dict[str, StageOutput]) -> dict:
    """Single-layer ablations (and, with `pair_ablation`, every pair), then a beam search: add
    `attn` layers one at a time (keeping `beam_width` best layouts), then `swa` layers the
    same way, into the `candidate_layers` layers whose ablation scored best; every layout
    scored with the super-network."""
    teacher_metrics = inputs["teacher"].result
    net = build_supernet(ctx)
    net.jet_blocks.load_state_dict(
        {k.split(".self_attn.")[0].split(".")[-1] + "." + k.split(".self_attn.")[1]: v
         for k, v in trained_jet_blocks(inputs, "supernet")[0].items()})
    net.eval()
    cache_file = stage_dir / "evaluations.json"
    evaluations = json.loads(cache_file.read_text()) if cache_file.is_file() else {}
    bar = tqdm(desc="placement", unit="layout", disable=not ctx.rt.is_main, dynamic_ncols=True)

    def evaluate_layout(types: tuple[str, ...]) -> float:
        key = ",".join(types)
        if key not in evaluations:
            metrics = evaluate(ctx, lambda ids: net(ids, list(types)))
            evaluations[key] = {**metrics, "score": score(ctx, teacher_metrics, metrics)}
            if ctx.rt.is_main:
                write_json_atomic(evaluations, cache_file)  # resumable between layouts
            bar.update(1)
            bar.set_postfix(best=f"{max(e['score'] for e in evaluations.values()):.4f}",
                            val_loss=f"{metrics['val_loss']:.4f}")
        return evaluations[key]["score"]

    settings = ctx.recipe["placement"]
    budget, width = ctx.recipe["budget"], settings["beam_width"]

    def kept_as_attention(*layers: int) -> dict:
        t = tuple("attn" if i in layers else "jet" for i in range(ctx.num_layers))
        evaluate_layout(t)
        return evaluations[",".join(t)]

    with bar:  # closed by an exception too: errors start a line
        # the ablations: one layer kept as attention, all others JetBlocks; then, if asked, every
        # pair of layers (recall needs two attention layers whose heads compose, as induction heads do)
        single = [{"layer": i, **kept_as_attention(i)} for i in range(ctx.num_layers)]
        pairs = [{"layers": [i, j], **kept_as_attention(i, j)}
                 for i, j in itertools.combinations(range(ctx.num_layers), 2)] if settings["pair_ablation"] else []
        # the beam places attention only where one kept layer helps most (all layers by default)
        ranked_layers = sorted(range(ctx.num_layers), key=lambda i: (-single[i]["score"], i))
        candidates = set(ranked_layers[:settings["candidate_layers"] or ctx.num_layers])
        beam = [tuple(["jet"] * ctx.num_layers)]
        steps = []
        for kind in ["attn"] * budget["attn"] + ["swa"] * budget["swa"]:
            expanded = {b[:i] + (kind,) + b[i + 1:] for b in beam for i in sorted(candidates) if b[i] == "jet"}
            ranked = sorted(expanded, key=lambda t: (-evaluate_layout(t), t))
            steps.append([{"layer_types": list(t), "score": evaluations[",".join(t)]["score"]} for t in ranked])
            beam = ranked[:width]
        best = list(beam[0])
        extra = {}
        for name, types in (("uniform", uniform_layer_types(ctx.num_layers, budget["attn"], budget["swa"])),
                            ("all_jet", ["jet"] * ctx.num_layers), ("searched", best)):
            evaluate_layout(tuple(types))
            extra[name] = {"layer_types": types, **evaluations[",".join(types)]}
    return {"layer_types": best, "beam_steps": steps, "candidate_layers": sorted(candidates),
            "single_layer": single, "layer_pairs": pairs, "supernet_layouts": extra}


# ----- stage 3: block selection ---------------------------------------------------------

def stage_blocks(ctx: Context, stage_dir: Path, inputs: dict[str, StageOutput]) -> dict:
    layer_types = inputs["placement"].result["layer_types"]
    settings = ctx.recipe["blocks"]
    results = {}
    sources = trained_jet_blocks(inputs, "supernet")
    for kind in settings["candidates"]:
        kind_dir = stage_dir / kind
        if is_done(ctx, kind_dir):
            results[kind] = read_result(kind_dir)
            continue
        model = build_student(ctx.config(layer_types), ctx.teacher_tensors, kind, sources, seed=ctx.rt.seed)
        model.to(ctx.rt.device)
        set_trainable(model, "mixers")
        losses = ctx.train(f"blocks-{kind}", kind_dir, model,
                           lambda module, ids, step: module(input_ids=ids).logits, settings["steps"], settings["lr"])
        metrics = evaluate(ctx, model_logits(model))
        speed = prefill_speed(model, ctx)
        if ctx.rt.is_main:
            save_atomic(jet_state(model), kind_dir / "jet_blocks.pt")
        results[kind] = finish(ctx, kind_dir, {**metrics, "score": score(ctx, inputs["teacher"].result, metrics),
                                               "losses": losses, **speed})
    chosen = max(results, key=lambda k: results[k]["score"])
    if ctx.rt.is_main:
        save_atomic(torch.load(stage_dir / chosen / "jet_blocks.pt"), stage_dir / "chosen_jet_blocks.pt")
    return {"chosen": chosen, "candidates": results}


@torch.no_grad()
def prefill_speed(model: nn.Module, ctx: Context) -> dict:
    """Model forward tokens per second on one batch (measured after a warm-up)."""
    import time

    ids = ctx.val_batches[0].to(ctx.rt.device)
    model(input_ids=ids)
    t0 = time.perf_counter()
    model(input_ids=ids)
    return {"forward_tokens_per_s": ids.numel() / (time.perf_counter() - t0)}


# ----- stage 4: hardware-aware search ---------------------------------------------------

def jet_label(jet: dict) -> str:
    return f"H{jet['num_heads']}-K{jet['head_dim']}-e{float(jet['expand_v']):g}"


def stage_hardware(ctx: Context, stage_dir: Path, inputs: dict[str, StageOutput]) -> dict:
    """Every grid point starts from the initialisation rule (no trained weights, so none
    has a head start), trains `hardware.steps` steps, and is scored like the searches;
    the choice is the best score among candidates whose decode throughput reaches
    `min_relative_throughput` of the base settings'."""
    r = ctx.recipe
    settings = r["hardware"]
    layer_types = inputs["placement"].result["layer_types"]
    block = inputs["blocks"].result["chosen"]
    target = r["state_size"] or state_size(r["jet"])
    grid = candidate_grid(r["jet"], target, settings["num_heads"], settings["head_dims"], settings["expand_v"],
                          settings["max_candidates"])
    if not grid:
        raise ValueError(f"no (num_heads, head_dim, expand_v) in the hardware grid has a state of {target} "
                         "elements; widen hardware.num_heads / head_dims / expand_v or change state_size")
    results = {}
    for jet in grid:
        label = jet_label(jet)
        cand_dir = stage_dir / label
        if is_done(ctx, cand_dir):
            results[label] = read_result(cand_dir)
            continue
        model = build_student(ctx.config(layer_types, jet), ctx.teacher_tensors, block, (), seed=ctx.rt.seed)
        model.to(ctx.rt.device)
        set_trainable(model, "mixers")
        losses = ctx.train(f"hardware-{label}", cand_dir, model,
                           lambda module, ids, step: module(input_ids=ids).logits, settings["steps"], settings["lr"])
        metrics = evaluate(ctx, model_logits(model))
        speed = jetblock_throughput(jet, ctx.teacher_config["hidden_size"], ctx.rt.device)
        if ctx.rt.is_main:
            save_atomic(jet_state(model), cand_dir / "jet_blocks.pt")
        results[label] = finish(ctx, cand_dir, {"jet": jet, **metrics,
                                                "score": score(ctx, inputs["teacher"].result, metrics),
                                                "losses": losses, **speed})
    base = results[jet_label(grid[0])]["decode_tokens_per_s"]
    fast_enough = [k for k in results
                   if results[k]["decode_tokens_per_s"] >= settings["min_relative_throughput"] * base]
    chosen = max(fast_enough, key=lambda k: results[k]["score"])
    if ctx.rt.is_main:
        save_atomic(torch.load(stage_dir / chosen / "jet_blocks.pt"), stage_dir / "chosen_jet_blocks.pt")
    return {"chosen": chosen, "jet": results[chosen]["jet"], "state_size": target, "candidates": results}


# ----- stage 5: final distillation (and baselines) --------------------------------------


def provenance(ctx: Context, block: str, layer_types: list[str]) -> dict:
    return {"tool": "vllm_jetnemotron.converter (PostNAS)", "teacher": str(ctx.recipe["teacher"]),
            "block": block, "static_conv_layers": [i for i, t in enumerate(layer_types) if t == "jet"]
            if block == "gdn" else []}


def distil_layout(ctx: Context, stage_dir: Path, name: str, layer_types: list[str],
                  inputs: dict[str, StageOutput], steps: int) -> dict:
    """Build the layout with the chosen block and JetBlock dims, starting from the
    longest-trained JetBlocks that fit (the chosen block's, the hardware choice's when
    its dims differ from the base, the super-network's), distil it (final.* settings)
    and evaluate it; weights in model.pt."""
    settings = ctx.recipe["final"]
    block, jet = inputs["blocks"].result["chosen"], inputs["hardware"].result["jet"]
    config = ctx.config(layer_types, jet, provenance(ctx, block, layer_types))
    sources = trained_jet_blocks(inputs, "blocks", "hardware", "supernet")
    model = build_student(config, ctx.teacher_tensors, block, sources, seed=ctx.rt.seed).to(ctx.rt.device)
    set_trainable(model, settings["trainable"])
    losses = ctx.train(name, stage_dir, model, lambda module, ids, step: module(input_ids=ids).logits,
                       steps, settings["lr"], warmup=settings["warmup"], data=ctx.final_training)
    metrics = evaluate(ctx, model_logits(model))
    if ctx.rt.is_main:
        save_atomic({"config": config.to_dict(), "state_dict": {n: t.cpu() for n, t in model.state_dict().items()}},
                    stage_dir / "model.pt")
    return {"layer_types": layer_types, "jet": jet, "block": block, **metrics, "losses": losses,
            "state_bytes_4k": config.state_bytes_per_sequence(4096),
            "state_bytes_64k": config.state_bytes_per_sequence(65536)}


def stage_final(ctx: Context, stage_dir: Path, inputs: dict[str, StageOutput]) -> dict:
    return distil_layout(ctx, stage_dir, "final", inputs["placement"].result["layer_types"], inputs,
                         ctx.recipe["final"]["steps"])


def stage_baselines(ctx: Context, stage_dir: Path, inputs: dict[str, StageOutput]) -> dict:
    """`placements`: {name: its distil_layout result}, each in its own sub-folder."""
    budget = ctx.recipe["budget"]
    layouts = {"uniform": uniform_layer_types(ctx.num_layers, budget["attn"], budget["swa"]),
               "all_jet": ["jet"] * ctx.num_layers}
    steps = ctx.recipe["baselines"]["steps"] or ctx.recipe["final"]["steps"]
    results = {}
    for name in ctx.recipe["baselines"]["placements"]:
        sub = stage_dir / name
        results[name] = read_result(sub) if is_done(ctx, sub) else finish(
            ctx, sub, distil_layout(ctx, sub, f"baseline-{name}", layouts[name], inputs, steps))
    return {"placements": results}


def load_saved_model(path: Path, device: torch.device):
    from .modeling import JetNemotronForCausalLM
    from .students import enable_training_kernels

    saved = torch.load(path, map_location="cpu", weights_only=False)
    model = JetNemotronForCausalLM(JetNemotronConfig(**saved["config"])).float()
    model.load_state_dict(saved["state_dict"])
    enable_training_kernels(model)
    return model.to(device).eval()


# ----- stage 6: speculative draft ---------------------------------------------------------

def stage_draft(ctx: Context, stage_dir: Path, inputs: dict[str, StageOutput]) -> dict:
    """A small all-`attn` model (vLLM's draft_model method needs every draft layer in
    one KV cache group): `draft.num_layers` evenly spaced teacher layers with the
    teacher's embeddings, distilled from the converted model."""
    settings = ctx.recipe["draft"]
    n = min(settings["num_layers"], ctx.num_layers)
    layer_map = sorted({round(i * (ctx.num_layers - 1) / max(1, n - 1)) for i in range(n)})
    config = ctx.config(["attn"] * len(layer_map))
    model = build_student(config, ctx.teacher_tensors, "jet", (), layer_map=layer_map, seed=ctx.rt.seed)
    model.to(ctx.rt.device)
    set_trainable(model, "all")
    target = load_saved_model(inputs["final"].folder / "model.pt", ctx.rt.device)
    for p in target.parameters():
        p.requires_grad_(False)
    losses = ctx.train("draft", stage_dir, model, lambda module, ids, step: module(input_ids=ids).logits,
                       settings["steps"], settings["lr"],
                       teacher_logits=lambda ids: target(input_ids=ids).logits.float(), data=ctx.final_training)
    metrics = evaluate(ctx, model_logits(model))
    acceptance = draft_agreement(model, target, ctx)
    if ctx.rt.is_main:
        save_atomic({"config": config.to_dict(), "state_dict": {k: t.cpu() for k, t in model.state_dict().items()}},
                    stage_dir / "model.pt")
    return {"layer_map": layer_map, **metrics, "top1_agreement": acceptance, "losses": losses}


@torch.no_grad()
def draft_agreement(draft: nn.Module, target: nn.Module, ctx: Context) -> float:
    """Share of validation positions where the draft's greedy token equals the target's
    (the per-token acceptance rate of greedy speculative decoding, to first order)."""
    same, count = 0, 0
    for ids in ctx.val_batches:
        ids = ids.to(ctx.rt.device)
        same += int((draft(input_ids=ids).logits.argmax(-1) == target(input_ids=ids).logits.argmax(-1)).sum())
        count += ids.numel()
    return same / count


# ----- stage 6: EAGLE-3 head ---------------------------------------------------------------

def stage_eagle3(ctx: Context, stage_dir: Path, inputs: dict[str, StageOutput]) -> dict:
    """An EAGLE-3 head over the final model's residual stream (`eagle3.aux_layers`), trained
    with `num_speculative_tokens` unrolled draft steps on the target's distributions."""
    settings = ctx.recipe["eagle3"]
    target = load_saved_model(inputs["final"].folder / "model.pt", ctx.rt.device)
    for p in target.parameters():
        p.requires_grad_(False)
    head = Eagle3Head.for_target(target, settings["aux_layers"] or default_aux_layers(ctx.num_layers), ctx.rt.seed)
    head.to(ctx.rt.device)
    steps = settings["num_speculative_tokens"]
    target_pass = TargetPass(target, head.aux_layers, steps)
    losses = ctx.train("eagle3", stage_dir, head, lambda module, ids, step: module(*target_pass.inputs(ids), steps),
                       settings["steps"], settings["lr"], teacher_logits=target_pass.logits,
                       warmup=settings["warmup"], data=ctx.final_training)
    agreement = eagle3_agreement(head, target_pass, ctx)
    prompts = [row[:ctx.recipe["seq_len"] // 4].tolist() for batch in ctx.val_batches for row in batch]
    prompts = prompts[:settings["eval_prompts"]]
    verifications = accepted = 0
    for prompt in prompts:
        _, v, a = speculative_greedy(target, head, prompt, settings["eval_new_tokens"], steps)
        verifications, accepted = verifications + v, accepted + a
    if ctx.rt.is_main:
        save_atomic({"config": head.config, "state_dict": {k: t.cpu() for k, t in head.state_dict().items()}},
                    stage_dir / "model.pt")
    return {"aux_layers": head.aux_layers, "top1_agreement_by_step": agreement,
            "acceptance_length": 1 + accepted / max(1, verifications), "verifications": verifications,
            "accepted": accepted, "prompts": len(prompts), "losses": losses}


@torch.no_grad()
def eagle3_agreement(head: Eagle3Head, target_pass: TargetPass, ctx: Context) -> list[float]:
    """Per draft step, the share of validation positions where the head's greedy token
    equals the target's, the earlier drafts being right (teacher-forced)."""
    same, count = torch.zeros(target_pass.steps, dtype=torch.long), 0
    for ids in ctx.val_batches:
        ids = ids.to(ctx.rt.device)
        wanted = target_pass.logits(ids).argmax(-1)  # [B, steps, N]
        drafted = head(*target_pass.inputs(ids), target_pass.steps).argmax(-1)
        same += (drafted == wanted).sum(dim=(0, 2)).cpu()
        count += wanted[:, 0].numel()
    return [int(s) / count for s in same]


STAGE_FUNCTIONS = {"teacher": stage_teacher, "supernet": stage_supernet, "placement": stage_placement,
                   "blocks": stage_blocks, "hardware": stage_hardware, "final": stage_final,
                   "baselines": stage_baselines, "draft": stage_draft,
                   "eagle3": stage_eagle3}
assert tuple(STAGE_FUNCTIONS) == STAGE_NAMES
