"""Pruning maths on plain tensors: magnitude, Wanda and SparseGPT (OBS with error correction).

Every function takes a ``[rows, cols]`` matrix (a weight in ``[out, in]`` layout, or a task
vector of the same shape) and returns a keep-mask (``True`` = kept) and, for SparseGPT, the
updated matrix. Nothing here knows about models, hooks or configs.

References:
- Frantar & Alistarh, "SparseGPT: Massive Language Models Can Be Accurately Pruned in
  One-Shot", ICML 2023 (blockwise OBS solver, adaptive mask selection, N:M).
- Sun et al., "A Simple and Effective Pruning Approach for Large Language Models" (Wanda),
  ICLR 2024 (score |W| * ||X||, compared per output row).
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass

import torch

from ..importance.core import wanda_scores
from ..linalg import damped_inverse_cholesky

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class NMPattern:
    """At most ``n`` non-zeros in every ``m`` consecutive weights along the input dimension."""

    n: int
    m: int

    @property
    def sparsity(self) -> float:
        return 1.0 - self.n / self.m

    @property
    def pruned_per_group(self) -> int:
        return self.m - self.n

    def __str__(self) -> str:
        return f"{self.n}:{self.m}"


def parse_mask_structure(structure: str | None) -> NMPattern | None:
    """``"unstructured"`` (or None) -> None; ``"2:4"`` -> NMPattern(2, 4)."""
    if structure is None or structure == "unstructured":
        return None
    match = re.fullmatch(r"\s*(\d+)\s*:\s*(\d+)\s*", str(structure))
    if not match:
        raise ValueError(
            f"mask must be 'unstructured' or 'N:M' (e.g. '2:4', '4:8'), got {structure!r}"
        )
    n, m = int(match[1]), int(match[2])
    if not 0 < n < m:
        raise ValueError(f"mask {structure!r}: N:M needs 0 < N < M (N kept of every M)")
    return NMPattern(n, m)


def check_sparsity(sparsity: float, name: str = "sparsity") -> float:
    if not isinstance(sparsity, int | float) or not 0.0 <= float(sparsity) < 1.0:
        raise ValueError(f"{name} must be in [0, 1), got {sparsity!r}")
    return float(sparsity)


def _check_nm_columns(cols: int, pattern: NMPattern) -> None:
    if cols % pattern.m:
        raise ValueError(
            f"N:M mask {pattern} needs the input dimension to be a multiple of {pattern.m}, "
            f"got {cols}"
        )


def keep_mask_from_scores(
    scores: torch.Tensor,
    sparsity: float,
    pattern: NMPattern | None = None,
    per_row: bool = False,
    exact_total: bool = False,
) -> torch.Tensor:
    """Keep the highest-scoring entries.

    Unstructured: prune exactly ``round(sparsity * count)`` lowest scores, over the whole
    matrix or (``per_row``) within each row. N:M: prune the ``m - n`` lowest of each group
    of ``m`` consecutive columns in every row. ``exact_total`` (per row): when
    ``sparsity * cols`` is not whole, rows prune ``floor`` or ``ceil`` of it so that the matrix
    prunes ``round(sparsity * rows * cols)`` in all (OWL's exact budgets).
    """
    rows, cols = scores.shape
    keep = torch.ones(scores.shape, dtype=torch.bool, device=scores.device)
    if pattern is not None:
        _check_nm_columns(cols, pattern)
        groups = scores.reshape(rows, cols // pattern.m, pattern.m)
        drop = torch.topk(groups, pattern.pruned_per_group, dim=-1, largest=False).indices
        keep.view(rows, cols // pattern.m, pattern.m).scatter_(-1, drop, False)
        return keep
    if per_row:
        per_row_count = sparsity * cols
        if exact_total and abs(per_row_count - round(per_row_count)) > 1e-6:
            return _keep_per_row_exact(scores, per_row_count)
        count = round(per_row_count)
        if count:
            drop = torch.topk(scores, count, dim=1, largest=False).indices
            keep.scatter_(1, drop, False)
        return keep
    count = round(sparsity * scores.numel())
    if count:
        drop = torch.topk(scores.flatten(), count, largest=False).indices
        keep.view(-1)[drop] = False
    return keep


def _keep_per_row_exact(scores: torch.Tensor, per_row_count: float) -> torch.Tensor:
    """Per-row pruning when ``sparsity * cols`` is not whole: row ``i`` prunes
    ``round((i + 1) c) - round(i c)`` entries, so the matrix prunes ``round(rows * c)`` in all."""
    rows = scores.shape[0]
    bounds = torch.round(torch.arange(rows + 1, dtype=torch.float64) * per_row_count)
    counts = (bounds[1:] - bounds[:-1]).to(torch.long).to(scores.device)
    ranks = torch.empty_like(scores, dtype=torch.long)
    order = torch.argsort(scores, dim=1, stable=True)
    positions = torch.arange(scores.shape[1], device=scores.device).expand_as(order)
    ranks.scatter_(1, order, positions)
    return ranks >= counts.unsqueeze(1)


def telescoped_sparsity(sparsity: float, rows: int, start: int, end: int) -> float:
    """Sparsity of columns ``[start, end)`` of a ``rows``-row matrix such that the column slices
    prune ``round(sparsity * rows * cols)`` entries in all (each slice's count telescopes)."""
    count = round(sparsity * rows * end) - round(sparsity * rows * start)
    return count / (rows * (end - start))


def magnitude_mask(
    weight: torch.Tensor, sparsity: float, pattern: NMPattern | None = None
) -> torch.Tensor:
    """Keep the largest ``|w|`` over the whole matrix (or per N:M group)."""
    return keep_mask_from_scores(weight.detach().abs().float(), sparsity, pattern)


def wanda_mask(
    weight: torch.Tensor,
    input_sq_norms: torch.Tensor,
    sparsity: float,
    pattern: NMPattern | None = None,
    exact_total: bool = False,
) -> torch.Tensor:
    """Wanda keep-mask: scores compared within each output row (the paper's default)."""
    scores = wanda_scores(weight, input_sq_norms)
    return keep_mask_from_scores(scores, sparsity, pattern, True, exact_total)


def obs_prune(
    target: torch.Tensor,
    hessian: torch.Tensor,
    sparsity: float,
    pattern: NMPattern | None = None,
    block_size: int = 128,
    damp: float = 0.01,
    hinv_upper: torch.Tensor | None = None,
    row_groups: list[tuple[int, float]] | None = None,
    exact_total: bool = False,
    inner_block: int = 32,
    dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor]:
    """SparseGPT: prune ``target`` and correct the remaining entries with the inverse Hessian.

    ``target`` is any ``[rows, cols]`` matrix whose columns are the inputs whose second
    moment is ``hessian`` (``X^T X`` up to scale): a weight, or a task vector ``W_ft - W_base``.
    Columns are processed in blocks of ``block_size``; within a block the mask is chosen by the
    OBS saliency ``w^2 / [H^-1]_jj^2`` (adaptive mask selection) and each pruned weight's error
    is spread over the not-yet-processed columns. Returns ``(pruned matrix, keep mask)``, the
    matrix in ``dtype`` (float32, or float64 when asked), whatever the dtype of ``target``.
    ``hinv_upper`` reuses a factor from ``damped_inverse_cholesky`` for matrices sharing ``H``.
    ``row_groups`` = ``[(row count, sparsity), ...]`` covering the rows: several layers that
    read the same input (q/k/v) stacked into one target, each with its own unstructured mask
    budget. Rows are independent given ``H``, so this equals solving them one by one.
    ``exact_total``: the column blocks' unstructured budgets telescope, so each row group
    prunes exactly ``round(sparsity * rows * cols)`` (OWL's exact budgets).
    ``inner_block``: inside a block, columns are updated one by one only within sub-blocks of
    this width, the rest of the block by one matrix product per sub-block (the same result up
    to float rounding; ``inner_block >= block_size`` = the one-level loop of the paper).
    """
    rows, cols = target.shape
    if row_groups is None:
        row_groups = [(rows, sparsity)]
    if sum(count for count, _ in row_groups) != rows:
        raise ValueError(f"row_groups {row_groups} do not cover the target's {rows} rows")
    if hessian.shape != (cols, cols):
        raise ValueError(
            f"shape mismatch: Hessian is {tuple(hessian.shape)}, expected ({cols}, {cols}) "
            f"for a target of shape {tuple(target.shape)}"
        )
    if pattern is not None:
        _check_nm_columns(cols, pattern)
        if block_size % pattern.m:
            raise ValueError(f"block_size {block_size} must be a multiple of M={pattern.m}")
    w = target.detach().to(dtype).clone()
    dead = torch.diag(hessian) == 0
    w[:, dead] = 0
    hinv = (
        hinv_upper if hinv_upper is not None else damped_inverse_cholesky(hessian.to(dtype), damp)
    )
    hinv = hinv.to(dtype)
    keep = torch.ones(rows, cols, dtype=torch.bool, device=w.device)
    for start in range(0, cols, block_size):
        end = min(start + block_size, cols)
        _obs_prune_block(w, hinv, keep, start, end, row_groups, pattern, exact_total, inner_block)
    return w, keep


def _obs_prune_block(
    w: torch.Tensor,
    hinv: torch.Tensor,
    keep: torch.Tensor,
    start: int,
    end: int,
    row_groups: list[tuple[int, float]],
    pattern: NMPattern | None,
    exact_total: bool = False,
    inner_block: int = 32,
) -> None:
    block = w[:, start:end].clone()
    hinv_block = hinv[start:end, start:end]
    diag = torch.diag(hinv_block)
    errors = torch.zeros_like(block)
    block_keep = keep[:, start:end]
    if pattern is None:
        saliency = block**2 / diag.unsqueeze(0) ** 2
        first = 0
        for count, sparsity in row_groups:
            if sparsity > 0:
                rows = slice(first, first + count)
                share = sparsity
                if exact_total:
                    share = telescoped_sparsity(sparsity, count, start, end)
                block_keep[rows] = keep_mask_from_scores(saliency[rows], share)
            first += count
    width = end - start
    inner = _inner_width(width, pattern, inner_block)
    for first_col in range(0, width, inner):  # lazy updates at two levels (as GPTQ's batches)
        last_col = min(first_col + inner, width)
        for j in range(first_col, last_col):
            if pattern is not None and j % pattern.m == 0:
                saliency = block[:, j : j + pattern.m] ** 2 / diag[j : j + pattern.m] ** 2
                block_keep[:, j : j + pattern.m] = keep_mask_from_scores(saliency, 0.0, pattern)
            column = block[:, j]
            kept = block_keep[:, j]
            error = column * ~kept / diag[j]
            quantised = column * kept
            block[:, j:last_col].addr_(error, hinv_block[j, j:last_col], alpha=-1)
            block[:, j] = quantised
            errors[:, j] = error
        if last_col < width:
            block[:, last_col:].addmm_(
                errors[:, first_col:last_col], hinv_block[first_col:last_col, last_col:], alpha=-1
            )
    w[:, start:end] = block
    w[:, end:] -= errors @ hinv[start:end, end:]


def _inner_width(width: int, pattern: NMPattern | None, target: int = 32) -> int:
    """Columns updated one by one before a matrix update of the rest of the block: a multiple
    of M for N:M masks (whose groups are chosen on fully updated columns)."""
    step = pattern.m if pattern is not None else 1
    return min(width, max(step, target // step * step))
