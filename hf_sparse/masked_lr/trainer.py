"""Trainer subclasses and mixins: golden-parameter analysis and masked-learning-rate training.

Lifecycle (``GoldenParamsTrainer``):
  __init__           picks ``MaskedAdamW`` as the optimizer class (unless ``optimizers`` or
                     ``optimizer_cls_and_kwargs`` say otherwise), with AdamW's settings
  create_optimizer   the Trainer's usual decay / no-decay groups; masks given to the trainer
                     (``masks=`` or ``set_masked_lr``) are handed to the optimizer
  train              masked entries learn at ``inside_lr_scale * lr``, the rest of masked
                     tensors at ``outside_lr_scale * lr`` (0: frozen); tensors without a
                     mask are frozen unless ``freeze_unmasked=False``

Example::

    trainer = GoldenParamsTrainer(model=model, args=args, train_dataset=ds)
    golden = trainer.get_golden_params(GoldenConfig(top_k_percent=5, num_samples=16))
    trainer.set_masked_lr(golden.masks, inside_lr_scale=1.0, outside_lr_scale=0.0)
    trainer.train()
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import torch
from transformers import Trainer

from ..evaluation import compare_generations_with_mask
from ..masks import ParameterMasks
from .config import GoldenConfig, ReverseGoldenConfig
from .golden import golden_masks
from .optim import MaskedAdamW
from .reverse import reverse_golden_masks

logger = logging.getLogger(__name__)


def unwrap_optimizer(optimizer: Any) -> Any:
    """The torch optimizer inside accelerate's ``AcceleratedOptimizer`` wrapper (if any)."""
    while hasattr(optimizer, "optimizer") and not hasattr(optimizer, "set_masks"):
        optimizer = optimizer.optimizer
    return optimizer


def masks_by_parameter(
    model: torch.nn.Module, masks: Mapping[str, torch.Tensor]
) -> dict[torch.nn.Parameter, torch.Tensor]:
    """``{parameter: mask}`` from masks keyed by parameter name, checked against ``model``."""
    ParameterMasks(masks).check_against(model)
    params = dict(model.named_parameters())
    return {params[name]: mask for name, mask in masks.items()}


def set_optimizer_masks(
    optimizer: Any,
    model: torch.nn.Module,
    masks: Mapping[str, torch.Tensor],
    inside_lr_scale: float,
    outside_lr_scale: float,
) -> None:
    """Give ``masks`` to a ``MaskedAdamW`` (maybe wrapped by accelerate); clear error if not."""
    if not inside_lr_scale > 0 or not outside_lr_scale >= 0:
        raise ValueError(
            f"inside_lr_scale must be > 0 and outside_lr_scale >= 0, got {inside_lr_scale} "
            f"and {outside_lr_scale}"
        )
    inner = unwrap_optimizer(optimizer)
    if not isinstance(inner, MaskedAdamW):
        raise TypeError(
            f"masked learning rates need a MaskedAdamW optimizer, the Trainer has "
            f"{type(inner).__name__}: use GoldenParamsTrainer, or pass "
            "optimizers=(MaskedAdamW(model.parameters(), lr=...), None) to the Trainer"
        )
    for group in inner.param_groups:
        group["inside_lr_scale"] = inside_lr_scale
        group["outside_lr_scale"] = outside_lr_scale
    inner.set_masks(masks_by_parameter(model, masks))


def freeze_parameters_without_masks(model: torch.nn.Module, masks: Mapping[str, Any]) -> int:
    """``requires_grad=False`` on every parameter ``masks`` does not name; returns how many."""
    frozen = 0
    for name, param in model.named_parameters():
        if name not in masks and param.requires_grad:
            param.requires_grad_(False)
            frozen += 1
    return frozen


