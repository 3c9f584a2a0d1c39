"""Merge recipes (mergekit-like YAML) and their outputs: a merged model or a merged adapter.

Example (``recipes/merge-sparsegpt-tv.yaml``)::

    merge_method: sparsegpt_tv
    base_model: smollm2-135m
    models:
      - model: ft_alpaca
        parameters: {weight: 1.0, density: 0.2}
        calibration: {dataset: alpaca_text.jsonl, num_samples: 32}   # this task's Hessians
      - model: ft_stories
        parameters: {weight: 1.0}
    parameters: {density: 0.2, sequential: true, hessians: per_task}
    calibration: {dataset: wikitext2, num_samples: 32, sequence_length: 512}  # the default
    evaluation: {dataset: wikitext2, num_windows: 32}
    output: full          # or adapter: a sparse-delta (MASKED_LR) adapter on the base
    output_dir: outputs/merged

Lifecycle of ``run_merge_recipe``: every key, the output folder and every source are checked
before any tensor is loaded into the merged output; the base is loaded, calibration windows
are built, ``merge_`` runs, perplexity is measured when asked, and the result is written to a
temporary folder that is renamed into place.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..config_utils import check_keys, from_dict, to_dict
from ..data import check_lengths
from ..evaluation import perplexity
from ..io import atomic_output_dir, check_output_dir, model_bytes
from ..loading import base_model_id, load_model_and_tokenizer
from ..outputs import results_record, write_outputs
from ..recipes import (
    CalibrationConfig,
    EvaluationConfig,
    RecipeKind,
    read_recipe_file,
    register_recipe_kind,
)
from .apply import MergeResult, merge_
from .config import MergeConfig, MergeSource
from .sparse_delta import save_sparse_delta_adapter
from .task_vectors import check_sources, inspect_source

logger = logging.getLogger(__name__)

MERGE_RECIPE_KEYS = (
    "merge_method",
    "base_model",
    "models",
    "parameters",
    "calibration",
    "evaluation",
    "output",
    "output_dir",
    "dtype",
)
MODEL_ENTRY_KEYS = ("model", "parameters", "calibration")
OUTPUT_KINDS = ("full", "adapter")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class MergeRecipe:
    base_model: str
    config: MergeConfig
    sources: list[MergeSource]
    calibration: CalibrationConfig | None = None
    task_calibration: list[CalibrationConfig | None] = field(default_factory=list)
    evaluation: EvaluationConfig | None = None
    output: str = "full"
    output_dir: str | None = None
    dtype: str = "float32"

    def to_dict(self) -> dict[str, Any]:
        parameters = to_dict(self.config)
        method = parameters.pop("method")
        models = []
        for source, calibration in zip(self.sources, self.task_calibration, strict=True):
            entry: dict[str, Any] = {"model": source.model, "parameters": {"weight": source.weight}}
            if source.density is not None:
                entry["parameters"]["density"] = source.density
            if calibration is not None:
                entry["calibration"] = to_dict(calibration)
            models.append(entry)
        return {
            "merge_method": method,
            "base_model": self.base_model,
            "models": models,
            "parameters": parameters,
            "calibration": to_dict(self.calibration) if self.calibration else None,
            "evaluation": to_dict(self.evaluation) if self.evaluation else None,
            "output": self.output,
            "output_dir": self.output_dir,
            "dtype": self.dtype,
        }


def merge_recipe_from_dict(data: dict[str, Any], where: str = "merge recipe") -> MergeRecipe:
    """Build and check a merge recipe (unknown keys, methods, densities, weights, outputs)."""
    check_keys(data, MERGE_RECIPE_KEYS, where, "merge recipe")
    for key in ("merge_method", "base_model", "models"):
        if not data.get(key):
            raise ValueError(f"{where} needs `{key}:` (valid keys: {list(MERGE_RECIPE_KEYS)})")
    parameters = dict(data.get("parameters") or {})
    if "method" in parameters:
        raise ValueError(f"{where}: set the method with `merge_method:`, not parameters.method")
    config = from_dict(MergeConfig, {"method": data["merge_method"], **parameters}, "parameters")
    models = data["models"]
    if not isinstance(models, list):
        raise ValueError(f"{where}: `models:` must be a list of {{model: ..., parameters: ...}}")
    sources, task_calibration = [], []
    for index, entry in enumerate(models):
        entry = {"model": entry} if isinstance(entry, str) else entry
        if not isinstance(entry, dict) or "model" not in entry:
            raise ValueError(f"{where}: models[{index}] needs `model:` (a folder)")
        check_keys(entry, MODEL_ENTRY_KEYS, f"{where} models[{index}]")
        params = entry.get("parameters") or {}
        check_keys(params, ("weight", "density"), f"{where} models[{index}].parameters")
        sources.append(MergeSource(model=str(entry["model"]), **params))
        cal = entry.get("calibration")
        task_calibration.append(
            from_dict(CalibrationConfig, cal, f"models[{index}].calibration") if cal else None
        )
    calibration = data.get("calibration")
    calibration = from_dict(CalibrationConfig, calibration, "calibration") if calibration else None
    if config.needs_calibration and calibration is None and None in task_calibration:
        raise ValueError(
            f"{config.method} needs calibration data for its Hessians: add a `calibration:` "
            "block (e.g. {dataset: wikitext2, num_samples: 32}) or one per model"
        )
    evaluation = data.get("evaluation")
    output = data.get("output", "full")
    if output not in OUTPUT_KINDS:
        raise ValueError(f"output must be one of {list(OUTPUT_KINDS)}, got {output!r}")
    dtype = data.get("dtype", "float32")
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    return MergeRecipe(
        base_model=str(data["base_model"]),
        config=config,
        sources=sources,
        calibration=calibration,
        task_calibration=task_calibration,
        evaluation=from_dict(EvaluationConfig, evaluation, "evaluation") if evaluation else None,
        output=output,
        output_dir=data.get("output_dir"),
        dtype=dtype,
    )


def load_merge_recipe(path: str | os.PathLike) -> MergeRecipe:
    return merge_recipe_from_dict(read_recipe_file(path), where=str(path))


@dataclass
class MergeRun:
    result: MergeResult
    metrics: dict[str, Any]
    output_dir: Path | None
    output: str = "full"  # full model or adapter


def _calibration_streams(recipe: MergeRecipe, tokenizer) -> list[torch.Tensor] | None:
    if not recipe.config.needs_calibration:
        return None
    streams = [(own or recipe.calibration).windows(tokenizer) for own in recipe.task_calibration]
    if all(c is None for c in recipe.task_calibration):
        return streams[:1]  # one shared set
    return streams


def _recipe_lengths(recipe: MergeRecipe) -> dict[str, int | None]:
    lengths: dict[str, int | None] = {}
    if recipe.config.needs_calibration:
        blocks = [recipe.calibration, *recipe.task_calibration]
        for i, block in enumerate(blocks):
            if block is not None:
                where = "calibration" if i == 0 else f"models[{i - 1}].calibration"
                lengths[f"{where}.sequence_length"] = block.sequence_length
    if recipe.evaluation is not None:
        lengths["evaluation.sequence_length"] = recipe.evaluation.sequence_length
    return lengths


def run_merge_recipe(
    recipe: MergeRecipe,
    output_dir: str | os.PathLike | None = None,
    overwrite: bool = False,
    show_progress: bool = True,
) -> MergeRun:
    """Load the base, merge the recipe's models into it, evaluate and save (atomically)."""
    output_dir = output_dir if output_dir is not None else recipe.output_dir
    if output_dir is not None:
        check_output_dir(output_dir, overwrite)
    infos = [inspect_source(s.model) for s in recipe.sources]  # fails early on bad folders
    model, tokenizer = load_model_and_tokenizer(recipe.base_model, DTYPES[recipe.dtype])
    check_sources(model, infos, recipe.base_model, recipe.config.check_base)
    check_lengths(model, _recipe_lengths(recipe))
    if output_dir is not None:
        full = recipe.output == "full"
        expected = model_bytes(model) if full else model_bytes(model) // 4
        check_output_dir(output_dir, overwrite, expected, inputs=[recipe.base_model])
    streams = _calibration_streams(recipe, tokenizer)
    metrics: dict[str, Any] = {}
    ev, eval_windows = recipe.evaluation, None
    if ev is not None:
        eval_windows = ev.windows(tokenizer)
        metrics["base"] = perplexity(model, eval_windows, ev.batch_size, show_progress).to_dict()
    calibration = recipe.calibration or next((c for c in recipe.task_calibration if c), None)
    batch_size = calibration.batch_size if calibration is not None else 8
    result = merge_(
        model,
        recipe.config,
        recipe.sources,
        calibration=streams,
        batch_size=batch_size,
        base_name=recipe.base_model,
        show_progress=show_progress,
    )
    metrics["merge_seconds"] = round(result.seconds, 2)
    metrics["density"] = result.density
    if result.mean_layer_error is not None:
        metrics["mean_relative_reconstruction_error"] = result.mean_layer_error
    if eval_windows is not None:
        metrics["merged"] = perplexity(
            model, eval_windows, recipe.evaluation.batch_size, show_progress
        ).to_dict()
    saved = None
    if output_dir is not None:
        if recipe.output == "adapter":
            base, _ = load_model_and_tokenizer(recipe.base_model, DTYPES[recipe.dtype])
            saved = save_merged_adapter(
                base, tokenizer, result, output_dir, recipe.to_dict(), metrics, overwrite
            )
        else:
            saved = save_merged_model(
                model, tokenizer, result, output_dir, recipe.to_dict(), metrics, overwrite
            )
    return MergeRun(result, metrics, saved, recipe.output)


