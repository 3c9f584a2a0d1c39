"""Mask jobs: load a model and data, score parameters or search golden masks, save the result.

Recipe form (``recipes/reverse-golden.yaml``)::

    model: smollm2-135m
    data: {dataset: alpaca, num_samples: 16, max_length: 256, eval_samples: 8}
    mask:
      reverse: {target_percent: 1.0, strategy: momentum, rounds: 8}
    output_dir: outputs/smollm2-reverse-golden

``mask`` holds exactly one job: ``score`` (one metric, top-k of it), ``golden`` (intersection of
per-sample top-k) or ``reverse`` (KL-maximising search). The output folder gets
``masks.safetensors`` (packed masks) and ``summary.json`` (settings, per-tensor summary).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from .config_utils import check_keys, check_positive_ints, from_dict, help_field, to_dict
from .data import draw_records, load_text, random_windows, tokenize
from .importance import (
    compute_importance,
    golden_masks,
    instruction_prompt_fn,
    reverse_golden_masks,
)
from .importance.samples import apply_prompt_fn
from .io import atomic_output_dir, check_output_dir, write_json_atomic
from .masked import RANKING_SCOPES, ParameterMasks, top_k
from .models import parameter_layouts

logger = logging.getLogger(__name__)

MASKS_NAME = "masks.safetensors"
SUMMARY_NAME = "summary.json"
DATA_FORMATS = ("auto", "instruction", "text")


@dataclass
class MaskDataConfig:
    dataset: str = help_field("Named set (alpaca, wikitext2, ...), or a local file.", "alpaca")
    format: str = help_field(
        "instruction (Alpaca fields, loss on the response), text (plain windows) or auto.",
        "auto",
    )
    num_samples: int = help_field("Samples to score / intersect.", 16)
    eval_samples: int = help_field("Held-out samples for KL (reverse search only).", 8)
    max_length: int = help_field("Tokens per sample (longer ones are cut).", 256)
    seed: int = help_field("Seed of the sample draw.", 0)
    text_field: str = help_field("Column holding the text in jsonl/parquet data.", "text")

    def __post_init__(self) -> None:
        if self.format not in DATA_FORMATS:
            raise ValueError(
                f"data.format must be one of {list(DATA_FORMATS)}, got {self.format!r}"
            )
        check_positive_ints(self, ("num_samples", "eval_samples", "max_length"), "data")


@dataclass
class ScoreJob:
    metric: str = help_field("Importance metric (see hf_sparse.importance).", "gradient")
    top_k_percent: float = help_field("Percent of entries kept in the mask.", 1.0)
    scope: str = help_field(f"Ranking scope, one of {list(RANKING_SCOPES)}.", "global")
    params: list[str] | None = help_field("Parameter patterns to score; None = default set.", None)
    options: dict[str, Any] = help_field("Extra metric options (e.g. probes).", default=None)

    def __post_init__(self) -> None:
        self.options = dict(self.options or {})


@dataclass
class MaskJobSpec:
    kind: str
    settings: dict[str, Any] = field(default_factory=dict)


MASK_JOB_KINDS = ("score", "golden", "reverse")


def parse_mask_job(mask: Any, where: str = "mask") -> MaskJobSpec:
    if not isinstance(mask, dict) or len(mask) != 1:
        raise ValueError(
            f"{where} must hold exactly one job of {list(MASK_JOB_KINDS)}, e.g. "
            "mask: {golden: {top_k_percent: 5}}"
        )
    ((kind, settings),) = mask.items()
    if kind not in MASK_JOB_KINDS:
        raise ValueError(f"unknown mask job {kind!r} in {where}; valid: {list(MASK_JOB_KINDS)}")
    if settings is not None and not isinstance(settings, dict):
        raise ValueError(f"{where}.{kind} must be a mapping of settings, got {settings!r}")
    if kind == "score":
        from_dict(ScoreJob, settings, f"{where}.score")  # validate keys now, before work
    return MaskJobSpec(kind, dict(settings or {}))


def build_samples(tokenizer, data: MaskDataConfig) -> tuple[list, list, Callable | None]:
    """(samples, held-out samples, prompt_fn) for a mask job."""
    fmt = data.format
    source = str(data.dataset)
    if fmt == "auto":
        records_like = source == "alpaca" or source.endswith((".jsonl", ".json"))
        fmt = "instruction" if records_like else "text"
    total = data.num_samples + data.eval_samples
    if fmt == "instruction":
        chosen = draw_records(source, total, data.seed)
        if not {"instruction", "output"} <= set(chosen[0]):
            raise ValueError(
                f"{source} records have fields {sorted(chosen[0])}; instruction format needs "
                "'instruction' and 'output' (use data.format: text for plain text)"
            )
        prompt_fn = instruction_prompt_fn(tokenizer, data.max_length)
    else:  # token windows, used as they are (labels = inputs)
        ids = tokenize(tokenizer, load_text(source, "calibration", data.text_field))
        chosen = [{"input_ids": w} for w in random_windows(ids, total, data.max_length, data.seed)]
        prompt_fn = None
    return chosen[: data.num_samples], chosen[data.num_samples : total], prompt_fn


def _summary_rows(masks: ParameterMasks) -> list[dict]:
    return [r.to_dict() for r in masks.report()]


def run_mask_job(
    model: nn.Module,
    tokenizer,
    job: MaskJobSpec,
    data: MaskDataConfig,
    output_dir: str | os.PathLike | None = None,
    overwrite: bool = False,
    show_progress: bool = True,
) -> tuple[ParameterMasks, dict[str, Any]]:
    """Run one mask job; save ``masks.safetensors`` + ``summary.json`` to ``output_dir``."""
    if output_dir is not None:
        check_output_dir(output_dir, overwrite)
    samples, held_out, prompt_fn = build_samples(tokenizer, data)
    start = time.perf_counter()
    summary: dict[str, Any] = {"job": job.kind, "settings": job.settings, "data": to_dict(data)}
    if job.kind == "score":
        cfg = from_dict(ScoreJob, job.settings, "mask.score")
        batches = apply_prompt_fn(samples, prompt_fn)
        scores = compute_importance(
            model, batches, cfg.metric, cfg.params, show_progress, **cfg.options
        )
        masks = top_k(scores, cfg.top_k_percent, cfg.scope, parameter_layouts(model))
    elif job.kind == "golden":
        settings = {"num_samples": len(samples), **job.settings}
        result = golden_masks(model, samples, prompt_fn, show_progress=show_progress, **settings)
        masks = result.masks
    else:
        result = reverse_golden_masks(
            model,
            samples,
            prompt_fn,
            eval_dataset=held_out,
            show_progress=show_progress,
            **job.settings,
        )
        masks = result.masks
        summary["kl"] = result.kl
        summary["history"] = getattr(result, "history", None)
    summary["seconds"] = time.perf_counter() - start
    summary["kept"] = masks.count()
    summary["density"] = masks.density()
    summary["per_tensor"] = _summary_rows(masks)
    if output_dir is not None:
        with atomic_output_dir(output_dir, overwrite) as tmp:
            masks.save(Path(tmp) / MASKS_NAME, metadata={"job": job.kind})
            write_json_atomic(summary, Path(tmp) / SUMMARY_NAME)
        logger.info("saved %s to %s", masks, output_dir)
    return masks, summary


@dataclass
class MaskRecipe:
    model: str
    data: MaskDataConfig
    mask: MaskJobSpec
    output_dir: str | None


MASK_RECIPE_KEYS = ("model", "data", "mask", "output_dir")


def mask_recipe_from_dict(values: dict[str, Any], where: str = "recipe") -> MaskRecipe:
    check_keys(values, MASK_RECIPE_KEYS, where, "mask recipe")
    return MaskRecipe(
        model=str(values.get("model") or ""),
        data=from_dict(MaskDataConfig, values.get("data"), f"{where}.data"),
        mask=parse_mask_job(values.get("mask"), f"{where}.mask"),
        output_dir=values.get("output_dir"),
    )


def load_recipe_model(model: str, output_dir: str | None, overwrite: bool):
    """Model and tokenizer of a recipe, after checking the output folder (before any work)."""
    from .pipeline import load_model_and_tokenizer

    if not model:
        raise ValueError("no model: set `model:` in the recipe or pass --model")
    if output_dir is not None:
        check_output_dir(output_dir, overwrite)
    return load_model_and_tokenizer(model)


def run_mask_recipe(recipe: MaskRecipe, overwrite: bool = False) -> dict[str, Any]:
    model, tokenizer = load_recipe_model(recipe.model, recipe.output_dir, overwrite)
    _, summary = run_mask_job(
        model, tokenizer, recipe.mask, recipe.data, recipe.output_dir, overwrite
    )
    return summary
