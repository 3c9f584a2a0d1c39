"""Top-k masks from per-parameter scores, ranked globally, per tensor, per row or per head."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch

from .masks import ParameterMasks


@dataclass(frozen=True)
class TensorLayout:
    """How to rank inside one tensor (``hf_sparse.models.parameter_layouts`` builds these)."""

    row_axis: int | None = 0  # axis indexing output rows (GPT-2 Conv1D: 1); None for vectors
    head_size: int | None = None  # width of one attention head along ``head_axis``
    head_axis: int | None = None  # axis that indexes heads (q/k/v: rows, o: columns)


def check_percent(percent: float, name: str = "percent") -> float:
    """``percent`` as a float in (0, 100], else a ValueError naming ``name``."""
    try:
        value = float(percent)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a number in (0, 100], got {percent!r}") from None
    if not 0.0 < value <= 100.0:
        raise ValueError(f"{name} must be in (0, 100] (a percentage, 5 means 5%), got {percent}")
    return value


def count_for(percent: float, numel: int) -> int:
    """How many of ``numel`` entries ``percent`` keeps (rounded to the nearest integer)."""
    return min(numel, int(round(percent / 100.0 * numel)))


def _topk_rows(scores: torch.Tensor, percent: float) -> torch.Tensor:
    """Bool mask keeping the top ``percent`` of each row of a 2-D score matrix."""
    k = count_for(percent, scores.shape[1])
    mask = torch.zeros_like(scores, dtype=torch.bool)
    if k > 0:
        mask.scatter_(1, scores.topk(k, dim=1, sorted=False).indices, True)
    return mask


def _rank_along(scores: torch.Tensor, axis: int, group: int, percent: float) -> torch.Tensor:
    """Top ``percent`` inside each slab of ``group`` consecutive indices along ``axis``."""
    moved = scores.movedim(axis, 0)
    if moved.shape[0] % group:
        raise ValueError(f"axis {axis} of size {moved.shape[0]} is not a multiple of {group}")
    mask = _topk_rows(moved.reshape(moved.shape[0] // group, -1), percent)
    return mask.reshape(moved.shape).movedim(0, axis)


def _rank_tensor(scores: torch.Tensor, percent: float, _layout: TensorLayout) -> torch.Tensor:
    return _topk_rows(scores.reshape(1, -1), percent).reshape(scores.shape)


def _rank_rows(scores: torch.Tensor, percent: float, layout: TensorLayout) -> torch.Tensor:
    if layout.row_axis is None or scores.ndim < 2:
        return _rank_tensor(scores, percent, layout)
    return _rank_along(scores, layout.row_axis, 1, percent)


def _rank_heads(scores: torch.Tensor, percent: float, layout: TensorLayout) -> torch.Tensor:
    if layout.head_size is None or layout.head_axis is None:
        return _rank_tensor(scores, percent, layout)
    return _rank_along(scores, layout.head_axis, layout.head_size, percent)


_PER_TENSOR_RANKERS: dict[str, Callable[[torch.Tensor, float, TensorLayout], torch.Tensor]] = {
    "tensor": _rank_tensor,
    "row": _rank_rows,
    "head": _rank_heads,
}
RANKING_SCOPES = ("global", *_PER_TENSOR_RANKERS)


def flatten(tensors: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """All tensors as one flat vector, in the mapping's order (``unflatten`` undoes it)."""
    return torch.cat([t.reshape(-1) for t in tensors.values()])


def unflatten(flat: torch.Tensor, like: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Split a flat vector back into tensors shaped and named like ``like``."""
    parts, start = {}, 0
    for name, tensor in like.items():
        parts[name] = flat[start : start + tensor.numel()].reshape(tensor.shape)
        start += tensor.numel()
    return parts


def top_count(flat: torch.Tensor, count: int) -> torch.Tensor:
    """Bool vector keeping the ``count`` largest entries of ``flat``."""
    chosen = torch.zeros(flat.numel(), dtype=torch.bool)
    if count > 0:
        chosen[flat.topk(count, sorted=False).indices] = True
    return chosen


def _global_top_k(scores: Mapping[str, torch.Tensor], percent: float) -> dict[str, torch.Tensor]:
    flat = flatten(scores)
    return unflatten(top_count(flat, count_for(percent, flat.numel())), scores)


def top_k(
    scores: Mapping[str, torch.Tensor],
    percent: float,
    scope: str = "global",
    layout: Mapping[str, TensorLayout] | None = None,
) -> ParameterMasks:
    """Masks of the highest-scoring ``percent`` % of entries.

    ``scope``: ``global`` ranks all tensors together; ``tensor`` keeps ``percent`` of each
    tensor; ``row`` of each output row; ``head`` of each attention head's slice (tensors that
    are not attention projections fall back to ``tensor``). ``layout`` gives each tensor's
    row and head axes (default: rows along axis 0, no heads); build it with
    ``hf_sparse.models.parameter_layouts(model)``. Each ranked group keeps exactly
    ``round(percent / 100 * size)`` entries; ties are broken arbitrarily.
    """
    percent = check_percent(percent)
    if scope not in RANKING_SCOPES:
        raise ValueError(f"unknown ranking scope {scope!r}; valid scopes: {list(RANKING_SCOPES)}")
    if not scores:
        raise ValueError("no scores to rank: the score dict is empty")
    prepared = {}
    for name, score in scores.items():
        score = score.detach().float().cpu()
        if torch.isnan(score).any():
            raise ValueError(f"scores of {name!r} contain NaN; check the metric's inputs")
        prepared[name] = score
    if scope == "global":
        return ParameterMasks(_global_top_k(prepared, percent))
    layout = layout or {}
    ranker = _PER_TENSOR_RANKERS[scope]
    return ParameterMasks(
        {name: ranker(s, percent, layout.get(name, TensorLayout())) for name, s in prepared.items()}
    )
