"""Trainer callbacks (packaged as ``hf_sparse.callbacks``)."""

from .golden import GoldenMaskCallback
from .pruning import PruningCallback
from .task_vector import TaskVectorPruneCallback

__all__ = ["GoldenMaskCallback", "PruningCallback", "TaskVectorPruneCallback"]
