"""The conversion recipe: plain nested values with defaults, read from YAML or JSON and
overridden by the command line (nanoGPT-style configuration, no hidden state).

Every key the converter reads is listed in `DEFAULT_RECIPE`; an unknown key in a recipe
file is an error naming it, so a typo never silently falls back to a default.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any


class RecipeError(ValueError):
    """A recipe value or command-line flag the converter cannot use."""


DEFAULT_RECIPE: dict[str, Any] = {
    "teacher": None,           # Hugging Face folder (Qwen2 / Qwen2.5 / Qwen3 / Llama layout)
    "data": [],                # local .txt/.py/.md/.jsonl files or folders, or a `datasets` name
    "workdir": None,           # stage checkpoints, logs, cached tokens
    "out": None,               # the exported checkpoint folder (created at the very end)
    "seed": 0,
    "device": "auto",          # auto | cpu | cuda | cuda:N
    "seq_len": 256,            # training and evaluation context
    "batch_size": 8,           # sequences per optimiser step (split over processes)
    "val_fraction": 0.05,      # held-out share of the tokens
    "max_tokens": 20_000_000,  # cap on tokenised data
    "save_every": 50,          # checkpoint period in optimiser steps
    "budget": {
        "attn": 2,             # full-attention layers kept
        "swa": 1,              # sliding-window layers kept
        "swa_window": 64,      # keys a sliding-window query sees (itself included)
    },
    "jet": {                   # JetBlock of the super-network (and the base of the grid search)
        "num_heads": 4, "head_dim": 32, "expand_v": 2.0, "conv_size": 4,
        "dconv_generator_reduction": 8, "norm_eps": "1e-5",
    },
    "state_size": None,        # recurrent-state elements per JetBlock (H*K*V); None: from `jet`
    "supernet": {"steps": 200, "lr": 1e-3, "warmup": 20},
    "placement": {
        "beam_width": 2,
        "eval_batches": 8,          # validation batches per candidate placement
        "retrieval_samples": 64,    # retrieval prompts per candidate placement
        "retrieval_value_len": 4,   # tokens of the value to recall
        "weights": {"loss": 1.0, "retrieval": 1.0, "user": 1.0},
    },
    "blocks": {"candidates": ["jet", "gdn"], "steps": 60, "lr": 1e-3},
    "hardware": {
        "steps": 60, "lr": 1e-3,
        "num_heads": [2, 4, 8],
        "head_dims": [32, 64, 128],
        "expand_v": [1.0, 2.0, 4.0],
        "min_relative_throughput": 0.9,  # of the base configuration's decode throughput
        "max_candidates": 4,
    },
    "final": {"steps": 300, "lr": 5e-4, "warmup": 20, "trainable": "all"},  # all | mixers
    "baselines": {"placements": [], "steps": 0},  # e.g. [uniform, all_jet], for the report
    "draft": {"num_layers": 1, "steps": 150, "lr": 1e-3, "num_speculative_tokens": 3},
    "eval": {"files": []},      # jsonl with `prompt` and `answer`, scored by answer loss
    "export": {"dtype": "bfloat16"},
}

STAGE_STEP_KEYS = ("supernet", "blocks", "hardware", "final", "baselines", "draft")


def _merge(base: dict, update: dict, where: str) -> dict:
    out = copy.deepcopy(base)
    for key, value in update.items():
        if key not in base:
            raise RecipeError(f"unknown recipe key {where}{key!r}; known keys: {sorted(base)}")
        if isinstance(base[key], dict) and value is not None:
            if not isinstance(value, dict):
                raise RecipeError(f"recipe key {where}{key} must be a mapping, got {value!r}")
            # free-form mappings (the jet settings) accept only known keys too
            out[key] = _merge(base[key], value, f"{where}{key}.")
        else:
            out[key] = value
    return out


def read_recipe_file(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"recipe file {path} does not exist")
    text = path.read_text()
    if path.suffix in (".yaml", ".yml"):
        import yaml

        values = yaml.safe_load(text) or {}
    else:
        values = json.loads(text)
    if not isinstance(values, dict):
        raise RecipeError(f"recipe file {path} must hold a mapping at the top level")
    # relative paths in a recipe are relative to the recipe file
    for key in ("teacher", "workdir", "out"):
        if isinstance(values.get(key), str) and not Path(values[key]).is_absolute():
            values[key] = str((path.parent / values[key]).resolve())
    if isinstance(values.get("data"), str):
        values["data"] = [values["data"]]
    if isinstance(values.get("data"), list):
        values["data"] = [str((path.parent / d).resolve()) if (path.parent / d).exists() else d
                          for d in values["data"]]
    return values


def build_recipe(file_values: dict | None = None, overrides: dict | None = None) -> dict:
    """DEFAULT_RECIPE <- recipe file <- command-line overrides, then checked."""
    recipe = _merge(DEFAULT_RECIPE, file_values or {}, "")
    recipe = _merge(recipe, overrides or {}, "")
    for key in ("teacher", "workdir", "out"):
        if not recipe[key]:
            raise RecipeError(f"no {key!r} given: set it in the recipe or pass --{key}")
    if not recipe["data"]:
        raise RecipeError("no training data given: set `data` in the recipe or pass --data")
    for key in ("seq_len", "batch_size", "save_every"):
        if not isinstance(recipe[key], int) or recipe[key] <= 0:
            raise RecipeError(f"recipe key {key} must be a positive integer, got {recipe[key]!r}")
    budget = recipe["budget"]
    for key in ("attn", "swa"):
        if not isinstance(budget[key], int) or budget[key] < 0:
            raise RecipeError(f"budget.{key} must be a non-negative integer, got {budget[key]!r}")
    unknown = set(recipe["blocks"]["candidates"]) - {"jet", "gdn"}
    if unknown or not recipe["blocks"]["candidates"]:
        raise RecipeError(f"blocks.candidates must be a non-empty subset of ['jet', 'gdn'], "
                          f"got {recipe['blocks']['candidates']!r}")
    unknown = set(recipe["baselines"]["placements"]) - {"uniform", "all_jet"}
    if unknown:
        raise RecipeError(f"baselines.placements must be a subset of ['uniform', 'all_jet'], got {sorted(unknown)}")
    if recipe["final"]["trainable"] not in ("all", "mixers"):
        raise RecipeError(f"final.trainable must be 'all' or 'mixers', got {recipe['final']['trainable']!r}")
    if recipe["draft"]["num_layers"] != 1:
        # vLLM (0.32) asserts that all draft layers share one KV-cache group; with a hybrid
        # target it groups full-attention layers one per group whenever some layer kind
        # has a single layer, so a deeper draft would not load.
        raise RecipeError(f"draft.num_layers must be 1 (vLLM needs every draft layer in one "
                          f"KV-cache group), got {recipe['draft']['num_layers']!r}")
    if recipe["export"]["dtype"] not in ("bfloat16", "float16", "float32"):
        raise RecipeError(f"export.dtype must be bfloat16, float16 or float32, got {recipe['export']['dtype']!r}")
    return recipe
