"""hf_sparse: find, keep and remove the parameters of a language model that matter.

Quick use::

    from hf_sparse import SparseGPTConfig, prune_, calibration_windows
    windows = calibration_windows(tokenizer, "wikitext2", count=64, length=512)
    prune_(model, SparseGPTConfig(sparsity=0.5), windows)
"""

from . import basis_sharing, spd  # noqa: F401  (register the BASIS_SHARING and SPD PEFT methods)
from .data import calibration_windows, evaluation_windows
from .evaluation import perplexity, sparsity_report
from .masked_lr import MaskedAdamW, MaskedLRConfig, get_masked_lr_model  # registers MASKED_LR
from .merging import MergeConfig, merge_
from .pipeline import oneshot, save_pruned
from .pruning import (
    MagnitudeConfig,
    PruningConfig,
    SparseGPTConfig,
    WandaConfig,
    apply_masks_,
    obs_prune,
    prune_,
)
from .real_model import fetch_model, resolve_model_path
from .recipes import load_recipe

__version__ = "0.1.0"

__all__ = [
    "MagnitudeConfig",
    "MaskedAdamW",
    "MaskedLRConfig",
    "MergeConfig",
    "PruningConfig",
    "SparseGPTConfig",
    "WandaConfig",
    "apply_masks_",
    "calibration_windows",
    "evaluation_windows",
    "fetch_model",
    "get_masked_lr_model",
    "load_recipe",
    "merge_",
    "obs_prune",
    "oneshot",
    "perplexity",
    "prune_",
    "resolve_model_path",
    "save_pruned",
    "sparsity_report",
]
