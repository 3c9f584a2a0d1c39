"""Trainer callbacks (packaged as ``hf_sparse.callbacks``)."""

from .basis_sharing import BasisSharingCallback
from .golden import GoldenMaskCallback
from .pruning import PruningCallback
from .sensitivity import SensitivityCallback
from .task_vector import TaskVectorPruneCallback

__all__ = [
    "BasisSharingCallback",
    "GoldenMaskCallback",
    "PruningCallback",
    "SensitivityCallback",
    "TaskVectorPruneCallback",
]
