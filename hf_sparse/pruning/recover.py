"""Prune, then recover: a short fine-tune of the pruned model with its mask kept, in ``Trainer``.

One-shot pruning leaves the kept weights as the solver set them; a few hundred optimizer steps
on text of the calibration domain recover much of the lost perplexity (as in SparseGPT's and
Wanda's follow-up experiments, and Sun et al.'s LoRA/full fine-tuning of Wanda models). Here
every weight is trained and the one-shot pass's masks are re-applied after every optimizer
step (as ``hf_sparse.callbacks.PruningCallback`` does once it has pruned): pruned weights are
exact zeros whenever the model is evaluated or saved.

Recipe block (``recover:`` next to ``pruning:``)::

    recover: {steps: 200, learning_rate: 5.0e-5, batch_size: 2, sequence_length: 256,
              eval_at: [50, 200]}

Training text: the calibration dataset's calibration split (WikiText-2 validation for
``wikitext2``), cut into non-overlapping windows and shuffled with ``seed``; the evaluation
split is never trained on.
"""

from __future__ import annotations

import logging
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..config_utils import check_positive_ints, help_field

logger = logging.getLogger(__name__)


@dataclass
class RecoveryConfig:
    """Fine-tune a pruned model with its mask kept (full weights under the mask)."""

    steps: int = help_field("Optimizer steps.", 200)
    learning_rate: float = help_field("Peak learning rate (AdamW, linear decay).", 5e-5)
    warmup_steps: int = help_field("Linear warm-up steps.", 10)
    batch_size: int = help_field("Windows per optimizer step.", 2)
    sequence_length: int = help_field("Tokens per training window.", 256)
    weight_decay: float = help_field("AdamW weight decay.", 0.0)
    dataset: str | None = help_field(
        "Training text: a named set, file or Hub dataset (its calibration split). None = the "
        "recipe's calibration dataset.",
        None,
    )
    eval_at: list[int] | None = help_field(
        "Steps after which perplexity is measured; None = after the last step. Step 0 (the "
        "one-shot model) is measured anyway when the recipe has an evaluation block.",
        None,
    )
    seed: int = help_field("Seed of the window order and of training.", 0)
    train_embeddings: bool = help_field(
        "Also train the input/output embeddings (never pruned). False = only the decoder "
        "blocks (and final norm) train, which skips the LM head's weight gradient.",
        False,
    )

    def __post_init__(self) -> None:
        check_positive_ints(self, ("steps", "batch_size", "sequence_length"), "recover")
        if not isinstance(self.warmup_steps, int) or self.warmup_steps < 0:
            raise ValueError(f"recover.warmup_steps must be >= 0, got {self.warmup_steps!r}")
        if not isinstance(self.learning_rate, int | float) or not self.learning_rate > 0:
            raise ValueError(f"recover.learning_rate must be > 0, got {self.learning_rate!r}")
        if self.eval_at is None:
            self.eval_at = [self.steps]
        if not isinstance(self.eval_at, list) or not all(
            isinstance(s, int) and 0 < s <= self.steps for s in self.eval_at
        ):
            raise ValueError(
                f"recover.eval_at must list steps in [1, steps={self.steps}], got {self.eval_at!r}"
            )


class _Windows(torch.utils.data.Dataset):
    def __init__(self, windows: torch.Tensor) -> None:
        self.windows = windows

    def __len__(self) -> int:
        return self.windows.shape[0]

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        ids = self.windows[index]
        return {"input_ids": ids, "labels": ids.clone()}


