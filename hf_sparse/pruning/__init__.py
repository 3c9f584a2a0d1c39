"""One-shot pruning: magnitude, Wanda and SparseGPT, for weights and task vectors.

``config`` (what the user sets), ``core`` (maths on tensors), ``apply`` (``prune_`` on a model
in place), ``pipeline`` (recipes: load, calibrate, prune, evaluate, save); the Trainer
callback is ``hf_sparse.callbacks.PruningCallback``.
"""

from .apply import PruningResult, apply_masks_, prune_
from .config import (
    PRUNING_METHODS,
    MagnitudeConfig,
    PruningConfig,
    SparseGPTConfig,
    WandaConfig,
    pruning_config_from_dict,
)
from .core import NMPattern, magnitude_mask, obs_prune, parse_mask_structure, wanda_mask
from .pipeline import (
    OneshotResult,
    PruningRecipe,
    load_pruning_recipe,
    oneshot,
    pruning_recipe_from_dict,
    save_pruned,
)
from .recover import RecoveryConfig, recover_

__all__ = [
    "PRUNING_METHODS",
    "MagnitudeConfig",
    "NMPattern",
    "OneshotResult",
    "PruningConfig",
    "PruningRecipe",
    "PruningResult",
    "RecoveryConfig",
    "SparseGPTConfig",
    "WandaConfig",
    "apply_masks_",
    "load_pruning_recipe",
    "magnitude_mask",
    "obs_prune",
    "oneshot",
    "parse_mask_structure",
    "prune_",
    "pruning_config_from_dict",
    "pruning_recipe_from_dict",
    "recover_",
    "save_pruned",
    "wanda_mask",
]
