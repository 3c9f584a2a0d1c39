"""YAML recipes: one file says which model, which data, which method and where the result goes.

Example (``recipes/quickstart.yaml``)::

    model: smollm2-135m
    calibration: {dataset: wikitext2, num_samples: 64, sequence_length: 512, seed: 0}
    pruning:
      sparsegpt: {sparsity: 0.5}
    evaluation: {dataset: wikitext2, sequence_length: 512, num_windows: 32}
    output_dir: outputs/smollm2-sparsegpt-50

Every level rejects unknown keys with the list of valid ones.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from .config_utils import check_positive_ints, from_dict, help_field, to_dict
from .pruning.config import PruningConfig, pruning_config_from_dict


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


@dataclass
class EvaluationConfig:
    dataset: str = help_field("Text to measure perplexity on (evaluation split).", "wikitext2")
    sequence_length: int = help_field("Tokens per non-overlapping window.", 512)
    num_windows: int | None = help_field("First N windows; None = the whole text.", 32)
    batch_size: int = help_field("Windows per forward pass.", 4)
    text_field: str = help_field("Column holding the text in jsonl/parquet data.", "text")


@dataclass
class Recipe:
    model: str
    pruning: PruningConfig
    calibration: CalibrationConfig
    evaluation: EvaluationConfig | None
    output_dir: str | None

    def to_dict(self) -> dict[str, Any]:
        pruning = to_dict(self.pruning)
        return {
            "model": self.model,
            "calibration": to_dict(self.calibration),
            "pruning": {self.pruning.method: pruning},
            "evaluation": to_dict(self.evaluation) if self.evaluation else None,
            "output_dir": self.output_dir,
        }


RECIPE_KEYS = ("model", "calibration", "pruning", "evaluation", "output_dir")


def recipe_from_dict(data: dict[str, Any], where: str = "recipe") -> Recipe:
    if not isinstance(data, dict):
        raise ValueError(f"{where} must be a mapping with keys {list(RECIPE_KEYS)}")
    unknown = sorted(set(data) - set(RECIPE_KEYS))
    if unknown:
        raise ValueError(f"unknown key(s) {unknown} in {where}; valid keys: {list(RECIPE_KEYS)}")
    pruning = data.get("pruning")
    if not isinstance(pruning, dict) or len(pruning) != 1:
        raise ValueError(
            f"{where}: 'pruning' must hold exactly one method, e.g. "
            "pruning: {sparsegpt: {sparsity: 0.5}}"
        )
    ((method, settings),) = pruning.items()
    evaluation = data.get("evaluation")
    return Recipe(
        model=str(data.get("model") or ""),
        pruning=pruning_config_from_dict(method, settings),
        calibration=from_dict(CalibrationConfig, data.get("calibration"), f"{where}.calibration"),
        evaluation=None
        if evaluation is None
        else from_dict(EvaluationConfig, evaluation, f"{where}.evaluation"),
        output_dir=data.get("output_dir"),
    )


def read_recipe_file(path: str | os.PathLike) -> dict[str, Any]:
    """The YAML mapping of a recipe file (any recipe kind), with clear errors."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"recipe {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        raise ValueError(f"recipe {path} is not valid YAML: {error}") from error
    if not isinstance(data, dict):
        raise ValueError(f"recipe {path} must be a YAML mapping, got {type(data).__name__}")
    return data


def load_recipe(path: str | os.PathLike) -> Recipe:
    return recipe_from_dict(read_recipe_file(path), where=str(path))
