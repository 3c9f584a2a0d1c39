"""Trainer callbacks (packaged as ``hf_sparse.callbacks``), one module per method folder:
``pruning`` (PruningCallback), ``masked_lr`` (GoldenMaskCallback), ``analysis``
(SensitivityCallback), ``merging`` (TaskVectorPruneCallback), ``basis_sharing``
(BasisSharingCallback)."""

from .analysis import SensitivityCallback
from .basis_sharing import BasisSharingCallback
from .masked_lr import GoldenMaskCallback, SparseGradientAccumulationCallback
from .merging import TaskVectorPruneCallback
from .pruning import PruningCallback

__all__ = [
    "BasisSharingCallback",
    "GoldenMaskCallback",
    "PruningCallback",
    "SensitivityCallback",
    "SparseGradientAccumulationCallback",
    "TaskVectorPruneCallback",
]