def training_windows(tokenizer, source: str, config: RecoveryConfig) -> torch.Tensor:
    """Non-overlapping windows of the calibration split, in a seeded order, repeated so that
    ``steps * batch_size`` windows are available."""
    from ..data import contiguous_windows, load_text, tokenize

    windows = contiguous_windows(
        tokenize(tokenizer, load_text(source, "calibration")), config.sequence_length
    )
    generator = torch.Generator().manual_seed(config.seed)
    needed = config.steps * config.batch_size
    order = torch.cat(
        [
            torch.randperm(windows.shape[0], generator=generator)
            for _ in range(-(-needed // windows.shape[0]))
        ]
    )
    return windows[order[:needed]]


@dataclass
class RecoveryResult:
    perplexity: dict[int, float] = field(default_factory=dict)  # step -> perplexity
    seconds: float = 0.0  # the training loop, evaluations excluded
    eval_seconds: float = 0.0
    sparsity_after: float | None = None
    losses: list[float] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "perplexity_by_step": {str(k): v for k, v in sorted(self.perplexity.items())},
            "train_seconds": round(self.seconds, 2),
            "eval_seconds": round(self.eval_seconds, 2),
            "sparsity_after": self.sparsity_after,
            "first_loss": self.losses[0] if self.losses else None,
            "last_loss": self.losses[-1] if self.losses else None,
        }


def _keep_masks_callback(masks: dict[str, torch.Tensor]):
    """A ``TrainerCallback`` that zeroes the pruned weights after every optimizer step."""
    from transformers import TrainerCallback

    from .apply import apply_masks_

    class KeepMasks(TrainerCallback):
        def on_optimizer_step(self, args, state, control, model=None, **kwargs):
            apply_masks_(model, masks)

    return KeepMasks()


def _eval_callback(windows: torch.Tensor | None, steps: list[int], result: RecoveryResult):
    from transformers import TrainerCallback

    from ..evaluation import perplexity

    class EvalAtSteps(TrainerCallback):
        def on_step_end(self, args, state, control, model=None, **kwargs):
            if windows is None or state.global_step not in steps:
                return
            start = time.perf_counter()
            ppl = perplexity(model, windows, 4, show_progress=False).perplexity
            result.eval_seconds += time.perf_counter() - start
            result.perplexity[state.global_step] = ppl
            logger.info("recovery step %d: perplexity %.3f", state.global_step, ppl)

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                result.losses.append(float(logs["loss"]))

    return EvalAtSteps()


def recover_(
    model: nn.Module,
    masks: dict[str, torch.Tensor],
    config: RecoveryConfig,
    tokenizer,
    source: str = "wikitext2",
    eval_windows: torch.Tensor | None = None,
    show_progress: bool = True,
) -> RecoveryResult:
    """Fine-tune ``model`` in place for ``config.steps`` with ``masks`` kept (``True`` = kept).

    Perplexity on ``eval_windows`` is recorded after each step in ``config.eval_at``.
    """
    from ..evaluation import overall_sparsity, sparsity_report

    if not masks:
        raise ValueError("recover_ needs the masks of a pruned model (PruningResult.masks)")
    if tokenizer is None:
        raise ValueError("recover_ needs a tokenizer to cut the training text into windows")
    train = _Windows(training_windows(tokenizer, config.dataset or source, config))
    result = RecoveryResult()
    callback = _keep_masks_callback(dict(masks))
    frozen = [] if config.train_embeddings else _embedding_parameters(model)
    for param in frozen:
        param.requires_grad_(False)
    try:
        _train(model, train, callback, config, eval_windows, result, show_progress)
    finally:
        for param in frozen:
            param.requires_grad_(True)
    model.eval()
    result.sparsity_after = overall_sparsity(sparsity_report(model, sorted(masks)))
    return result


def _embedding_parameters(model: nn.Module) -> list[nn.Parameter]:
    params = {}
    for getter in ("get_input_embeddings", "get_output_embeddings"):
        module = getattr(model, getter, lambda: None)()
        if module is not None and module.weight.requires_grad:
            params[id(module.weight)] = module.weight
    return list(params.values())


def _train(model, train, callback, config, eval_windows, result, show_progress) -> None:
    from transformers import Trainer, TrainingArguments

    with tempfile.TemporaryDirectory(prefix="hf_sparse_recover_") as tmp:
        args = TrainingArguments(
            output_dir=tmp,
            max_steps=config.steps,
            per_device_train_batch_size=config.batch_size,
            learning_rate=config.learning_rate,
            warmup_steps=config.warmup_steps,
            weight_decay=config.weight_decay,
            lr_scheduler_type="linear",
            logging_steps=max(1, min(10, config.steps)),
            save_strategy="no",
            report_to=[],
            use_cpu=not torch.cuda.is_available(),
            disable_tqdm=not show_progress,
            seed=config.seed,
            data_seed=config.seed,
            dataloader_num_workers=0,
        )
        trainer = Trainer(
            model=model,
            args=args,
            train_dataset=train,
            callbacks=[callback, _eval_callback(eval_windows, config.eval_at, result)],
        )
        start = time.perf_counter()
        trainer.train()
        result.seconds = time.perf_counter() - start - result.eval_seconds
