"""Analysis recipes: ``model``, ``analysis`` (the ``AnalysisConfig`` fields), ``output_dir``.

Example (``recipes/critical-weights.yaml``)::

    model: smollm2-135m
    analysis: {metric: fisher, top_k: 0.01, mode: global, progressive_k: [10, 100, 1000]}
    output_dir: outputs/smollm2-critical-weights
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from ..config_utils import check_keys, from_dict
from ..recipes import read_recipe_file
from .config import AnalysisConfig

ANALYSIS_RECIPE_KEYS = ("model", "analysis", "output_dir")


@dataclass
class AnalysisRecipe:
    model: str
    analysis: AnalysisConfig
    output_dir: str | None = None


def analysis_recipe_from_dict(data: dict[str, Any], where: str = "recipe") -> AnalysisRecipe:
    if not isinstance(data, dict):
        raise ValueError(f"{where} must be a mapping with keys {list(ANALYSIS_RECIPE_KEYS)}")
    check_keys(data, ANALYSIS_RECIPE_KEYS, where, "analysis recipe")
    if not data.get("model"):
        raise ValueError(f"{where} needs `model:` (a known name, a folder or a Hub id)")
    config = from_dict(AnalysisConfig, data.get("analysis") or {}, "analysis")
    return AnalysisRecipe(str(data["model"]), config, data.get("output_dir"))


def load_analysis_recipe(path: str | os.PathLike) -> AnalysisRecipe:
    return analysis_recipe_from_dict(read_recipe_file(path), where=str(path))


def run_analysis_recipe(
    recipe: AnalysisRecipe, overwrite: bool = False, show_progress: bool = True
) -> dict[str, Any]:
    from ..io import check_output_dir
    from ..pipeline import load_model_and_tokenizer
    from .study import run_study

    if recipe.output_dir is None:
        raise ValueError("an analysis needs an output folder: set `output_dir:` or --output-dir")
    check_output_dir(recipe.output_dir, overwrite)
    model, tokenizer = load_model_and_tokenizer(recipe.model)
    return run_study(
        model, tokenizer, recipe.analysis, recipe.output_dir, overwrite, show_progress,
        model_name=recipe.model,
    )  # fmt: skip
