"""Model merging with task vectors (fine-tuned minus base): task arithmetic, magnitude
pruning, TIES, DARE and SparseGPT-pruned task vectors (OBS error correction on each layer's
input Hessian) with sequential input propagation, for full checkpoints and adapters.

Maths in ``core``, task-vector loading in ``task_vectors``,
the model-level merge in ``apply``, recipes and outputs in ``pipeline``.
"""

from .apply import MergeResult, merge_
from .config import HESSIAN_MODES, MergeConfig, MergeSource, TaskVectorPruneConfig
from .core import (
    MERGE_METHODS,
    SIGN_METHODS,
    ObsOptions,
    agreeing_signs,
    drop_random,
    merge_task_vectors,
    prune_task_vector_obs,
    reconstruction_error,
    register_merge_method,
    rescale_rows,
    trim_magnitude,
)
from .pipeline import MergeRecipe, merge_recipe_from_dict, run_merge_recipe
from .task_vectors import check_sources, inspect_source, load_task_vector

__all__ = [
    "HESSIAN_MODES",
    "MERGE_METHODS",
    "SIGN_METHODS",
    "MergeConfig",
    "MergeRecipe",
    "MergeResult",
    "MergeSource",
    "ObsOptions",
    "TaskVectorPruneConfig",
    "agreeing_signs",
    "check_sources",
    "drop_random",
    "inspect_source",
    "load_task_vector",
    "merge_",
    "merge_recipe_from_dict",
    "merge_task_vectors",
    "prune_task_vector_obs",
    "reconstruction_error",
    "register_merge_method",
    "rescale_rows",
    "run_merge_recipe",
    "trim_magnitude",
]
