"""Fine-tuning with a mask: a sparse-delta adapter (``MASKED_LR``) or the full model with
``MaskedAdamW``, on Alpaca-style examples with the loss on the response tokens.

Used by fine-tuning recipes (``pipeline``); usable on its own with any masks.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from ..data import draw_records
from ..importance import instruction_prompt_fn
from ..masks import ParameterMasks
from .config import FinetuneConfig, MaskedLRConfig
from .model import get_masked_lr_model
from .trainer import GoldenParamsTrainer

logger = logging.getLogger(__name__)


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
