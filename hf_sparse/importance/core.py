"""Importance maths on plain tensors, shared by the importance metrics and the pruners."""

from __future__ import annotations

import torch


def wanda_scores(weight: torch.Tensor, input_sq_norms: torch.Tensor) -> torch.Tensor:
    """Wanda importance ``|W_ij| * ||X_j||_2`` from the summed squares of each input column."""
    if input_sq_norms.shape != (weight.shape[1],):
        raise ValueError(
            f"shape mismatch: input norms have shape {tuple(input_sq_norms.shape)}, "
            f"expected ({weight.shape[1]},) for a weight of shape {tuple(weight.shape)}"
        )
    return weight.detach().abs().float() * input_sq_norms.float().sqrt().unsqueeze(0)
