"""Mask recipes (score, golden, reverse search) and fine-tuning recipes with a mask.

Mask recipe (``recipes/reverse-golden.yaml``)::

    model: smollm2-135m
    data: {dataset: alpaca, num_samples: 16, max_length: 256, eval_samples: 8}
    mask:
      reverse: {target_percent: 1.0, strategy: momentum, rounds: 8}
    output_dir: outputs/smollm2-reverse-golden

``mask`` holds exactly one job: ``score`` (``ScoreConfig``: one metric's top-k), ``golden``
(``GoldenConfig``: intersection of per-sample top-k) or ``reverse`` (``ReverseGoldenConfig``:
KL-maximising search). A fine-tuning recipe (``recipes/golden-mask-sft.yaml``) adds
``finetune`` (``FinetuneConfig``) and takes ``mask`` or ``masks_file``: the mask job runs
first, then the masked weights are trained (sparse-delta adapter or ``MaskedAdamW``).

Outputs: ``masks.safetensors`` (packed), ``hf_sparse_results.json``, ``recipe.yaml``; a
fine-tuning output adds the adapter (or model), the tokenizer and a model card.
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from ..config_utils import check_keys, from_dict, to_dict
from ..data import check_sequence_length, draw_records, load_text, random_windows, tokenize
from ..importance import compute_importance, instruction_prompt_fn
from ..importance.samples import apply_prompt_fn
from ..importance.selection import select_parameters
from ..io import atomic_output_dir, check_output_dir, model_bytes
from ..loading import base_model_id, load_checked
from ..masks import ParameterMasks, top_k
from ..models import parameter_layouts
from ..outputs import results_record, write_outputs
from ..recipes import RecipeKind, register_recipe_kind
from .config import (
    FinetuneConfig,
    GoldenConfig,
    MaskDataConfig,
    ReverseGoldenConfig,
    ScoreConfig,
)
from .finetune import finetune_with_masks, instruction_splits
from .golden import golden_masks
from .reverse import reverse_golden_masks

logger = logging.getLogger(__name__)

MASKS_FILE = "masks.safetensors"
MaskJobConfig = ScoreConfig | GoldenConfig | ReverseGoldenConfig


@dataclass
class MaskJobOutcome:
    masks: ParameterMasks
    summary: dict[str, Any]  # kl, history, ... (what the job measured)


def _score(model, tokenizer, config: ScoreConfig, samples, held_out, prompt_fn, progress):
    batches = apply_prompt_fn(samples, prompt_fn)
    scores = compute_importance(
        model,
        batches,
        config.metric,
        config.params,
        progress,
        blocks=config.blocks,
        **config.metric_options,
    )
    return MaskJobOutcome(
        top_k(scores, config.top_k_percent, config.scope, parameter_layouts(model)), {}
    )


def _golden(model, tokenizer, config: GoldenConfig, samples, held_out, prompt_fn, progress):
    result = golden_masks(model, config, samples, prompt_fn, show_progress=progress)
    return MaskJobOutcome(result.masks, {"samples_used": result.samples_used})


def _reverse(model, tokenizer, config: ReverseGoldenConfig, samples, held_out, prompt_fn, progress):
    result = reverse_golden_masks(model, config, samples, prompt_fn, held_out, progress)
    return MaskJobOutcome(result.masks, {"kl": result.kl, "history": result.history})


# Mask job name -> (its config class, its runner).
MASK_JOBS: dict[str, tuple[type, Callable[..., MaskJobOutcome]]] = {
    "score": (ScoreConfig, _score),
    "golden": (GoldenConfig, _golden),
    "reverse": (ReverseGoldenConfig, _reverse),
}


def parse_mask_job(mask: Any, where: str = "mask") -> MaskJobConfig:
    """``{golden: {top_k_percent: 5}}`` -> ``GoldenConfig(top_k_percent=5)`` (checked now)."""
    if not isinstance(mask, dict) or len(mask) != 1:
        raise ValueError(
            f"{where} must hold exactly one job of {list(MASK_JOBS)}, e.g. "
            "mask: {golden: {top_k_percent: 5}}"
        )
    ((job, settings),) = mask.items()
    if job not in MASK_JOBS:
        raise ValueError(f"unknown mask job {job!r} in {where}; valid: {list(MASK_JOBS)}")
    return from_dict(MASK_JOBS[job][0], settings, f"{where}.{job}")


def mask_job_name(config: MaskJobConfig) -> str:
    return next(name for name, (cls, _) in MASK_JOBS.items() if isinstance(config, cls))


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


def run_mask_job(
    model: nn.Module,
    tokenizer,
    job: MaskJobConfig,
    data: MaskDataConfig,
    show_progress: bool = True,
) -> tuple[ParameterMasks, dict[str, Any]]:
    """Run one mask job on ``data``; returns the masks and a summary (job, counts, timings)."""
    check_mask_job(model, job, data)
    samples, held_out, prompt_fn = build_samples(tokenizer, data)
    start = time.perf_counter()
    runner = MASK_JOBS[mask_job_name(job)][1]
    outcome = runner(model, tokenizer, job, samples, held_out, prompt_fn, show_progress)
    masks = outcome.masks
    summary = {
        "job": mask_job_name(job),
        "settings": to_dict(job),
        "seconds": time.perf_counter() - start,
        "kept": masks.count(),
        "density": masks.density(),
        "kl": None,
        **outcome.summary,
    }
    return masks, summary


def check_mask_job(model: nn.Module, job: MaskJobConfig, data: MaskDataConfig) -> int:
    """The checks that need the model, before any data is read: sample length against the
    model's positions, every ``params`` pattern matching a parameter. Returns the number of
    selected entries (what the packed masks hold, one bit each)."""
    check_sequence_length(model, data.max_length, "data.max_length")
    selected = select_parameters(model, job.params, job.blocks)
    return sum(p.numel() for p in selected.values())


@dataclass
class MaskRecipe:
    model: str
    data: MaskDataConfig
    mask: MaskJobConfig
    output_dir: str | None

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "data": to_dict(self.data),
            "mask": {mask_job_name(self.mask): to_dict(self.mask)},
            "output_dir": self.output_dir,
        }


MASK_RECIPE_KEYS = ("model", "data", "mask", "output_dir")


def mask_recipe_from_dict(values: dict[str, Any], where: str = "recipe") -> MaskRecipe:
    check_keys(values, MASK_RECIPE_KEYS, where, "mask recipe")
    return MaskRecipe(
        model=str(values.get("model") or ""),
        data=from_dict(MaskDataConfig, values.get("data"), f"{where}.data"),
        mask=parse_mask_job(values.get("mask"), f"{where}.mask"),
        output_dir=values.get("output_dir"),
    )


def save_masks_output(
    masks: ParameterMasks,
    summary: dict[str, Any],
    output_dir: str | os.PathLike,
    recipe: dict[str, Any] | None,
    base_model: str | None,
    overwrite: bool = False,
) -> Path:
    """``masks.safetensors`` + results + recipe, written to a temp folder then renamed."""
    record = results_record(
        "masks",
        config=summary["settings"],
        metrics={k: summary[k] for k in ("kept", "density", "kl")},
        timings={"search_seconds": summary["seconds"]},
        base_model=base_model,
        job=summary["job"],
        history=summary.get("history"),
        per_tensor=[r.to_dict() for r in masks.report()],
    )
    with atomic_output_dir(output_dir, overwrite) as tmp:
        masks.save(Path(tmp) / MASKS_FILE, metadata={"job": summary["job"]})
        write_outputs(tmp, record, recipe)
    logger.info("saved %s to %s", masks, output_dir)
    return Path(output_dir)


def run_mask_recipe(
    recipe: MaskRecipe, overwrite: bool = False, show_progress: bool = True
) -> dict[str, Any]:
    model, tokenizer = load_checked(recipe.model, recipe.output_dir, overwrite)
    entries = check_mask_job(model, recipe.mask, recipe.data)
    if recipe.output_dir is not None:
        check_output_dir(recipe.output_dir, overwrite, entries // 8, inputs=[recipe.model])
    masks, summary = run_mask_job(model, tokenizer, recipe.mask, recipe.data, show_progress)
    if recipe.output_dir is not None:
        save_masks_output(
            masks, summary, recipe.output_dir, recipe.to_dict(), base_model_id(recipe.model),
            overwrite,
        )  # fmt: skip
    return {**summary, "output_dir": recipe.output_dir}


def summarize_masks(summary: dict[str, Any]) -> str:
    lines = [
        f"job:       {summary['job']}",
        f"kept:      {summary['kept']:,} entries ({100 * summary['density']:.4f}%)",
        f"time:      {summary['seconds']:.1f} s",
    ]
    if summary.get("kl") is not None:
        lines.append(f"KL(original || masked removed): {summary['kl']:.5f}")
    if summary.get("output_dir") is not None:
        lines.append(f"saved to:  {summary['output_dir']}")
    return "\n".join(lines)


@dataclass
class FinetuneRecipe:
    model: str
    data: MaskDataConfig
    mask: MaskJobConfig | None  # None when masks_file is given
    masks_file: str | None
    finetune: FinetuneConfig
    output_dir: str | None

    def to_dict(self) -> dict[str, Any]:
        values: dict[str, Any] = {"model": self.model, "data": to_dict(self.data)}
        if self.mask is not None:
            values["mask"] = {mask_job_name(self.mask): to_dict(self.mask)}
        else:
            values["masks_file"] = self.masks_file
        values.update(finetune=to_dict(self.finetune), output_dir=self.output_dir)
        return values


FINETUNE_RECIPE_KEYS = ("model", "data", "mask", "masks_file", "finetune", "output_dir")


def finetune_recipe_from_dict(values: dict[str, Any], where: str = "recipe") -> FinetuneRecipe:
    check_keys(values, FINETUNE_RECIPE_KEYS, where, "fine-tuning recipe")
    has_mask, has_file = values.get("mask") is not None, values.get("masks_file") is not None
    if has_mask == has_file:
        raise ValueError(f"{where}: give exactly one of 'mask' (a mask job) or 'masks_file'")
    if has_file and not Path(values["masks_file"]).is_file():
        raise FileNotFoundError(f"{where}: masks_file {values['masks_file']} does not exist")
    return FinetuneRecipe(
        model=str(values.get("model") or ""),
        data=from_dict(MaskDataConfig, values.get("data"), f"{where}.data"),
        mask=parse_mask_job(values["mask"], f"{where}.mask") if has_mask else None,
        masks_file=values.get("masks_file"),
        finetune=from_dict(FinetuneConfig, values.get("finetune"), f"{where}.finetune"),
        output_dir=values.get("output_dir"),
    )


def run_finetune_recipe(
    recipe: FinetuneRecipe, overwrite: bool = False, show_progress: bool = True
) -> dict[str, Any]:
    """Mask job (or mask file), then fine-tuning; saves adapter/model, masks and results."""
    model, tokenizer = load_checked(recipe.model, recipe.output_dir, overwrite)
    check_sequence_length(model, recipe.finetune.max_length, "finetune.max_length")
    if recipe.mask is not None:
        check_mask_job(model, recipe.mask, recipe.data)
    if recipe.output_dir is not None:
        full = recipe.finetune.adapter != "masked_lr"
        expected = model_bytes(model) if full else model_bytes(model) // 8
        check_output_dir(recipe.output_dir, overwrite, expected, inputs=[recipe.model])
    if recipe.mask is not None:
        masks, mask_summary = run_mask_job(model, tokenizer, recipe.mask, recipe.data)
    else:
        masks, mask_summary = ParameterMasks.load(recipe.masks_file), {"file": recipe.masks_file}
        masks.check_against(model)
    ft = recipe.finetune
    train, held_out = instruction_splits(
        tokenizer, recipe.data.dataset, ft.train_samples, ft.eval_samples, ft.max_length, ft.seed
    )
    with tempfile.TemporaryDirectory(prefix="hf-sparse-sft-") as work:
        model, metrics = finetune_with_masks(model, tokenizer, masks, ft, train, held_out, work)
    mask_info = {k: mask_summary.get(k) for k in ("job", "kept", "density", "seconds", "kl")}
    results = {"mask": mask_info, "finetune_config": to_dict(ft), **metrics}
    if recipe.output_dir is not None:
        base_model = base_model_id(recipe.model)
        record = results_record(
            "finetune",
            config=recipe.to_dict(),
            metrics={k: metrics.get(k) for k in ("eval_loss_before", "eval_loss_after",
                                                  "eval_ppl_after", "train_loss")},
            timings={"train_seconds": metrics.get("train_seconds") or 0.0,
                     "mask_seconds": mask_summary.get("seconds") or 0.0},
            base_model=base_model,
            mask=mask_info,
            trainable_parameters=metrics["trainable_parameters"],
        )  # fmt: skip
        with atomic_output_dir(recipe.output_dir, overwrite) as tmp:
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            masks.save(Path(tmp) / MASKS_FILE)
            write_outputs(tmp, record, recipe.to_dict())  # + the card
    return {**results, "output_dir": recipe.output_dir}


def summarize_finetune(results: dict[str, Any]) -> str:
    lines = [
        f"held-out loss: {results['eval_loss_before']:.4f} -> {results['eval_loss_after']:.4f}",
        f"trainable parameters: {results['trainable_parameters']:,}",
    ]
    if results.get("output_dir"):
        lines.append(f"saved to: {results['output_dir']}")
    return "\n".join(lines)


MASK_RECIPES = register_recipe_kind(
    RecipeKind("masks", ("mask",), mask_recipe_from_dict, run_mask_recipe, summarize_masks)
)
FINETUNE_RECIPES = register_recipe_kind(
    RecipeKind(
        "finetune",
        ("finetune",),
        finetune_recipe_from_dict,
        run_finetune_recipe,
        summarize_finetune,
        priority=1,  # a fine-tuning recipe also holds a `mask:` job
    )
)
