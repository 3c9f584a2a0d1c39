"""Basis Sharing: cross-layer shared SVD bases as a PEFT method (``BASIS_SHARING``).

Wang et al., "Basis Sharing: Cross-Layer Parameter Sharing for Large Language Model
Compression", ICLR 2025. Importing this package registers ``BASIS_SHARING`` with peft; do it
before ``PeftModel.from_pretrained`` (otherwise ``KeyError: 'BASIS_SHARING'``).
"""

from ..peft_registry import register_tuner
from .compressed import (
    is_compressed_basis_sharing,
    load_compressed,
    register_auto_classes,
    save_compressed,
    to_compressed,
)
from .config import BASIS_SHARING, BasisSharingConfig
from .core import (
    SharedFactors,
    compression_rank,
    energy_rank,
    refit_coefficients,
    shared_basis_svd,
    whitened_error,
    whitening_factor,
)
from .dynamic_rank import STRATEGIES, dynamic_rank
from .factorized import FactorizedLinear, unload_factorized
from .layer import BasisSharingLayer, Linear
from .model import BasisSharingModel, fill_deferred_factors_, get_basis_sharing_model
from .pipeline import (
    BasisSharingRecipe,
    basis_sharing_recipe_from_dict,
    run_basis_sharing_recipe,
)
from .plan import collect_input_stats, make_plan, parameter_counts
from .update import update_coefficients_

register_tuner(BASIS_SHARING, BasisSharingConfig, BasisSharingModel)
register_auto_classes()

__all__ = [
    "BASIS_SHARING",
    "STRATEGIES",
    "BasisSharingConfig",
    "BasisSharingLayer",
    "BasisSharingModel",
    "BasisSharingRecipe",
    "FactorizedLinear",
    "Linear",
    "SharedFactors",
    "basis_sharing_recipe_from_dict",
    "collect_input_stats",
    "fill_deferred_factors_",
    "is_compressed_basis_sharing",
    "load_compressed",
    "compression_rank",
    "dynamic_rank",
    "energy_rank",
    "get_basis_sharing_model",
    "make_plan",
    "parameter_counts",
    "refit_coefficients",
    "register_auto_classes",
    "run_basis_sharing_recipe",
    "save_compressed",
    "shared_basis_svd",
    "to_compressed",
    "unload_factorized",
    "update_coefficients_",
    "whitened_error",
    "whitening_factor",
]
