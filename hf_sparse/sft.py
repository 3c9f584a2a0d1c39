"""Instruction fine-tuning with a golden (or any) mask: sparse-delta adapter, LoRA or full model.

Recipe form (``recipes/golden-mask-sft.yaml``)::

    model: smollm2-135m
    data: {dataset: alpaca, num_samples: 8, max_length: 256}
    mask:
      golden: {top_k_percent: 20, scope: tensor, params: [q, k, v, o, gate, up, down]}
    finetune: {adapter: masked_lr, max_steps: 30, learning_rate: 1.0e-4, train_samples: 240}
    output_dir: outputs/smollm2-golden-sft

The mask job runs first (as in ``hf-sparse mask``); the model is then wrapped with the
masked-LR PEFT adapter (``adapter: masked_lr``: a trainable delta inside the mask, the outside
frozen or at ``outside_lr_scale``) or trained in full with ``MaskedAdamW`` (``adapter: full``),
on Alpaca-style examples with the loss on the response tokens. The output folder holds the
adapter (or model), the masks and ``results.json`` (eval loss before / after).
"""

from __future__ import annotations

import logging
import math
import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .config_utils import check_keys, check_positive_ints, from_dict, help_field, to_dict
from .data import draw_records
from .hub import render_adapter_card
from .importance import instruction_prompt_fn
from .io import atomic_output_dir, write_json_atomic
from .masked import ParameterMasks

logger = logging.getLogger(__name__)

ADAPTERS = ("masked_lr", "full")


@dataclass
class FinetuneConfig:
    adapter: str = help_field(
        "masked_lr: sparse-delta PEFT adapter on the masked weights; full: the whole model "
        "with MaskedAdamW (masked entries at inside_lr_scale * lr, the rest at outside).",
        "masked_lr",
    )
    inside_lr_scale: float = help_field("Learning-rate multiplier inside the mask.", 1.0)
    outside_lr_scale: float = help_field("Multiplier outside the mask (0 = frozen).", 0.0)
    learning_rate: float = help_field("Base learning rate (AdamW).", 1e-4)
    max_steps: int = help_field("Optimizer steps.", 30)
    batch_size: int = help_field("Examples per step.", 4)
    train_samples: int = help_field("Training examples drawn from the data.", 240)
    eval_samples: int = help_field("Held-out examples for the eval loss.", 40)
    max_length: int = help_field("Tokens per example (longer ones are cut).", 256)
    seed: int = help_field("Seed of the example draw and of training.", 0)

    def __post_init__(self) -> None:
        if self.adapter not in ADAPTERS:
            raise ValueError(
                f"finetune.adapter must be one of {list(ADAPTERS)}, got {self.adapter!r}"
            )
        if self.inside_lr_scale <= 0 or self.outside_lr_scale < 0:
            raise ValueError(
                "finetune.inside_lr_scale must be > 0 and outside_lr_scale >= 0, got "
                f"{self.inside_lr_scale} and {self.outside_lr_scale}"
            )
        counts = ("max_steps", "batch_size", "train_samples", "eval_samples", "max_length")
        check_positive_ints(self, counts, "finetune")


def instruction_splits(
    tokenizer, source: str, train: int, held_out: int, max_length: int, seed: int = 0
) -> tuple[list[dict], list[dict]]:
    """Tokenized (train, held-out) Alpaca-style examples, disjoint, drawn with ``seed``."""
    prompt_fn = instruction_prompt_fn(tokenizer, max_length)
    examples = [prompt_fn(r) for r in draw_records(source, train + held_out, seed)]
    return examples[held_out:], examples[:held_out]


class PadCollator:
    """Right-pads ``input_ids`` (pad id) and ``labels`` (-100); builds the attention mask."""

    def __init__(self, pad_token_id: int):
        self.pad_token_id = pad_token_id

    def __call__(self, examples: Sequence[dict]) -> dict[str, torch.Tensor]:
        length = max(len(e["input_ids"]) for e in examples)
        ids = torch.full((len(examples), length), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(examples), length), -100, dtype=torch.long)
        attention = torch.zeros((len(examples), length), dtype=torch.long)
        for row, example in enumerate(examples):
            n = len(example["input_ids"])
            ids[row, :n] = torch.as_tensor(example["input_ids"])
            labels[row, :n] = torch.as_tensor(example.get("labels", example["input_ids"]))
            attention[row, :n] = 1
        return {"input_ids": ids, "labels": labels, "attention_mask": attention}


@torch.no_grad()
def mean_response_loss(
    model: nn.Module, examples: Sequence[dict], pad_token_id: int, batch_size: int = 8
) -> float:
    """Token-weighted mean cross-entropy over the labelled (response) tokens of ``examples``."""
    collate = PadCollator(pad_token_id)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    try:
        for start in range(0, len(examples), batch_size):
            batch = collate(examples[start : start + batch_size])
            logits = (
                model(
                    input_ids=batch["input_ids"].to(device),
                    attention_mask=batch["attention_mask"].to(device),
                )
                .logits[:, :-1]
                .float()
            )
            targets = batch["labels"][:, 1:].to(device)
            loss = nn.functional.cross_entropy(
                logits.reshape(-1, logits.shape[-1]),
                targets.reshape(-1),
                ignore_index=-100,
                reduction="sum",
            )
            total += float(loss)
            count += int((targets != -100).sum())
    finally:
        model.train(was_training)
    return total / max(count, 1)