def _results(result: MergeResult, metrics: dict[str, Any], model: nn.Module) -> dict[str, Any]:
    metrics = dict(metrics)
    merging = getattr(result.model.config, "merging", None) or {}
    return results_record(
        "merging",
        config={k: v for k, v in merging.items() if k != "models"},
        metrics=metrics,
        timings={"merge_seconds": metrics.pop("merge_seconds", result.seconds)},
        base_model=base_model_id(model),
        merging=merging,
        layer_errors=result.layer_errors,
    )


def _merge_files(
    result: MergeResult, metrics: dict[str, Any] | None, base: nn.Module, recipe, adapter: bool
) -> tuple[dict[str, Any], dict[str, str]]:
    """The results JSON and any extra text files of a merge output (the card is written with
    the results, by ``write_outputs``)."""
    return _results(result, metrics or {}, base), {}


def save_merged_model(
    model: nn.Module,
    tokenizer,
    result: MergeResult,
    output_dir: str | os.PathLike,
    recipe: dict[str, Any] | None = None,
    metrics: dict[str, Any] | None = None,
    overwrite: bool = False,
) -> Path:
    """The merged model as a plain ``from_pretrained`` folder (safetensors, a ``merging`` block
    in config.json), with the recipe, results and a model card."""
    results, files = _merge_files(result, metrics, model, recipe, adapter=False)
    with atomic_output_dir(output_dir, overwrite) as tmp:
        model.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        write_outputs(tmp, results, recipe)
        for filename, text in files.items():
            (tmp / filename).write_text(text)
    logger.info("saved merged model to %s", output_dir)
    return Path(output_dir)


