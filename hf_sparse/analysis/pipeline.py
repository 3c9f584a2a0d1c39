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
from ..recipes import RecipeKind, read_recipe_file, register_recipe_kind
from .config import AnalysisConfig

_REPORT_BYTES = 64 * 2**20  # scores summaries, JSON and the HTML report with its figures
ANALYSIS_RECIPE_KEYS = ("model", "analysis", "output_dir")


@dataclass
class AnalysisRecipe:
    model: str
    analysis: AnalysisConfig
    output_dir: str | None = None


def analysis_recipe_from_dict(data: dict[str, Any], where: str = "recipe") -> AnalysisRecipe:
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
    from ..data import check_lengths
    from ..io import check_output_dir
    from ..loading import load_checked
    from .study import run_study

    if recipe.output_dir is None:
        raise ValueError("an analysis needs an output folder: set `output_dir:` or --output-dir")
    model, tokenizer = load_checked(recipe.model, recipe.output_dir, overwrite)
    check_lengths(
        model,
        {
            "analysis.sequence_length": recipe.analysis.sequence_length,
            "analysis.eval_length": recipe.analysis.eval_length,
        },
    )
    check_output_dir(recipe.output_dir, overwrite, _REPORT_BYTES, inputs=[recipe.model])
    study = run_study(
        model, tokenizer, recipe.analysis, recipe.output_dir, overwrite, show_progress,
        model_name=recipe.model,
    )  # fmt: skip
    return {**study, "output_dir": recipe.output_dir}


def summarize(study: dict[str, Any]) -> str:
    """What ``hf-sparse run``/``analyze`` print: dense perplexity, each perturbation against
    its random and bottom-k controls, the most damaging single weight."""
    results = study["results"]
    lines = [f"dense perplexity:  {results['dense']['perplexity']:.3f}"]
    for point in results["points"]:
        mean, std = point["random_mean"]["perplexity"], point["random_std"]["perplexity"]
        lines.append(
            f"{point['kind']} x{point['strength']:g} top-{point['k']} ({point['target']}): "
            f"{point['top']['perplexity']:.3f} vs random {mean:.3f} +- {std:.3f}, "
            f"bottom {point['bottom']['perplexity']:.3f}"
        )
    worst = (results.get("single_weights") or {}).get("worst")
    if worst:
        lines.append(
            f"most damaging single weight: {worst['parameter']}{worst['index']} -> "
            f"{worst['perplexity']:.3f} ({worst['ratio_to_dense']:.2f}x dense)"
        )
    lines.append(f"report: {study['output_dir']}/report.html")
    return "\n".join(lines)


ANALYSIS_RECIPES = register_recipe_kind(
    RecipeKind("analysis", ("analysis",), analysis_recipe_from_dict, run_analysis_recipe, summarize)
)