def train_args(config: FinetuneConfig, output_dir: str | os.PathLike, **overrides):
    from transformers import TrainingArguments

    values = dict(
        output_dir=str(output_dir),
        max_steps=config.max_steps,
        per_device_train_batch_size=config.batch_size,
        learning_rate=config.learning_rate,
        lr_scheduler_type="constant",
        weight_decay=0.0,
        logging_steps=max(1, config.max_steps // 10),
        save_strategy="no",
        report_to=[],
        use_cpu=not torch.cuda.is_available(),
        seed=config.seed,
        remove_unused_columns=False,
        disable_tqdm=False,
    )
    values.update(overrides)
    return TrainingArguments(**values)


def finetune_with_masks(
    model: nn.Module,
    tokenizer,
    masks: ParameterMasks,
    config: FinetuneConfig,
    train_examples: list[dict],
    eval_examples: list[dict],
    work_dir: str | os.PathLike,
) -> tuple[nn.Module, dict[str, Any]]:
    """Train with masked learning rates; returns the trained model and eval losses."""
    from transformers import Trainer

    from .masked_lr import MaskedLRConfig, get_masked_lr_model
    from .trainers import GoldenParamsTrainer

    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    metrics: dict[str, Any] = {"eval_loss_before": mean_response_loss(model, eval_examples, pad)}
    args = train_args(config, work_dir)
    if config.adapter == "masked_lr":
        peft_config = MaskedLRConfig(  # targets: the masked modules
            inside_lr_scale=config.inside_lr_scale,
            outside_lr_scale=config.outside_lr_scale,
        )
        model = get_masked_lr_model(model, peft_config, masks=masks)
        trainer = Trainer(
            model=model,
            args=args,
            train_dataset=train_examples,
            data_collator=PadCollator(pad),
        )
    else:
        trainer = GoldenParamsTrainer(
            model=model,
            args=args,
            train_dataset=train_examples,
            data_collator=PadCollator(pad),
            masks=masks,
            inside_lr_scale=config.inside_lr_scale,
            outside_lr_scale=config.outside_lr_scale,
        )
    metrics["trainable_parameters"] = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if config.adapter == "full":
        metrics["trainable_parameters"] = (
            masks.count() if config.outside_lr_scale == 0 else metrics["trainable_parameters"]
        )
    output = trainer.train()
    metrics["train_loss"] = output.training_loss
    metrics["train_seconds"] = output.metrics.get("train_runtime")
    metrics["eval_loss_after"] = mean_response_loss(model, eval_examples, pad)
    metrics["eval_ppl_after"] = math.exp(metrics["eval_loss_after"])
    return model, metrics


@dataclass
class SFTRecipe:
    model: str
    data: Any  # MaskDataConfig
    mask: Any  # MaskJobSpec, or None when masks_file is given
    masks_file: str | None
    finetune: FinetuneConfig
    output_dir: str | None


SFT_RECIPE_KEYS = ("model", "data", "mask", "masks_file", "finetune", "output_dir")


def sft_recipe_from_dict(values: dict[str, Any], where: str = "recipe") -> SFTRecipe:
    from .mask_pipeline import MaskDataConfig, parse_mask_job

    check_keys(values, SFT_RECIPE_KEYS, where, "fine-tuning recipe")
    has_mask, has_file = values.get("mask") is not None, values.get("masks_file") is not None
    if has_mask == has_file:
        raise ValueError(f"{where}: give exactly one of 'mask' (a mask job) or 'masks_file'")
    if has_file and not Path(values["masks_file"]).is_file():
        raise FileNotFoundError(f"{where}: masks_file {values['masks_file']} does not exist")
    return SFTRecipe(
        model=str(values.get("model") or ""),
        data=from_dict(MaskDataConfig, values.get("data"), f"{where}.data"),
        mask=parse_mask_job(values["mask"], f"{where}.mask") if has_mask else None,
        masks_file=values.get("masks_file"),
        finetune=from_dict(FinetuneConfig, values.get("finetune"), f"{where}.finetune"),
        output_dir=values.get("output_dir"),
    )


def run_sft_recipe(
    recipe: SFTRecipe, overwrite: bool = False, recipe_dict: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Mask job (or mask file), then fine-tuning; saves adapter/model, masks and results."""
    from .mask_pipeline import load_recipe_model, run_mask_job

    model, tokenizer = load_recipe_model(recipe.model, recipe.output_dir, overwrite)
    if recipe.mask is not None:
        masks, mask_summary = run_mask_job(model, tokenizer, recipe.mask, recipe.data)
    else:
        masks, mask_summary = ParameterMasks.load(recipe.masks_file), {"file": recipe.masks_file}
        masks.check_against(model)
    ft = recipe.finetune
    train, held_out = instruction_splits(
        tokenizer, recipe.data.dataset, ft.train_samples, ft.eval_samples, ft.max_length, ft.seed
    )
    results: dict[str, Any] = {
        "mask": {k: mask_summary.get(k) for k in ("job", "kept", "density", "seconds", "kl")},
        "finetune_config": to_dict(ft),
    }
    with tempfile.TemporaryDirectory(prefix="hf-sparse-sft-") as work:
        model, metrics = finetune_with_masks(model, tokenizer, masks, ft, train, held_out, work)
    results.update(metrics)
    if recipe.output_dir is not None:
        with atomic_output_dir(recipe.output_dir, overwrite) as tmp:
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            masks.save(Path(tmp) / "masks.safetensors")
            write_json_atomic(results, Path(tmp) / "results.json")
            if recipe.finetune.adapter == "masked_lr":  # replace peft's generic card
                card = render_adapter_card(results, recipe_dict, recipe.model)
                (Path(tmp) / "README.md").write_text(card)
    return results
