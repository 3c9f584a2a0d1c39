"""YAML recipes: one registry of recipe kinds, and the blocks every kind shares.

A recipe is a YAML mapping that says which model, which data, which method and where the
result goes. Each method registers its kind in its ``pipeline.py``: the top-level keys that
mark it (``pruning``, ``merge_method``, ``mask``, ``finetune``, ``analysis``,
``basis_sharing``, ``experiment``/``spd``), a parser that checks every key before any work,
a runner and a summary printer. ``hf-sparse run FILE`` (and :func:`run_recipe`) dispatch on
those keys; the method subcommands (``prune``, ``merge``, ...) are aliases that build the same
mapping from flags.

Example (``recipes/quickstart.yaml``)::

    model: smollm2-135m
    calibration: {dataset: wikitext2, num_samples: 64, sequence_length: 512, seed: 0}
    pruning:
      sparsegpt: {sparsity: 0.5}
    evaluation: {dataset: wikitext2, sequence_length: 512, num_windows: 32}
    output_dir: outputs/smollm2-sparsegpt-50
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml

from .config_utils import check_positive_ints, help_field
from .data import check_data_source


@dataclass
class CalibrationConfig:
    dataset: str = help_field(
        "Named set (wikitext2, ...), local file, or Hub dataset.", "wikitext2"
    )
    num_samples: int = help_field("Number of calibration windows.", 64)
    sequence_length: int = help_field("Tokens per calibration window.", 512)
    seed: int = help_field("Seed of the window sampling.", 0)
    batch_size: int = help_field("Windows per forward pass while calibrating.", 8)
    text_field: str = help_field("Column holding the text in jsonl/parquet data.", "text")

    def __post_init__(self) -> None:
        check_positive_ints(self, ("num_samples", "sequence_length", "batch_size"), "calibration")
        check_data_source(self.dataset)

    def windows(self, tokenizer) -> torch.Tensor:
        """``[num_samples, sequence_length]`` token ids drawn from the dataset with ``seed``."""
        from .data import calibration_windows

        return calibration_windows(
            tokenizer, self.dataset, self.num_samples, self.sequence_length, self.seed,
            self.text_field,
        )  # fmt: skip


@dataclass
class EvaluationConfig:
    dataset: str = help_field("Text to measure perplexity on (evaluation split).", "wikitext2")
    sequence_length: int = help_field("Tokens per non-overlapping window.", 512)
    num_windows: int | None = help_field("First N windows; None = the whole text.", 32)
    batch_size: int = help_field("Windows per forward pass.", 4)
    text_field: str = help_field("Column holding the text in jsonl/parquet data.", "text")

    def __post_init__(self) -> None:
        check_positive_ints(self, ("sequence_length", "batch_size"), "evaluation")
        if self.num_windows is not None:
            check_positive_ints(self, ("num_windows",), "evaluation")
        check_data_source(self.dataset)

    def windows(self, tokenizer) -> torch.Tensor:
        """The first ``num_windows`` non-overlapping windows of the evaluation text."""
        from .data import evaluation_windows

        return evaluation_windows(
            tokenizer, self.dataset, self.sequence_length, self.num_windows, self.text_field
        )


@dataclass(frozen=True)
class RecipeKind:
    """How one method reads, runs and reports its recipes.

    ``parse(mapping, where)`` returns the method's recipe object, checking every key and value
    before any work; ``run(recipe, overwrite=..., show_progress=...)`` does the work and saves
    the output; ``summarize(result)`` returns the lines ``hf-sparse`` prints.
    """

    name: str
    keys: tuple[str, ...]  # top-level keys, any of which marks a recipe of this kind
    parse: Callable[[dict[str, Any], str], Any]
    run: Callable[..., Any]
    summarize: Callable[[Any], str]
    model_key: str | None = "model"  # where --model goes (None: the kind takes no model)
    priority: int = 0  # the higher wins when several kinds' keys are present


RECIPE_KINDS: dict[str, RecipeKind] = {}


def register_recipe_kind(kind: RecipeKind) -> RecipeKind:
    """Add a kind (a second registration under the same name replaces the first)."""
    RECIPE_KINDS[kind.name] = kind
    return kind


def read_recipe_file(path: str | os.PathLike) -> dict[str, Any]:
    """The YAML mapping of a recipe file (any recipe kind), with clear errors."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"recipe {path} does not exist")
    if path.is_dir():
        raise IsADirectoryError(f"recipe {path} is a folder; pass a .yaml file (see recipes/)")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        raise ValueError(f"recipe {path} is not valid YAML: {error}") from error
    if not isinstance(data, dict):
        raise ValueError(f"recipe {path} must be a YAML mapping, got {type(data).__name__}")
    return data


def recipe_kind_of(data: dict[str, Any], where: str = "recipe") -> RecipeKind:
    """The registered kind whose marking keys ``data`` holds (the highest priority wins).

    Kinds register when their method package is imported; ``import hf_sparse`` imports all.
    """
    matches = [k for k in RECIPE_KINDS.values() if any(key in data for key in k.keys)]
    if not matches:
        marks = ", ".join(f"{k.name} ({' or '.join(k.keys)})" for k in RECIPE_KINDS.values())
        raise ValueError(
            f"{where} is no known recipe kind: it has keys {sorted(data)}, and a recipe needs "
            f"the key of one kind: {marks}"
        )
    top = max(k.priority for k in matches)
    best = [k for k in matches if k.priority == top]
    if len(best) > 1:
        raise ValueError(
            f"{where} mixes the keys of several recipe kinds ({[k.name for k in best]}); "
            "keep one method per recipe"
        )
    return best[0]


def parse_recipe(
    source: str | os.PathLike | dict[str, Any],
    kind: str | None = None,
    model: str | None = None,
    output_dir: str | os.PathLike | None = None,
) -> tuple[RecipeKind, Any]:
    """``(kind, recipe object)`` from a file or mapping, with ``model``/``output_dir`` overrides.

    ``kind`` insists on one kind (the method subcommands do): another kind is refused.
    """
    where = "recipe" if isinstance(source, dict) else str(source)
    data = dict(source) if isinstance(source, dict) else read_recipe_file(source)
    found = recipe_kind_of(data, where)
    if kind is not None and found.name != kind:
        raise ValueError(
            f"{where} is a {found.name} recipe, not {kind}; run it with `hf-sparse run`"
        )
    if model:
        if found.model_key is None:
            raise ValueError(f"{found.name} recipes take no model; drop --model")
        data[found.model_key] = model
    if output_dir is not None:
        data["output_dir"] = str(output_dir)
    return found, found.parse(data, where)


def run_recipe(
    source: str | os.PathLike | dict[str, Any],
    kind: str | None = None,
    model: str | None = None,
    output_dir: str | os.PathLike | None = None,
    overwrite: bool = False,
    show_progress: bool = True,
) -> tuple[RecipeKind, Any]:
    """Parse, check and run any recipe; returns ``(kind, result)``."""
    found, recipe = parse_recipe(source, kind, model, output_dir)
    return found, found.run(recipe, overwrite=overwrite, show_progress=show_progress)
