"""One-shot pruning: magnitude, Wanda and SparseGPT, for weights and task vectors."""

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

__all__ = [
    "PRUNING_METHODS",
    "MagnitudeConfig",
    "NMPattern",
    "PruningConfig",
    "PruningResult",
    "SparseGPTConfig",
    "WandaConfig",
    "apply_masks_",
    "magnitude_mask",
    "obs_prune",
    "parse_mask_structure",
    "prune_",
    "pruning_config_from_dict",
    "wanda_mask",
]
