"""The conversion recipe: one typed schema (pydantic) with defaults, read from YAML or
JSON and overridden by the command line (nanoGPT-style configuration, no hidden state).

`build_recipe` validates every key, type and range before any stage runs and returns
plain nested values (`recipe["supernet"]["steps"]`). An unknown key is an error naming
it, so a typo never silently falls back to a default; numbers may be written the way
people write them (`lr: 1e-3`, which YAML reads as a string, is the number 0.001).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StrictInt,
    ValidationError,
    field_serializer,
    field_validator,
)


class RecipeError(ValueError):
    """A recipe value or command-line flag the converter cannot use."""


def _no_bool(value: Any) -> Any:
    if isinstance(value, bool):
        raise ValueError("Input should be a number, not a boolean")
    return value


# Integers must be written as integers; numbers may be strings ("1e-3", as YAML reads it).
PositiveInt = Annotated[StrictInt, Field(gt=0)]
NonNegativeInt = Annotated[StrictInt, Field(ge=0)]
Number = Annotated[float, BeforeValidator(_no_bool)]
PositiveFloat = Annotated[Number, Field(gt=0)]
NonNegativeFloat = Annotated[Number, Field(ge=0)]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_default=True)


class Budget(_Section):
    attn: NonNegativeInt = 2        # full-attention layers kept
    swa: NonNegativeInt = 1         # sliding-window layers kept
    swa_window: PositiveInt = 64    # keys a sliding-window query sees (itself included)


class JetSettings(_Section):
    """The JetBlock of the super-network (and the base of the grid search)."""

    num_heads: PositiveInt = 4
    head_dim: PositiveInt = 32
    expand_v: PositiveFloat = 2.0
    conv_size: PositiveInt = 4
    dconv_generator_reduction: PositiveInt = 8
    norm_eps: PositiveFloat = 1e-5

    @field_serializer("norm_eps")
    def _official_norm_eps(self, value: float) -> str:
        # the official config.json writes it as a string: "1e-5"
        return re.sub(r"e([+-])0+(\d)", r"e\1\2", f"{value:g}")


class Supernet(_Section):
    steps: NonNegativeInt = 200
    lr: PositiveFloat = 1e-3
    warmup: NonNegativeInt = 20


class SupernetStage(Supernet):
    # layer-wise attention transfer before the once-for-all steps (stages.stage_supernet)
    transfer_steps: NonNegativeInt = 0
    transfer_lr: PositiveFloat = 1e-3


class PlacementWeights(_Section):
    loss: NonNegativeFloat = 1.0
    retrieval: NonNegativeFloat = 1.0
    user: NonNegativeFloat = 1.0


class Placement(_Section):
    beam_width: PositiveInt = 2
    eval_batches: PositiveInt = 8          # validation batches per candidate placement
    pair_ablation: bool = True             # score every pair of kept layers (L*(L-1)/2 layouts)
    candidate_layers: PositiveInt | None = None  # beam over the layers best in the ablation (None: all)
    weights: PlacementWeights = PlacementWeights()


class Retrieval(_Section):
    """The in-context retrieval task (`data.RetrievalTask`) every evaluation scores, on
    held-out records; `train_share` of each training batch carries training-split ones."""

    samples: PositiveInt = 64   # held-out retrieval prompts
    key_len: PositiveInt = 2
    value_len: PositiveInt = 4
    pairs: PositiveInt = 8      # key-value records per prompt
    queries: PositiveInt = 4    # of them asked for at the end
    train_share: Annotated[Number, Field(ge=0, le=1)] = 0.0


class Blocks(_Section):
    candidates: Annotated[list[Literal["jet", "gdn"]], Field(min_length=1)] = ["jet", "gdn"]
    steps: NonNegativeInt = 60
    lr: PositiveFloat = 1e-3


class Hardware(_Section):
    steps: NonNegativeInt = 60
    lr: PositiveFloat = 1e-3
    num_heads: Annotated[list[PositiveInt], Field(min_length=1)] = [2, 4, 8]
    head_dims: Annotated[list[PositiveInt], Field(min_length=1)] = [32, 64, 128]
    expand_v: Annotated[list[PositiveFloat], Field(min_length=1)] = [1.0, 2.0, 4.0]
    min_relative_throughput: NonNegativeFloat = 0.9  # of the base configuration's decode throughput
    max_candidates: PositiveInt = 4


class Final(Supernet):
    steps: NonNegativeInt = 300
    lr: PositiveFloat = 5e-4
    trainable: Literal["all", "mixers"] = "all"
    # share of the training windows drawn from a named data file (its path inside a `data`
    # folder, or its file name), here and for the draft and EAGLE-3 heads; the rest of the
    # windows come from all the data, e.g. {chat.jsonl: 0.25} to teach a chat format
    data_mix: dict[str, Annotated[Number, Field(gt=0, le=1)]] = {}

    @field_validator("data_mix")
    @classmethod
    def _shares_fit(cls, value: dict[str, float]) -> dict[str, float]:
        if sum(value.values()) > 1:
            raise ValueError(f"the shares add up to {sum(value.values()):g}; at most 1")
        return value


class Baselines(_Section):
    placements: list[Literal["uniform", "all_jet"]] = []
    steps: NonNegativeInt = 0


class Draft(_Section):
    num_layers: PositiveInt = 1
    steps: NonNegativeInt = 150
    lr: PositiveFloat = 1e-3
    num_speculative_tokens: PositiveInt = 3

    @field_validator("num_layers")
    @classmethod
    def _one_layer(cls, value: int) -> int:
        # vLLM (0.32) asserts that all draft layers share one KV-cache group; with a hybrid
        # target it groups full-attention layers one per group whenever some layer kind
        # has a single layer, so a deeper draft would not load.
        if value != 1:
            raise ValueError("must be 1 (vLLM needs every draft layer in one KV-cache group)")
        return value


class Eagle3(_Section):
    steps: NonNegativeInt = 600
    lr: PositiveFloat = 3e-3
    warmup: NonNegativeInt = 30
    num_speculative_tokens: PositiveInt = 3  # drafts per verification, and the unrolled steps trained
    aux_layers: list[NonNegativeInt] | None = None  # residual-stream indices read (None: vLLM's rule)
    eval_prompts: PositiveInt = 16       # validation prompts of the simulated speculative decoding
    eval_new_tokens: PositiveInt = 64    # greedy tokens generated after each

    @field_validator("aux_layers")
    @classmethod
    def _three_layers(cls, value: list[int] | None) -> list[int] | None:
        if value is not None and len(set(value)) != 3:
            raise ValueError("expected three distinct layer indices (EAGLE-3 reads low, middle and high layers)")
        return value


class Eval(_Section):
    files: list[str] = []  # jsonl with `prompt` and `answer`, scored by answer loss
    lm_eval_tasks: list[str] = []            # lm-eval tasks run on the converted model, last
    lm_eval_include_path: str | None = None  # folder of the user's own lm-eval task YAMLs
    lm_eval_limit: PositiveInt | None = None  # documents per task (None: all)


class Export(_Section):
    dtype: Literal["bfloat16", "float16", "float32"] = "bfloat16"


class Recipe(_Section):
    teacher: str | None = None     # Hugging Face folder (Qwen2 / Qwen2.5 / Qwen3 / Llama layout)
    data: list[str] = []           # local .txt/.py/.md/.jsonl files or folders, or a `datasets` name
    workdir: str | None = None     # stage checkpoints, logs, cached tokens
    out: str | None = None         # the exported checkpoint folder (created at the very end)
    seed: NonNegativeInt = 0
    device: Annotated[str, Field(pattern=r"^(auto|cpu|cuda(:\d+)?)$")] = "auto"
    seq_len: PositiveInt = 256     # training and evaluation context
    batch_size: PositiveInt = 8    # sequences per optimiser step (split over processes)
    val_fraction: Annotated[Number, Field(gt=0, lt=1)] = 0.05  # held-out share of the tokens
    max_tokens: PositiveInt = 20_000_000  # cap on tokenised data
    # forwards in bf16 autocast (AVX-512 BF16 / AMX on CPU, tensor cores on GPU); weights, the
    # optimiser, the JetBlock recurrence and the losses stay float32
    precision: Literal["float32", "bfloat16"] = "float32"
    save_every: PositiveInt = 50   # checkpoint period in optimiser steps
    budget: Budget = Budget()
    jet: JetSettings = JetSettings()
    state_size: PositiveInt | None = None  # recurrent-state elements per JetBlock (H*K*V); None: from `jet`
    supernet: SupernetStage = SupernetStage()
    placement: Placement = Placement()
    retrieval: Retrieval = Retrieval()
    blocks: Blocks = Blocks()
    hardware: Hardware = Hardware()
    final: Final = Final()
    baselines: Baselines = Baselines()  # e.g. placements [uniform, all_jet], for the report
    draft: Draft = Draft()
    eagle3: Eagle3 = Eagle3()
    eval: Eval = Eval()
    export: Export = Export()

    @field_validator("data", mode="before")
    @classmethod
    def _one_source(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value


STAGE_STEP_KEYS = ("supernet", "blocks", "hardware", "final", "baselines", "draft", "eagle3")


def _expected(error: dict) -> str:
    """What a pydantic error says was expected, in the recipe's words."""
    if error["type"] == "string_pattern_mismatch":
        return "expected auto, cpu, cuda or cuda:N"
    if error["type"] == "model_type":
        return "expected a mapping"
    return error["msg"].replace("Value error, ", "")


