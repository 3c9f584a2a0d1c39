"""Merge rules over task vectors, as one general rule with three stages (mergekit's view of
TIES / DARE as parameterisations of one method):

1. sparsify each task vector: keep all (task arithmetic), the largest |entries| (magnitude,
   TIES: "TIES-Merging", Yadav et al. 2023) or a random subset rescaled by 1/density (DARE:
   "Language Models are Super Mario", Yu et al. 2024);
2. elect a sign per entry (TIES variants, on the unweighted task vectors);
3. weight each task vector and combine: sum, or average the entries that agree with the
   elected sign (TIES' disjoint mean).

Every function takes and returns plain tensors; the results equal ``peft.utils.merge_utils``
on the same tensors (and, for DARE, the same random stream).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

SIGN_METHODS = ("total", "frequency")


def check_density(density: float) -> float:
    if not isinstance(density, int | float) or not 0.0 < float(density) <= 1.0:
        raise ValueError(f"density must be in (0, 1] (the fraction kept), got {density!r}")
    return float(density)


def trim_magnitude(task_vector: torch.Tensor, density: float) -> torch.Tensor:
    """Keep the ``int(density * n)`` entries of largest magnitude, zero the rest."""
    density = check_density(density)
    if density == 1.0:
        return task_vector
    keep = int(density * task_vector.numel())
    flat = task_vector.reshape(-1)
    kept = torch.zeros_like(flat)
    index = flat.abs().topk(keep).indices
    kept[index] = flat[index]
    return kept.reshape(task_vector.shape)


def drop_random(
    task_vector: torch.Tensor,
    density: float,
    rescale: bool = True,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Keep each entry with probability ``density`` (Bernoulli), divided by ``density`` when
    ``rescale`` so the expected task vector is unchanged."""
    density = check_density(density)
    if density == 1.0:
        return task_vector
    keep = torch.bernoulli(torch.full_like(task_vector, density), generator=generator)
    dropped = task_vector * keep
    return dropped / density if rescale else dropped


def agreeing_signs(stacked: torch.Tensor, method: str = "total") -> torch.Tensor:
    """Bool mask ``[tasks, ...]`` of entries whose sign matches the elected sign.

    ``total``: the sign of the sum of the entries; ``frequency``: the sign most entries have.
    Ties (a zero sum) elect ``+``.
    """
    if method not in SIGN_METHODS:
        raise ValueError(f"sign method must be one of {list(SIGN_METHODS)}, got {method!r}")
    signs = stacked.sign()
    votes = stacked.sum(0) if method == "total" else signs.sum(0)
    elected = torch.where(votes >= 0, 1.0, -1.0).to(stacked.dtype)
    return signs == elected


def _scale(stacked: torch.Tensor, weights: Sequence[float]) -> torch.Tensor:
    scale = torch.as_tensor(weights, dtype=stacked.dtype, device=stacked.device)
    return stacked * scale.reshape(-1, *([1] * (stacked.ndim - 1)))


def _sum(stacked: torch.Tensor, weights: Sequence[float], sign_method: str) -> torch.Tensor:
    return _scale(stacked, weights).sum(0)


def _disjoint_mean(stacked: torch.Tensor, weights: Sequence[float], sign_method: str):
    # Signs are elected on the unweighted task vectors, as PEFT does (mergekit elects on the
    # weighted ones; the two agree when all weights are equal).
    agree = agreeing_signs(stacked, sign_method)
    return (_scale(stacked, weights) * agree).sum(0) / agree.sum(0).clamp(min=1)


@dataclass(frozen=True)
class MergeRule:
    sparsify: str  # "none", "magnitude" or "random"
    combine: Callable[[torch.Tensor, Sequence[float], str], torch.Tensor]


MERGE_METHODS: dict[str, MergeRule] = {
    "task_arithmetic": MergeRule("none", _sum),
    "magnitude_prune": MergeRule("magnitude", _sum),
    "ties": MergeRule("magnitude", _disjoint_mean),
    "dare_linear": MergeRule("random", _sum),
    "dare_ties": MergeRule("random", _disjoint_mean),
}


def merge_task_vectors(
    task_vectors: Sequence[torch.Tensor],
    weights: Sequence[float],
    method: str = "ties",
    density: float = 1.0,
    sign_method: str = "total",
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """One merged task vector from several (same shape), by ``method`` (see ``MERGE_METHODS``).

    Add the result to the base weight to get the merged weight.
    """
    if method not in MERGE_METHODS:
        raise ValueError(f"unknown merge method {method!r}; valid: {sorted(MERGE_METHODS)}")
    if not task_vectors:
        raise ValueError("no task vectors to merge")
    if len(weights) != len(task_vectors):
        raise ValueError(
            f"{len(weights)} weights for {len(task_vectors)} task vectors: give one weight each"
        )
    shapes = {tuple(t.shape) for t in task_vectors}
    if len(shapes) != 1:
        raise ValueError(f"task vectors must share one shape, got {sorted(shapes)}")
    if sign_method not in SIGN_METHODS:
        raise ValueError(f"sign method must be one of {list(SIGN_METHODS)}, got {sign_method!r}")
    density = check_density(density)
    rule = MERGE_METHODS[method]
    if rule.sparsify == "magnitude":
        task_vectors = [trim_magnitude(t, density) for t in task_vectors]
    elif rule.sparsify == "random":
        task_vectors = [drop_random(t, density, True, generator) for t in task_vectors]
    return rule.combine(torch.stack(list(task_vectors)), weights, sign_method)
