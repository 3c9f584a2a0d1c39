"""Trainer callbacks (packaged as ``hf_sparse.callbacks``)."""

from .golden import GoldenMaskCallback
from .pruning import PruningCallback

__all__ = ["GoldenMaskCallback", "PruningCallback"]
