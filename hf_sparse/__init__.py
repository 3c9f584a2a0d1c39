"""hf_sparse: find, keep and remove the parameters of a language model that matter.

Quick use::

    from hf_sparse import SparseGPTConfig, prune_, calibration_windows
    windows = calibration_windows(tokenizer, "wikitext2", count=64, length=512)
    prune_(model, SparseGPTConfig(sparsity=0.5), windows)

Importing the package registers the PEFT methods ``MASKED_LR``, ``BASIS_SHARING`` and ``SPD``
with peft (do it before ``PeftModel.from_pretrained`` on one of our adapters) and every method's
recipe kind (``run_recipe``, ``hf-sparse run``).
"""

from .analysis import AnalysisConfig, SensitivityConfig, run_study, verify_study
from .basis_sharing import BasisSharingConfig, fill_deferred_factors_, get_basis_sharing_model
from .data import calibration_windows, evaluation_windows
from .evaluation import perplexity, sparsity_report
from .integrity import AdapterIntegrityError
from .loading import load_model_and_tokenizer, load_output
from .masked_lr import (
    FinetuneConfig,
    GoldenConfig,
    GoldenParamsTrainer,
    MaskDataConfig,
    MaskedAdamW,
    MaskedLRConfig,
    ReverseGoldenConfig,
    ScoreConfig,
    get_masked_lr_model,
    golden_masks,
    reverse_golden_masks,
)
from .masks import ParameterMasks, top_k
from .merging import MergeConfig, TaskVectorPruneConfig, merge_
from .outputs import RECIPE_FILE, RESULTS_FILE
from .pruning import (
    MagnitudeConfig,
    PruningConfig,
    SparseGPTConfig,
    WandaConfig,
    apply_masks_,
    obs_prune,
    oneshot,
    prune_,
    save_pruned,
)
from .push import push_to_hub
from .real_model import fetch_model, resolve_model_path
from .recipes import RECIPE_KINDS, parse_recipe, run_recipe
from .spd import SPDConfig, SPDLossConfig, SPDTrainer, get_spd_model

__version__ = "0.1.0"

__all__ = [
    "AdapterIntegrityError",
    "RECIPE_FILE",
    "RECIPE_KINDS",
    "RESULTS_FILE",
    "AnalysisConfig",
    "BasisSharingConfig",
    "FinetuneConfig",
    "GoldenConfig",
    "GoldenParamsTrainer",
    "MagnitudeConfig",
    "MaskDataConfig",
    "MaskedAdamW",
    "MaskedLRConfig",
    "MergeConfig",
    "ParameterMasks",
    "PruningConfig",
    "ReverseGoldenConfig",
    "SPDConfig",
    "SPDLossConfig",
    "SPDTrainer",
    "ScoreConfig",
    "SensitivityConfig",
    "SparseGPTConfig",
    "TaskVectorPruneConfig",
    "WandaConfig",
    "apply_masks_",
    "calibration_windows",
    "evaluation_windows",
    "fetch_model",
    "fill_deferred_factors_",
    "get_basis_sharing_model",
    "get_masked_lr_model",
    "get_spd_model",
    "golden_masks",
    "load_model_and_tokenizer",
    "load_output",
    "merge_",
    "obs_prune",
    "oneshot",
    "parse_recipe",
    "perplexity",
    "prune_",
    "push_to_hub",
    "resolve_model_path",
    "reverse_golden_masks",
    "run_recipe",
    "run_study",
    "save_pruned",
    "sparsity_report",
    "top_k",
    "verify_study",
]
