"""Pruning recipes: load, calibrate, prune, evaluate, save (``hf-sparse run`` / ``prune``).

Recipe form (``recipes/quickstart.yaml``)::

    model: smollm2-135m
    calibration: {dataset: wikitext2, num_samples: 64, sequence_length: 512, seed: 0}
    pruning:
      sparsegpt: {sparsity: 0.5}
    evaluation: {dataset: wikitext2, sequence_length: 512, num_windows: 32}
    output_dir: outputs/smollm2-sparsegpt-50
    recover: {steps: 200, eval_at: [50, 200]}   # optional: fine-tune with the mask kept

Lifecycle of ``oneshot(model, recipe)``:
  1. validate the recipe and the output folder (before any work);
  2. load model and tokenizer (a known name such as ``smollm2-135m``, a path or a Hub id);
  3. build calibration windows and prune in place (``pruning.prune_``);
  4. measure perplexity before and after when the recipe has an ``evaluation`` block;
     with a ``recover`` block, fine-tune with the mask kept (``recover.recover_``) and measure
     again at its ``eval_at`` steps;
  5. save to a temporary folder and rename: weights (safetensors, zeros in place), a
     ``sparsity`` block in ``config.json``, packed masks, the recipe, results and model card.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..config_utils import check_keys, from_dict, to_dict
from ..data import check_lengths
from ..evaluation import perplexity, sparsity_report
from ..io import atomic_output_dir, check_output_dir, model_bytes
from ..loading import base_model_id, load_model_and_tokenizer
from ..masks.bitmask import MASKS_FILE, save_masks
from ..outputs import results_record, write_outputs
from ..recipes import (
    CalibrationConfig,
    EvaluationConfig,
    RecipeKind,
    read_recipe_file,
    register_recipe_kind,
)
from .apply import PruningResult, prune_, resolve_targets
from .config import PruningConfig, pruning_config_from_dict
from .recover import RecoveryConfig, recover_

logger = logging.getLogger(__name__)

RECIPE_KEYS = ("model", "calibration", "pruning", "evaluation", "output_dir", "recover")


@dataclass
class PruningRecipe:
    model: str
    pruning: PruningConfig
    calibration: CalibrationConfig
    evaluation: EvaluationConfig | None
    output_dir: str | None
    recover: RecoveryConfig | None = None

    def to_dict(self) -> dict[str, Any]:
        extra = {"recover": to_dict(self.recover)} if self.recover is not None else {}
        return {
            "model": self.model,
            "calibration": to_dict(self.calibration),
            "pruning": {self.pruning.method: to_dict(self.pruning)},
            "evaluation": to_dict(self.evaluation) if self.evaluation else None,
            "output_dir": self.output_dir,
            **extra,
        }


def pruning_recipe_from_dict(data: dict[str, Any], where: str = "recipe") -> PruningRecipe:
    """A pruning recipe; unknown keys at any level raise with the valid ones."""
    check_keys(data, RECIPE_KEYS, where, "pruning recipe")
    pruning = data.get("pruning")
    if not isinstance(pruning, dict) or len(pruning) != 1:
        raise ValueError(
            f"{where}: 'pruning' must hold exactly one method, e.g. "
            "pruning: {sparsegpt: {sparsity: 0.5}}"
        )
    ((method, settings),) = pruning.items()
    evaluation = data.get("evaluation")
    return PruningRecipe(
        model=str(data.get("model") or ""),
        pruning=pruning_config_from_dict(method, settings),
        calibration=from_dict(CalibrationConfig, data.get("calibration"), f"{where}.calibration"),
        evaluation=None
        if evaluation is None
        else from_dict(EvaluationConfig, evaluation, f"{where}.evaluation"),
        output_dir=data.get("output_dir"),
        recover=None
        if data.get("recover") is None
        else from_dict(RecoveryConfig, data["recover"], f"{where}.recover"),
    )


def load_pruning_recipe(path: str | os.PathLike) -> PruningRecipe:
    return pruning_recipe_from_dict(read_recipe_file(path), where=str(path))


@dataclass
class OneshotResult:
    model: nn.Module
    pruning: PruningResult
    metrics: dict[str, Any] = field(default_factory=dict)
    output_dir: Path | None = None


def _as_recipe(recipe: PruningRecipe | dict | str | os.PathLike) -> PruningRecipe:
    if isinstance(recipe, PruningRecipe):
        return recipe
    if isinstance(recipe, dict):
        return pruning_recipe_from_dict(recipe)
    return load_pruning_recipe(recipe)


def oneshot(
    model: nn.Module | str | None,
    recipe: PruningRecipe | dict | str | os.PathLike,
    dataset: str | torch.Tensor | None = None,
    tokenizer=None,
    output_dir: str | os.PathLike | None = None,
    overwrite: bool = False,
    show_progress: bool = True,
) -> OneshotResult:
    """Prune ``model`` (a module, or a name/path; None = the recipe's ``model``) per ``recipe``.

    ``dataset`` overrides the recipe's calibration set: a name/path, or ready token windows.
    """
    recipe = _as_recipe(recipe)
    output_dir = output_dir if output_dir is not None else recipe.output_dir
    source = (model or recipe.model) if model is None or isinstance(model, str) else None
    if output_dir is not None:
        check_output_dir(output_dir, overwrite, inputs=[source])
    if source is not None:
        if not source:
            raise ValueError("no model: pass one or set `model:` in the recipe")
        model, loaded_tokenizer = load_model_and_tokenizer(source)
        tokenizer = tokenizer or loaded_tokenizer
    base_name = getattr(model, "name_or_path", None) or recipe.model
    check_lengths(model, _recipe_lengths(recipe, dataset))
    resolve_targets(model, recipe.pruning)  # patterns that match nothing fail before work
    if output_dir is not None:  # now that the size of the output is known, before any work
        check_output_dir(output_dir, overwrite, _output_bytes(model), inputs=[source])
    if isinstance(dataset, torch.Tensor):
        calibration = dataset
    elif recipe.pruning.needs_calibration:
        if tokenizer is None:
            raise ValueError("a tokenizer is needed to build calibration windows from text")
        cal = recipe.calibration
        if dataset is not None:
            cal = dataclasses.replace(cal, dataset=dataset)
        calibration = cal.windows(tokenizer)
    else:
        calibration = None
    metrics: dict[str, Any] = {}
    eval_windows = None
    ev = recipe.evaluation
    if ev is not None and tokenizer is not None:
        eval_windows = ev.windows(tokenizer)
        metrics["dense"] = perplexity(model, eval_windows, ev.batch_size, show_progress).to_dict()
    result = prune_(
        model, recipe.pruning, calibration, recipe.calibration.batch_size, show_progress
    )
    metrics["prune_seconds"] = result.seconds
    metrics["sparsity"] = result.measured_sparsity  # counted in the weights written
    if eval_windows is not None:
        metrics["pruned"] = perplexity(
            model, eval_windows, recipe.evaluation.batch_size, show_progress
        ).to_dict()
        metrics["perplexity_ratio"] = (
            metrics["pruned"]["perplexity"] / metrics["dense"]["perplexity"]
        )
    if recipe.recover is not None:
        metrics["recovery"] = _recover(
            model, result, recipe, tokenizer, eval_windows, metrics, show_progress
        )
        result.measured_sparsity = metrics["recovery"]["sparsity_after"]
        metrics["sparsity"] = result.measured_sparsity
    saved = None
    if output_dir is not None:
        saved = save_pruned(
            model, tokenizer, output_dir, result, recipe, metrics, base_name, overwrite
        )
    return OneshotResult(model, result, metrics, saved)


def _recipe_lengths(recipe: PruningRecipe, dataset) -> dict[str, int | None]:
    lengths: dict[str, int | None] = {}
    if recipe.pruning.needs_calibration and not isinstance(dataset, torch.Tensor):
        lengths["calibration.sequence_length"] = recipe.calibration.sequence_length
    if recipe.evaluation is not None:
        lengths["evaluation.sequence_length"] = recipe.evaluation.sequence_length
    return lengths


def _output_bytes(model: nn.Module) -> int:
    """The weights (zeros in place) plus one bit per weight of the packed masks."""
    return int(model_bytes(model) * 1.05)


def _recover(
    model, result, recipe, tokenizer, eval_windows, metrics, show_progress
) -> dict[str, Any]:
    """Fine-tune with the mask kept; perplexity at step 0 (the one-shot model) and eval_at."""
    recovered = recover_(
        model, result.masks, recipe.recover, tokenizer,
        recipe.calibration.dataset, eval_windows, show_progress,
    )  # fmt: skip
    record = recovered.to_dict()
    if "pruned" in metrics:
        record["perplexity_by_step"] = {
            "0": metrics["pruned"]["perplexity"],
            **record["perplexity_by_step"],
        }
    return record


def save_pruned(
    model: nn.Module,
    tokenizer,
    output_dir: str | os.PathLike,
    result: PruningResult,
    recipe: PruningRecipe | None = None,
    metrics: dict[str, Any] | None = None,
    base_model: str | None = None,
    overwrite: bool = False,
) -> Path:
    """Save a pruned model so that plain ``from_pretrained`` loads it, atomically."""
    base_model = base_model_id(base_model or model)
    report = sparsity_report(model, sorted(result.masks))
    metrics = dict(metrics or {})
    timings = {"prune_seconds": metrics.pop("prune_seconds", result.seconds)}
    block = getattr(model.config, "sparsity", None) or {}
    record = results_record(
        "pruning",
        config={
            **{key: block.get(key) for key in ("method", "sparsity", "structure", "targets")},
            "ignore": block.get("ignore"),
            **(block.get("settings") or {}),
        },
        metrics=metrics,
        timings=timings,
        base_model=base_model,
        layers={r.name: round(r.sparsity, 6) for r in report},
    )
    recipe_dict = recipe.to_dict() if recipe is not None else None
    with atomic_output_dir(output_dir, overwrite, _output_bytes(model)) as tmp:
        model.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        save_masks(result.masks, tmp / MASKS_FILE)
        write_outputs(tmp, record, recipe_dict)  # + the card
    logger.info("saved pruned model to %s", output_dir)
    return Path(output_dir)


def summarize(result: OneshotResult) -> str:
    """What ``hf-sparse run``/``prune`` print for a pruning recipe."""
    metrics = result.metrics
    lines = []
    if "dense" in metrics:
        lines.append(f"dense perplexity:   {metrics['dense']['perplexity']:.3f}")
    if "pruned" in metrics:
        lines.append(
            f"pruned perplexity:  {metrics['pruned']['perplexity']:.3f} "
            f"({metrics['perplexity_ratio']:.3f}x dense)"
        )
    lines.append(f"sparsity:           {100 * metrics['sparsity']:.2f}% of the pruned layers")
    lines.append(f"pruning time:       {metrics['prune_seconds']:.1f} s")
    recovery = metrics.get("recovery")
    if recovery:
        steps = ", ".join(f"{k}: {v:.3f}" for k, v in recovery["perplexity_by_step"].items())
        lines.append(
            f"recovery:           {recovery['train_seconds']:.1f} s; perplexity by step {steps}"
        )
    if result.output_dir is not None:
        lines.append(f"saved to:           {result.output_dir}")
    return "\n".join(lines)


def _run(
    recipe: PruningRecipe, overwrite: bool = False, show_progress: bool = True
) -> OneshotResult:
    return oneshot(None, recipe, overwrite=overwrite, show_progress=show_progress)


PRUNING_RECIPES = register_recipe_kind(
    RecipeKind("pruning", ("pruning",), pruning_recipe_from_dict, _run, summarize)
)
