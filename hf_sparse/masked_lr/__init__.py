"""Golden parameters and masked-learning-rate fine-tuning: find the weights that matter, train
only them.

- ``config``: ``MaskedLRConfig`` (the PEFT method), ``GoldenConfig``, ``ReverseGoldenConfig``,
  ``ScoreConfig``, ``MaskDataConfig``, ``FinetuneConfig``;
- ``core``: the reverse search's fluctuation strategies (pure functions);
- ``golden`` / ``reverse``: the searches on a model (intersection of per-sample top-k masks;
  the KL-maximising mask of a target size);
- ``layer`` / ``model``: the ``MASKED_LR`` PEFT method (a trainable delta inside a mask, saved
  as values + packed mask); ``optim``: ``MaskedAdamW`` (per-element learning rates);
  ``accumulate``: ``SparseGradientAccumulator`` (gradient accumulation at mask positions);
- ``finetune`` / ``trainer``: fine-tuning with a mask, ``GoldenParamsTrainer``;
- ``pipeline``: mask and fine-tuning recipes. Callback: ``hf_sparse.callbacks.GoldenMaskCallback``.

Importing this package registers ``MASKED_LR`` with peft (``import hf_sparse`` does it).
"""

from ..peft_registry import register_tuner
from .accumulate import SparseGradientAccumulator
from .config import (
    MASKED_LR,
    FinetuneConfig,
    GoldenConfig,
    MaskDataConfig,
    MaskedLRConfig,
    ReverseGoldenConfig,
    ScoreConfig,
)
from .core import (
    FLUCTUATION_STRATEGIES,
    STRATEGY_ALIASES,
    FluctuationState,
    initial_state,
    resolve_strategy,
)
from .finetune import finetune_with_masks
from .golden import GoldenResult, golden_masks
from .layer import Linear, MaskedLRLayer
from .model import MaskedLRModel, get_masked_lr_model, prepare_masks, sparse_delta_model
from .optim import MaskedAdamW
from .pipeline import (
    FinetuneRecipe,
    MaskRecipe,
    finetune_recipe_from_dict,
    mask_recipe_from_dict,
    run_finetune_recipe,
    run_mask_job,
    run_mask_recipe,
)
from .reverse import ReverseGoldenResult, reverse_golden_masks
from .trainer import GoldenParamsMixin, GoldenParamsTrainer

register_tuner(MASKED_LR, MaskedLRConfig, MaskedLRModel)

__all__ = [
    "FLUCTUATION_STRATEGIES",
    "STRATEGY_ALIASES",
    "resolve_strategy",
    "MASKED_LR",
    "FinetuneConfig",
    "FinetuneRecipe",
    "FluctuationState",
    "GoldenConfig",
    "GoldenParamsMixin",
    "GoldenParamsTrainer",
    "GoldenResult",
    "Linear",
    "MaskDataConfig",
    "MaskRecipe",
    "MaskedAdamW",
    "MaskedLRConfig",
    "MaskedLRLayer",
    "MaskedLRModel",
    "ReverseGoldenConfig",
    "ReverseGoldenResult",
    "ScoreConfig",
    "SparseGradientAccumulator",
    "finetune_recipe_from_dict",
    "finetune_with_masks",
    "get_masked_lr_model",
    "golden_masks",
    "initial_state",
    "mask_recipe_from_dict",
    "prepare_masks",
    "reverse_golden_masks",
    "run_finetune_recipe",
    "run_mask_job",
    "run_mask_recipe",
    "sparse_delta_model",
]