class GoldenParamsMixin:
    """Golden-parameter analysis and masked-LR training for a ``transformers.Trainer``.

    Mix in before ``Trainer``: ``class MyTrainer(GoldenParamsMixin, Trainer)``.
    """

    def __init__(
        self,
        *args,
        masks: Mapping[str, torch.Tensor] | None = None,
        inside_lr_scale: float = 1.0,
        outside_lr_scale: float = 0.0,
        freeze_unmasked: bool = True,
        **kwargs,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.masked_lr_masks: ParameterMasks | None = None
        # Parameters without a mask: frozen (only masked tensors learn) or trained at plain lr.
        self.freeze_unmasked = freeze_unmasked
        self.inside_lr_scale = inside_lr_scale
        self.outside_lr_scale = outside_lr_scale
        user_optimizer = kwargs.get("optimizers", (None, None))[0] is not None
        if not user_optimizer and getattr(self, "optimizer_cls_and_kwargs", None) is None:
            self.optimizer_cls_and_kwargs = (
                MaskedAdamW,
                {
                    "lr": self.args.learning_rate,
                    "betas": (self.args.adam_beta1, self.args.adam_beta2),
                    "eps": self.args.adam_epsilon,
                },
            )
        if masks is not None:
            self.set_masked_lr(masks, inside_lr_scale, outside_lr_scale)

    def set_masked_lr(
        self,
        masks: Mapping[str, torch.Tensor],
        inside_lr_scale: float | None = None,
        outside_lr_scale: float | None = None,
    ) -> None:
        """Train masked entries at ``inside_lr_scale * lr`` and the rest at ``outside * lr``."""
        if inside_lr_scale is not None:
            self.inside_lr_scale = inside_lr_scale
        if outside_lr_scale is not None:
            self.outside_lr_scale = outside_lr_scale
        masks = masks if isinstance(masks, ParameterMasks) else ParameterMasks(masks)
        masks.check_against(self.model)
        self.masked_lr_masks = masks
        if self.freeze_unmasked:
            frozen = freeze_parameters_without_masks(self.model, masks)
            if frozen and self.optimizer is not None:
                logger.warning(
                    "%d unmasked parameters were frozen after the optimizer was built; AdamW "
                    "skips them as they get no gradient",
                    frozen,
                )
        if self.optimizer is not None:
            self._hand_masks_to_optimizer()

    def _hand_masks_to_optimizer(self) -> None:
        set_optimizer_masks(
            self.optimizer,
            self.model,
            self.masked_lr_masks,
            self.inside_lr_scale,
            self.outside_lr_scale,
        )

    def create_optimizer(self, *args, **kwargs):
        optimizer = super().create_optimizer(*args, **kwargs)
        if self.masked_lr_masks is not None:
            self._hand_masks_to_optimizer()
        return optimizer

    def get_golden_params(
        self,
        config: GoldenConfig | None = None,
        dataset=None,
        prompt_fn=None,
        show_progress: bool = True,
    ):
        """Golden masks (intersection of per-sample top-k) of the trainer's model on
        ``dataset`` (default: the train dataset). See ``hf_sparse.masked_lr.golden_masks``.
        """
        dataset = self._dataset_or_train(dataset)
        config = config or GoldenConfig()
        return golden_masks(self.model, config, dataset, prompt_fn, show_progress)

    def get_reverse_golden_params(
        self,
        config: ReverseGoldenConfig | None = None,
        dataset=None,
        prompt_fn=None,
        eval_dataset=None,
        show_progress: bool = True,
    ):
        """Reverse golden search (masks whose removal most changes the output distribution)
        on ``dataset`` (default: the train dataset; held-out samples default to the eval
        dataset when the trainer has one). See ``hf_sparse.masked_lr.reverse_golden_masks``.
        """
        if eval_dataset is None and prompt_fn is None and self.eval_dataset is not None:
            eval_dataset = self.eval_dataset
        dataset = self._dataset_or_train(dataset)
        config = config or ReverseGoldenConfig()
        return reverse_golden_masks(
            self.model, config, dataset, prompt_fn, eval_dataset, show_progress
        )

    def current_masks(self) -> ParameterMasks | None:
        """The masks this trainer trains with: given to it (``masks=``/``set_masked_lr``) or
        found by one of its callbacks (e.g. ``GoldenMaskCallback`` at ``on_train_begin``)."""
        if self.masked_lr_masks is not None:
            return self.masked_lr_masks
        for callback in self.callback_handler.callbacks:
            found = getattr(callback, "masks", None)
            if isinstance(found, ParameterMasks):
                return found
        return None

    def _dataset_or_train(self, dataset):
        dataset = dataset if dataset is not None else self.train_dataset
        if dataset is None:
            raise ValueError("no dataset: pass one, or give the trainer a train_dataset")
        return dataset

    def compare_generations_with_mask(
        self,
        prompts: list[str],
        masks: Mapping[str, torch.Tensor] | None = None,
        max_new_tokens: int = 32,
    ) -> list[dict[str, str]]:
        """Greedy generations with and without the masked weights zeroed, side by side."""
        masks = masks if masks is not None else self.current_masks()
        if masks is None:
            raise ValueError(
                "no masks: pass masks=, call set_masked_lr, or train with a GoldenMaskCallback"
            )
        tokenizer = self.processing_class
        if tokenizer is None:
            raise ValueError("the trainer has no tokenizer (processing_class) to generate with")
        return compare_generations_with_mask(self.model, tokenizer, prompts, masks, max_new_tokens)


class GoldenParamsTrainer(GoldenParamsMixin, Trainer):
    """``transformers.Trainer`` with golden-parameter analysis and masked learning rates."""
