"""One call from a recipe to a saved pruned model: load, calibrate, prune, evaluate, save.

Lifecycle of ``oneshot(model, recipe)``:
  1. validate the recipe and the output folder (before any work);
  2. load model and tokenizer (a known name such as ``smollm2-135m``, a path or a Hub id);
  3. build calibration windows and prune in place (``pruning.prune_``);
  4. measure perplexity before and after when the recipe has an ``evaluation`` block;
  5. save to a temporary folder and rename: weights (safetensors, zeros in place), a
     ``sparsity`` block in ``config.json``, packed masks, the recipe, results and model card.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn

from .data import calibration_windows, evaluation_windows
from .evaluation import perplexity, sparsity_report
from .io import atomic_output_dir, check_output_dir, write_json_atomic
from .masked.bitmask import MASKS_FILE, save_masks
from .pruning import PruningResult, prune_
from .real_model import KNOWN_MODELS, resolve_model_path
from .recipes import Recipe, load_recipe, recipe_from_dict

logger = logging.getLogger(__name__)

RESULTS_FILE = "hf_sparse_results.json"
RECIPE_FILE = "recipe.yaml"


@dataclass
class OneshotResult:
    model: nn.Module
    pruning: PruningResult
    metrics: dict[str, Any] = field(default_factory=dict)
    output_dir: Path | None = None


def load_model_and_tokenizer(name_or_path: str, dtype: torch.dtype = torch.float32):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve_model_path(name_or_path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    tokenizer = AutoTokenizer.from_pretrained(path)
    model.name_or_path = name_or_path
    return model, tokenizer


def _as_recipe(recipe: Recipe | dict | str | os.PathLike) -> Recipe:
    if isinstance(recipe, Recipe):
        return recipe
    if isinstance(recipe, dict):
        return recipe_from_dict(recipe)
    return load_recipe(recipe)


def oneshot(
    model: nn.Module | str | None,
    recipe: Recipe | dict | str | os.PathLike,
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
    if output_dir is not None:
        check_output_dir(output_dir, overwrite)
    if model is None or isinstance(model, str):
        name = model or recipe.model
        if not name:
            raise ValueError("no model: pass one or set `model:` in the recipe")
        model, loaded_tokenizer = load_model_and_tokenizer(name)
        tokenizer = tokenizer or loaded_tokenizer
    base_name = getattr(model, "name_or_path", None) or recipe.model
    if isinstance(dataset, torch.Tensor):
        calibration = dataset
    elif recipe.pruning.needs_calibration:
        if tokenizer is None:
            raise ValueError("a tokenizer is needed to build calibration windows from text")
        cal = recipe.calibration
        calibration = calibration_windows(
            tokenizer,
            dataset or cal.dataset,
            cal.num_samples,
            cal.sequence_length,
            cal.seed,
            cal.text_field,
        )
    else:
        calibration = None
    metrics: dict[str, Any] = {}
    eval_windows = None
    if recipe.evaluation is not None and tokenizer is not None:
        ev = recipe.evaluation
        eval_windows = evaluation_windows(
            tokenizer, ev.dataset, ev.sequence_length, ev.num_windows, ev.text_field
        )
        metrics["dense"] = perplexity(model, eval_windows, ev.batch_size, show_progress).to_dict()
    result = prune_(
        model, recipe.pruning, calibration, recipe.calibration.batch_size, show_progress
    )
    metrics["prune_seconds"] = result.seconds
    metrics["sparsity"] = result.sparsity
    if eval_windows is not None:
        metrics["pruned"] = perplexity(
            model, eval_windows, recipe.evaluation.batch_size, show_progress
        ).to_dict()
        metrics["perplexity_ratio"] = (
            metrics["pruned"]["perplexity"] / metrics["dense"]["perplexity"]
        )
    saved = None
    if output_dir is not None:
        saved = save_pruned(
            model, tokenizer, output_dir, result, recipe, metrics, base_name, overwrite
        )
    return OneshotResult(model, result, metrics, saved)


def save_pruned(
    model: nn.Module,
    tokenizer,
    output_dir: str | os.PathLike,
    result: PruningResult,
    recipe: Recipe | None = None,
    metrics: dict[str, Any] | None = None,
    base_model: str | None = None,
    overwrite: bool = False,
) -> Path:
    """Save a pruned model so that plain ``from_pretrained`` loads it, atomically."""
    from .hub import render_model_card

    if base_model in KNOWN_MODELS:
        base_model = KNOWN_MODELS[base_model].hub_id
    report = sparsity_report(model, sorted(result.masks))
    results = {
        "base_model": base_model,
        "method": result_method(model),
        "metrics": metrics or {},
        "layers": {r.name: round(r.sparsity, 6) for r in report},
    }
    with atomic_output_dir(output_dir, overwrite) as tmp:
        model.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        save_masks(result.masks, tmp / MASKS_FILE)
        write_json_atomic(results, tmp / RESULTS_FILE)
        if recipe is not None:
            (tmp / RECIPE_FILE).write_text(yaml.safe_dump(recipe.to_dict(), sort_keys=False))
        (tmp / "README.md").write_text(
            render_model_card(model.config.sparsity, results, recipe, base_model)
        )
    logger.info("saved pruned model to %s", output_dir)
    return Path(output_dir)


def result_method(model: nn.Module) -> str | None:
    block = getattr(getattr(model, "config", None), "sparsity", None)
    return block.get("method") if isinstance(block, dict) else None
