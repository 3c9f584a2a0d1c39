"""How stable a top-k set is: Jaccard overlap of sets and Spearman rank correlation of scores,
between seeds, input subsets or checkpoints, as matrices."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from ..masks import ParameterMasks
from ..masks.ranking import flatten


def jaccard_matrix(masks: Sequence[ParameterMasks]) -> torch.Tensor:
    """``[n, n]`` Jaccard overlaps ``|A & B| / |A | B|`` of every pair of top-k sets."""
    flats = [flatten(dict(m.items())) for m in masks]
    n = len(flats)
    matrix = torch.ones(n, n, dtype=torch.float64)
    for i in range(n):
        for j in range(i + 1, n):
            union = int((flats[i] | flats[j]).sum())
            value = int((flats[i] & flats[j]).sum()) / union if union else 1.0
            matrix[i, j] = matrix[j, i] = value
    return matrix


def _ranks(values: torch.Tensor) -> torch.Tensor:
    """Average ranks (ties share the mean of their positions), as float64."""
    order = values.argsort()
    sorted_values = values[order]
    ranks = torch.empty(values.numel(), dtype=torch.float64)
    ranks[order] = torch.arange(values.numel(), dtype=torch.float64)
    _, inverse, counts = torch.unique_consecutive(
        sorted_values, return_inverse=True, return_counts=True
    )
    if int(counts.max()) > 1:  # ties: give each group its mean rank
        starts = torch.cumsum(counts, 0) - counts
        mean_rank = starts.double() + (counts.double() - 1) / 2
        ranks[order] = mean_rank[inverse]
    return ranks


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    """Spearman rank correlation of two equally long vectors (ties get average ranks)."""
    if a.shape != b.shape:
        raise ValueError(f"score vectors differ in shape: {tuple(a.shape)} vs {tuple(b.shape)}")
    ra, rb = _ranks(a.reshape(-1).float()), _ranks(b.reshape(-1).float())
    ra, rb = ra - ra.mean(), rb - rb.mean()
    denominator = float(ra.norm() * rb.norm())
    return float((ra * rb).sum()) / denominator if denominator > 0 else 1.0


def spearman_matrix(
    scores: Sequence[Mapping[str, torch.Tensor]], max_entries: int = 2_000_000, seed: int = 0
) -> torch.Tensor:
    """``[n, n]`` Spearman correlations of score sets over the same parameters, on one common
    seeded random subset of ``max_entries`` entries when there are more (ranking 100M entries
    per pair would dominate a study's time; the subset's estimate has error ~1/sqrt(size))."""
    flats = [flatten(dict(s)) for s in scores]
    total = flats[0].numel()
    if any(f.numel() != total for f in flats):
        raise ValueError("score sets cover different parameters; compare the same selection")
    if total > max_entries:
        generator = torch.Generator().manual_seed(seed)
        subset = torch.randperm(total, generator=generator)[:max_entries]
        flats = [f[subset] for f in flats]
    n = len(flats)
    matrix = torch.ones(n, n, dtype=torch.float64)
    for i in range(n):
        for j in range(i + 1, n):
            matrix[i, j] = matrix[j, i] = spearman(flats[i], flats[j])
    return matrix
