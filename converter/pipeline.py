"""The stage table of a conversion and the fingerprints that keep a workdir consistent.

Each stage has one folder in the workdir, reads a slice of the recipe and the outputs of
named earlier stages. When a stage starts it records its fingerprint in
`<folder>/fingerprint.json` (and, when it finishes, in `result.json`):

* `recipe`: the values of its recipe slice. A rerun whose recipe differs there stops
  before any work with a message naming the changed keys and `--restart-from STAGE`:
  resuming would mix the two recipes in one set of weights.
* `inputs`: content hashes of the teacher's weights and the tokenised data, the seed,
  and the hash of each earlier stage's `result.json` it reads. A stage whose inputs
  changed is redone from scratch (the folder is cleared), finished or not.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from .recipe import RecipeError

# Recipe keys (dotted prefixes) that decide the training data and its arithmetic, the
# evaluation sets, and the score the searches rank by.
DATA_KEYS = ("seq_len", "batch_size", "val_fraction", "max_tokens", "precision", "retrieval.key_len",
             "retrieval.value_len", "retrieval.pairs", "retrieval.queries", "retrieval.train_share")
EVAL_KEYS = DATA_KEYS + ("placement.eval_batches", "retrieval.samples", "eval.files")
SCORE_KEYS = EVAL_KEYS + ("placement.weights",)


@dataclass(frozen=True)
class Stage:
    name: str
    folder: str
    recipe_keys: tuple[str, ...]  # dotted prefixes of the recipe it reads
    reads: tuple[str, ...]        # earlier stages whose outputs it uses


STAGES = (
    Stage("teacher", "0-teacher", EVAL_KEYS, ()),
    Stage("supernet", "1-supernet", DATA_KEYS + ("budget", "jet", "supernet"), ()),
    Stage("placement", "2-placement", EVAL_KEYS + ("budget", "jet", "placement"), ("teacher", "supernet")),
    Stage("blocks", "3-blocks", SCORE_KEYS + ("budget.swa_window", "jet", "blocks"),
          ("teacher", "supernet", "placement")),
    Stage("hardware", "4-hardware", SCORE_KEYS + ("budget.swa_window", "jet", "state_size", "hardware"),
          ("teacher", "placement", "blocks")),
    Stage("final", "5-final", EVAL_KEYS + ("budget.swa_window", "jet", "final"),
          ("supernet", "placement", "blocks", "hardware")),
    Stage("baselines", "5-baselines", EVAL_KEYS + ("budget", "jet", "final", "baselines"),
          ("supernet", "blocks", "hardware")),
    Stage("draft", "6-draft", EVAL_KEYS + ("budget.swa_window", "jet", "draft.num_layers", "draft.steps",
                                           "draft.lr", "final.data_mix"), ("final",)),
    Stage("eagle3", "6-eagle3", EVAL_KEYS + ("eagle3", "final.data_mix"), ("final",)),
)
STAGE_NAMES = tuple(s.name for s in STAGES)
BY_NAME = {s.name: s for s in STAGES}


def stage_dir(workdir: Path, name: str) -> Path:
    return Path(workdir) / BY_NAME[name].folder


def flatten(values: dict, prefix: str = "") -> dict:
    """{"final": {"steps": 4}} -> {"final.steps": 4}."""
    out = {}
    for key, value in values.items():
        if isinstance(value, dict):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def recipe_slice(recipe: dict, stage: Stage) -> dict:
    """The recipe values `stage` reads, by dotted key."""
    return {key: value for key, value in sorted(flatten(recipe).items())
            if any(key == p or key.startswith(p + ".") for p in stage.recipe_keys)}


def tensors_digest(tensors: dict[str, torch.Tensor]) -> str:
    """sha256 of names, dtypes, shapes and bytes, in name order."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.view(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def file_digest(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def result_digest(workdir: Path, name: str) -> str:
    """What a later stage records of `name`'s output: the hash of its result.json."""
    return file_digest(stage_dir(workdir, name) / "result.json")


def changed_keys(recorded: dict, current: dict) -> list[str]:
    return [f"{key} {recorded.get(key, '(unset)')!r} -> {current.get(key, '(unset)')!r}"
            for key in sorted(set(recorded) | set(current)) if recorded.get(key) != current.get(key)]


def read_fingerprint(folder: Path) -> dict | None:
    path = folder / "fingerprint.json"
    return json.loads(path.read_text()) if path.is_file() else None


def check_recipe_unchanged(workdir: Path, recipe: dict) -> None:
    """Refuse to go on where a begun stage's recorded recipe slice differs from `recipe`;
    the message names every changed key and the earliest stage to restart from."""
    problems, first = [], None
    for stage in STAGES:
        folder = stage_dir(workdir, stage.name)
        if not folder.exists():
            continue
        recorded = read_fingerprint(folder)
        if recorded is None and not any(folder.iterdir()):
            continue  # stopped between creating the folder and recording its fingerprint
        if recorded is None:
            problems.append(f"stage {stage.name} ({folder}) has no fingerprint.json (an older converter "
                            "wrote it)")
        else:
            changes = changed_keys(recorded["recipe"], recipe_slice(recipe, stage))
            if not changes:
                continue
            problems.append(f"stage {stage.name} ran with a different recipe: {', '.join(changes)}")
        first = first or stage.name
    if problems:
        raise RecipeError(f"workdir {workdir}: {'; '.join(problems)}. Rerun with --restart-from {first} "
                          f"to redo {first} and every stage after it, or restore the recipe values")


def restart_from(workdir: Path, name: str) -> None:
    """Remove the folders of stage `name` and of every stage after it."""
    for stage in STAGES[STAGE_NAMES.index(name):]:
        shutil.rmtree(stage_dir(workdir, stage.name), ignore_errors=True)