def _known_keys(loc: tuple) -> list[str]:
    model: type[BaseModel] = Recipe
    for part in loc[:-1]:
        model = model.model_fields[part].annotation
    return sorted(model.model_fields)


def _describe(error: ValidationError) -> str:
    lines = []
    for e in error.errors():
        loc = tuple(e["loc"])
        key = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in loc)[1:]
        if e["type"] == "extra_forbidden":
            lines.append(f"unknown recipe key {key!r}; known keys here: {_known_keys(loc)}")
        else:
            lines.append(f"recipe key {key} = {e['input']!r}: {_expected(e)}")
    return "; ".join(lines)


def _merge(base: dict, update: dict) -> dict:
    """`update` over `base`, mapping into mapping (no checks: the schema does them)."""
    out = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def read_recipe_file(path: str | Path) -> dict:
    """The values of a YAML or JSON recipe file, relative paths made absolute."""
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"recipe file {path} does not exist")
    text = path.read_text()
    if path.suffix in (".yaml", ".yml"):
        import yaml

        try:
            values = yaml.safe_load(text)
        except yaml.YAMLError as error:
            mark = getattr(error, "problem_mark", None)
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
            raise RecipeError(f"recipe file {path}: YAML syntax error{where}: "
                              f"{getattr(error, 'problem', None) or error}") from None
    else:
        try:
            values = json.loads(text)
        except json.JSONDecodeError as error:
            raise RecipeError(f"recipe file {path}: invalid JSON at line {error.lineno}, "
                              f"column {error.colno}: {error.msg}") from None
    values = {} if values is None else values
    if not isinstance(values, dict):
        raise RecipeError(f"recipe file {path} must hold a mapping at the top level, got {type(values).__name__}")
    # relative paths in a recipe are relative to the recipe file
    for key in ("teacher", "workdir", "out"):
        if isinstance(values.get(key), str) and not Path(values[key]).is_absolute():
            values[key] = str((path.parent / values[key]).resolve())
    if isinstance(values.get("data"), str):
        values["data"] = [values["data"]]
    if isinstance(values.get("data"), list):
        values["data"] = [str((path.parent / d).resolve()) if isinstance(d, str) and (path.parent / d).exists()
                          else d for d in values["data"]]
    return values


def build_recipe(file_values: dict | None = None, overrides: dict | None = None) -> dict:
    """Defaults <- recipe file <- command-line overrides, validated; plain nested values."""
    try:
        recipe = Recipe.model_validate(_merge(file_values or {}, overrides or {})).model_dump()
    except ValidationError as error:
        raise RecipeError(_describe(error)) from None
    for key in ("teacher", "workdir", "out"):
        if not recipe[key]:
            raise RecipeError(f"no {key!r} given: set it in the recipe or pass --{key}")
    if not recipe["data"]:
        raise RecipeError("no training data given: set `data` in the recipe or pass --data")
    return recipe