def save_merged_adapter(
    base: nn.Module,
    tokenizer,
    result: MergeResult,
    output_dir: str | os.PathLike,
    recipe: dict[str, Any] | None = None,
    metrics: dict[str, Any] | None = None,
    overwrite: bool = False,
) -> Path:
    """The merged task vector as a sparse-delta (``MASKED_LR``) adapter on the unmerged
    ``base``: ``PeftModel.from_pretrained(base, dir)`` (after ``import hf_sparse``) gives the
    merged model's weights. Deltas of anything but linear weights are refused."""
    results, files = _merge_files(result, metrics, base, recipe, adapter=True)
    saved = save_sparse_delta_adapter(
        base, result.deltas, output_dir, results, recipe, files, tokenizer, overwrite
    )
    logger.info("saved merged sparse-delta adapter to %s", output_dir)
    return saved


def summarize(run: MergeRun) -> str:
    """What ``hf-sparse run``/``merge`` print for a merge recipe."""
    metrics = run.metrics
    merging = getattr(run.result.model.config, "merging", None) or {}
    lines = [f"method:             {merging.get('method')} at density {merging.get('density')}"]
    if "base" in metrics:
        lines.append(f"base perplexity:    {metrics['base']['perplexity']:.3f}")
    if "merged" in metrics:
        lines.append(f"merged perplexity:  {metrics['merged']['perplexity']:.3f}")
    lines.append(f"merged task vector: {100 * metrics['density']:.2f}% non-zero")
    if "mean_relative_reconstruction_error" in metrics:
        error = metrics["mean_relative_reconstruction_error"]
        lines.append(f"mean ||X(tau - tau_pruned)||^2 / ||X tau||^2: {error:.4f}")
    lines.append(f"merge time:         {metrics['merge_seconds']:.1f} s")
    if run.output_dir is not None:
        lines.append(f"saved to:           {run.output_dir} ({run.output})")
    return "\n".join(lines)


MERGE_RECIPES = register_recipe_kind(
    RecipeKind(
        "merging", ("merge_method",), merge_recipe_from_dict, run_merge_recipe, summarize,
        model_key="base_model",
    )
)  # fmt: skip
