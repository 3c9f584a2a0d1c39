"""Trainer callbacks (packaged as ``hf_sparse.callbacks``)."""

from .golden import GoldenMaskCallback
from .pruning import PruningCallback
from .sensitivity import SensitivityCallback
from .task_vector import TaskVectorPruneCallback

__all__ = [
    "GoldenMaskCallback",
    "PruningCallback",
    "SensitivityCallback",
    "TaskVectorPruneCallback",
]
