"""Trainer callbacks (packaged as ``hf_sparse.callbacks``)."""

from .pruning import PruningCallback

__all__ = ["PruningCallback"]
