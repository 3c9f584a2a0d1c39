"""OWL for the task-vector pruning of merges (``MergeConfig(sparsity_profile="owl")``).

Yin et al., "Outlier Weighed Layerwise Sparsity (OWL)", ICML 2024, applied to each task vector:
a block whose scores ``|tau_ij| * ||X_j||`` hold more outliers (above ``owl_m`` x the block's
mean) keeps more of its task vector; ``X`` = the base model's activations on all calibration
data, measured in one pass before any block is merged. The maths is ``hf_sparse.pruning.owl``.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from ..models import weight_matrix
from ..pruning.owl import dense_input_sq_norms, plan_owl
from .config import MergeConfig


def owl_densities(
    model: nn.Module,
    tasks: list,
    config: MergeConfig,
    streams: list[torch.Tensor],
    by_block: dict[str, dict[str, nn.Module]],
    batch_size: int,
    show_progress: bool,
) -> list[dict[str, float]] | None:
    """OWL for task vectors: per task, per-layer sparsities from the outlier shares of
    ``|tau| * ||X||`` per block, ``X`` = the base model's activations on all calibration data."""
    if config.sparsity_profile != "owl":
        return None
    norms: dict[str, torch.Tensor] = {}
    for stream in streams:
        found = dense_input_sq_norms(model, stream, by_block, batch_size, config.blocks,
                                     show_progress)  # fmt: skip
        for name, value in found.items():
            norms[name] = norms[name] + value if name in norms else value
    plans = []
    for task in tasks:

        def vector(name: str, module: nn.Module, task=task) -> torch.Tensor:
            delta = task.vector.get(f"{name}.weight")
            if delta is None:  # this task did not change the layer
                return torch.zeros(weight_matrix(module).shape)
            return delta.t() if isinstance(module, Conv1D) else delta

        plan = plan_owl(by_block, norms, 1.0 - task.density, config.owl_m, config.owl_lambda,
                        vector)  # fmt: skip
        plans.append(plan.layer_sparsity)
    return plans
