"""Merge rules over task vectors, as one general rule with three stages (mergekit's view of
TIES / DARE as parameterisations of one method), plus SparseGPT-pruned task vectors:

1. sparsify each task vector: keep all (task arithmetic), the largest |entries| (magnitude,
   TIES: "TIES-Merging", Yadav et al. 2023) or a random subset rescaled by 1/density (DARE:
   "Language Models are Super Mario", Yu et al. 2024) or an OBS solve with the layer-input
   Hessian that keeps ``X tau`` close (SparseGPT, Frantar & Alistarh 2023, on the task vector),
   optionally divided by the density afterwards like DARE ("DARE with error correction":
   SparseGPT chooses and corrects the kept entries, DARE's 1/density restores the scale);
2. elect a sign per entry (TIES variants, on the unweighted task vectors);
3. weight each task vector and combine: sum, or average the entries that agree with the
   elected sign (TIES' disjoint mean).

Every function takes and returns plain tensors; the results equal ``peft.utils.merge_utils``
on the same tensors (and, for DARE, the same random stream).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import torch

from ..pruning.core import obs_prune

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


def _normalised(merged: torch.Tensor, divisor: torch.Tensor) -> torch.Tensor:
    return merged / torch.where(divisor.abs() < 1e-8, torch.ones_like(divisor), divisor)


def _sum(
    stacked: torch.Tensor, weights: Sequence[float], sign_method: str, normalize: bool
) -> torch.Tensor:
    merged = _scale(stacked, weights).sum(0)
    if normalize:  # mergekit's `normalize`: divide by the sum of the weights
        merged = _normalised(merged, torch.as_tensor(float(sum(weights)), dtype=merged.dtype))
    return merged


def _disjoint_mean(
    stacked: torch.Tensor, weights: Sequence[float], sign_method: str, normalize: bool
) -> torch.Tensor:
    """TIES' disjoint merge: the weighted entries that agree with the elected sign, divided by
    how many agree (PEFT) or, with ``normalize``, by the sum of their weights (mergekit)."""
    # Signs are elected on the unweighted task vectors, as PEFT does (mergekit elects on the
    # weighted ones; the two agree when all weights are equal).
    agree = agreeing_signs(stacked, sign_method)
    merged = (_scale(stacked, weights) * agree).sum(0)
    if normalize:
        return _normalised(merged, _scale(agree.to(stacked.dtype), weights).sum(0))
    return merged / agree.sum(0).clamp(min=1)


# Stage 1: sparsifiers. Each takes one task vector and returns the kept (possibly corrected or
# rescaled) task vector of the same shape.


@dataclass(frozen=True)
class ObsOptions:
    """Settings of the OBS (SparseGPT) sparsifier of a task vector."""

    block_size: int = 128  # columns solved together (SparseGPT's lazy batch)
    damp: float = 0.01  # dampening, a fraction of mean(diag H), added before the Cholesky
    rescale: bool = False  # per-row least-squares scale of the kept entries afterwards
    # DARE's rescale (the specification's `rescale`): divide the kept entries by the density
    density_rescale: bool = False


def prune_task_vector_obs(
    task_vector: torch.Tensor,
    hessian: torch.Tensor,
    density: float,
    options: ObsOptions = ObsOptions(),
    hinv_upper: torch.Tensor | None = None,
    row_groups: list[tuple[int, float]] | None = None,
    exact_total: bool = False,
) -> torch.Tensor:
    """SparseGPT applied to a task vector ``[out, in]``: keep ``density`` of its entries, chosen
    by OBS saliency block by block, and correct the kept ones with the inverse of the layer-input
    Hessian ``hessian`` (``X^T X`` up to scale) so that ``X tau_pruned`` stays close to
    ``X tau``. ``row_groups`` stacks several layers that read the same input (their own
    ``(rows, sparsity)`` each). Returns a float32 tensor.

    ``options.rescale`` scales each kept row by its least-squares factor;
    ``options.density_rescale`` divides the result by ``density`` (DARE's rescale: with both
    the least-squares fit is undone, so the config refuses the pair).
    """
    density = check_density(density)
    if task_vector.ndim != 2:
        raise ValueError(
            f"OBS pruning needs a [out, in] matrix, got shape {tuple(task_vector.shape)}; "
            "vectors (biases, norms) are trimmed by magnitude instead"
        )
    pruned, _ = obs_prune(
        task_vector,
        hessian,
        1.0 - density,
        block_size=options.block_size,
        damp=options.damp,
        hinv_upper=hinv_upper,
        row_groups=row_groups,
        exact_total=exact_total,
    )
    if options.rescale:
        pruned = rescale_rows(task_vector, pruned, hessian)
    if options.density_rescale and density < 1.0:
        pruned = pruned / density
    return pruned


def rescale_rows(
    original: torch.Tensor, pruned: torch.Tensor, hessian: torch.Tensor
) -> torch.Tensor:
    """Scale each row of ``pruned`` by the factor that minimises ``||X (original - s pruned)||``
    for that row: ``s = <o, p>_H / <p, p>_H`` (rows that are all zero stay zero)."""
    h = hessian.to(torch.float64)
    o, p = original.to(torch.float64), pruned.to(torch.float64)
    hp = p @ h
    numerator = (o * hp).sum(1)
    denominator = (p * hp).sum(1)
    scale = torch.where(denominator > 0, numerator / denominator.clamp(min=1e-30), 1.0)
    return (p * scale.unsqueeze(1)).to(pruned.dtype)


def reconstruction_error(
    original: torch.Tensor, pruned: torch.Tensor, hessian: torch.Tensor
) -> tuple[float, float]:
    """``(||X (original - pruned)||_F^2, ||X original||_F^2)`` per calibration token, with
    ``hessian = X^T X / tokens``: the output error a pruned task vector adds to the layer."""
    h = hessian.to(torch.float64)
    diff = (original - pruned).to(torch.float64)
    full = original.to(torch.float64)
    return float(((diff @ h) * diff).sum()), float(((full @ h) * full).sum())


SPARSIFIERS = ("none", "magnitude", "random", "obs")


@dataclass(frozen=True)
class MergeRule:
    sparsify: str  # one of SPARSIFIERS
    combine: Callable[[torch.Tensor, Sequence[float], str, bool], torch.Tensor]
    uses_signs: bool
    density_rescale: bool = False  # kept entries divided by the density (DARE's rescale)


MERGE_METHODS: dict[str, MergeRule] = {}


def register_merge_method(
    name: str, sparsify: str, combine: str, density_rescale: bool = False
) -> MergeRule:
    """Add a merge method: a sparsifier (``SPARSIFIERS``) and a combination (``sum`` or
    ``disjoint_mean``, TIES' sign-elected mean). ``density_rescale`` divides what a
    deterministic sparsifier keeps by the density, as DARE does (the random sparsifier always
    does). Returns the rule."""
    if sparsify not in SPARSIFIERS:
        raise ValueError(f"sparsify must be one of {list(SPARSIFIERS)}, got {sparsify!r}")
    combinations = {"sum": _sum, "disjoint_mean": _disjoint_mean}
    if combine not in combinations:
        raise ValueError(f"combine must be one of {sorted(combinations)}, got {combine!r}")
    rule = MergeRule(sparsify, combinations[combine], combine == "disjoint_mean", density_rescale)
    MERGE_METHODS[name] = rule
    return rule


register_merge_method("task_arithmetic", "none", "sum")
register_merge_method("magnitude_prune", "magnitude", "sum")
register_merge_method("ties", "magnitude", "disjoint_mean")
register_merge_method("dare_linear", "random", "sum")
register_merge_method("dare_ties", "random", "disjoint_mean")
register_merge_method("sparsegpt_tv", "obs", "sum")
register_merge_method("sparsegpt_ties", "obs", "disjoint_mean")
# DARE with error correction: SparseGPT selects and corrects the kept entries (instead of a
# random draw), then DARE's 1/density rescale; summed like dare_linear or combined like dare_ties.
register_merge_method("dare_sparsegpt", "obs", "sum", density_rescale=True)
register_merge_method("dare_sparsegpt_ties", "obs", "disjoint_mean", density_rescale=True)


def check_merge_method(method: str) -> MergeRule:
    if method not in MERGE_METHODS:
        raise ValueError(f"unknown merge method {method!r}; valid: {sorted(MERGE_METHODS)}")
    return MERGE_METHODS[method]


def densities_for(density: float | Sequence[float], count: int) -> list[float]:
    """One density per task vector (a single value is shared), each checked."""
    if isinstance(density, int | float):
        return [check_density(density)] * count
    density = list(density)
    if len(density) != count:
        raise ValueError(f"{len(density)} densities for {count} task vectors: give one each")
    return [check_density(d) for d in density]


def sparsify(
    task_vector: torch.Tensor,
    rule: MergeRule,
    density: float,
    hessian: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
    obs: ObsOptions = ObsOptions(),
) -> torch.Tensor:
    """Stage 1 of ``rule`` on one task vector. OBS falls back to magnitude trimming for tensors
    without a Hessian (biases, norms, embeddings), at the same density (and with the same
    1/density rescale when the rule or ``obs.density_rescale`` asks for it)."""
    if rule.sparsify == "none":
        return task_vector
    if rule.sparsify == "random":
        return drop_random(task_vector, density, True, generator)
    by_density = rule.density_rescale or obs.density_rescale
    if rule.sparsify == "obs" and hessian is not None:
        options = replace(obs, density_rescale=by_density)
        return prune_task_vector_obs(task_vector, hessian, density, options).to(task_vector.dtype)
    kept = trim_magnitude(task_vector, density)
    return kept / density if by_density and density < 1.0 else kept


def combine(
    sparse_task_vectors: Sequence[torch.Tensor],
    weights: Sequence[float],
    rule: MergeRule,
    sign_method: str = "total",
    normalize: bool = False,
) -> torch.Tensor:
    """Stages 2 and 3 of ``rule``: elect signs (TIES variants), weight and combine."""
    if sign_method not in SIGN_METHODS:
        raise ValueError(f"sign method must be one of {list(SIGN_METHODS)}, got {sign_method!r}")
    return rule.combine(torch.stack(list(sparse_task_vectors)), weights, sign_method, normalize)


def merge_task_vectors(
    task_vectors: Sequence[torch.Tensor],
    weights: Sequence[float],
    method: str = "ties",
    density: float | Sequence[float] = 1.0,
    sign_method: str = "total",
    generator: torch.Generator | None = None,
    hessians: torch.Tensor | Sequence[torch.Tensor] | None = None,
    normalize: bool = False,
    obs: ObsOptions = ObsOptions(),
) -> torch.Tensor:
    """One merged task vector from several (same shape), by ``method`` (see ``MERGE_METHODS``).

    Add the result to the base weight to get the merged weight. ``density`` is the kept
    fraction, one for all or one per task vector. ``hessians`` (OBS methods): one ``[in, in]``
    layer-input Hessian shared by all task vectors, or one per task vector. ``normalize``
    divides by the summed weights (mergekit's option).
    """
    rule = check_merge_method(method)
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
    densities = densities_for(density, len(task_vectors))
    if isinstance(hessians, torch.Tensor) or hessians is None:
        hessians = [hessians] * len(task_vectors)
    elif len(hessians) != len(task_vectors):
        raise ValueError(f"{len(hessians)} Hessians for {len(task_vectors)} task vectors")
    if rule.sparsify == "obs" and any(h is None for h in hessians):
        raise ValueError(
            f"{method} needs layer-input Hessians: pass hessians= (X^T X of the layer's "
            "calibration inputs), or use a data-free method such as ties"
        )
    sparse = [
        sparsify(t, rule, d, h, generator, obs)
        for t, d, h in zip(task_vectors, densities, hessians, strict=True)
    ]
    return combine(sparse, weights, rule, sign_method, normalize)
