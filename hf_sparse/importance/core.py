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
    dtype = torch.promote_types(torch.float32, input_sq_norms.dtype)  # fp32, or fp64 if given
    return weight.detach().abs().to(dtype) * input_sq_norms.to(dtype).sqrt().unsqueeze(0)
