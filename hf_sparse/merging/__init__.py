"""Model merging with task vectors (fine-tuned minus base). So far: the tensor-level merge rules
(task arithmetic, magnitude trim, TIES, DARE); model loading, SparseGPT-pruned task vectors and
sequential merging are still to come (issue 7)."""

from .core import (
    MERGE_METHODS,
    SIGN_METHODS,
    agreeing_signs,
    drop_random,
    merge_task_vectors,
    trim_magnitude,
)

__all__ = [
    "MERGE_METHODS",
    "SIGN_METHODS",
    "agreeing_signs",
    "drop_random",
    "merge_task_vectors",
    "trim_magnitude",
]
