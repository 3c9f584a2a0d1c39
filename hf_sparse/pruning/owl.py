"""Outlier-weighed layerwise sparsity (OWL) and exact sparsity budgets.

Yin et al., "Outlier Weighed Layerwise Sparsity (OWL): A Missing Secret Sauce for Pruning LLMs
to High Sparsity", ICML 2024. A decoder block whose Wanda scores ``|W_ij| * ||X_j||`` hold a
larger share of outliers (scores above ``M`` times the block's mean score) keeps more weights:

    D_b   = share of outliers among all scores of block b's target linears
    s_b   = S - 2 lambda (x_b - mean_w(x)),   x_b = (D_b - min D) / (max D - min D)

so the block sparsities span a band of width ``2 lambda`` and their parameter-weighted mean is
the target ``S`` (the paper and its reference code use the plain mean; blocks of one model
usually have equal sizes, where the two agree). As in the paper, the outlier shares are measured
on the dense model's activations, in one forward pass before any block is pruned.

Sparsity budgets are then made exact in counts of weights: the model prunes
``round(S * N)`` of its ``N`` target weights, split into whole numbers per block and per layer
by largest remainders (``integer_budgets``), so the measured overall sparsity equals the target
to one weight, whatever the rounding of each block's share.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from ..calibration import (
    StatsCollector,
    _block_output,
    all_reduce_stats,
    capture_block_inputs,
)
from ..execution import input_device, onloaded, resolve_device, stored_tensor, to_device
from ..importance.core import wanda_scores
from ..models import find_decoder_blocks, weight_matrix

logger = logging.getLogger(__name__)

MAX_BLOCK_SPARSITY = 0.99


def outlier_ratio(scores: list[torch.Tensor], m: float) -> float:
    """Share of the entries of ``scores`` (one block's score matrices) above ``m`` x their mean."""
    flat = torch.cat([s.detach().reshape(-1).to(torch.float64) for s in scores])
    if flat.numel() == 0:
        raise ValueError("outlier_ratio needs at least one score")
    return float((flat > m * flat.mean()).to(torch.float64).mean())


def owl_block_sparsities(
    ratios: list[float],
    sizes: list[int],
    target: float,
    lam: float,
    max_sparsity: float = MAX_BLOCK_SPARSITY,
) -> list[float]:
    """Per-block sparsities from outlier shares (more outliers -> lower sparsity).

    The parameter-weighted mean of the result equals ``target``; blocks pushed outside
    ``[0, max_sparsity]`` are clamped and the excess is spread over the others.
    """
    if len(ratios) != len(sizes) or not ratios:
        raise ValueError("owl_block_sparsities needs one outlier ratio per block size")
    if not 0 <= lam < 1:
        raise ValueError(f"owl_lambda must be in [0, 1), got {lam!r}")
    ratio = torch.tensor(ratios, dtype=torch.float64)
    size = torch.tensor(sizes, dtype=torch.float64)
    spread = float(ratio.max() - ratio.min())
    if spread <= 0 or lam == 0:
        return [float(target)] * len(ratios)
    x = (ratio - ratio.min()) / spread
    shift = 2 * lam * (x - (x * size).sum() / size.sum())
    sparsity = target - shift
    free = torch.ones_like(sparsity, dtype=torch.bool)
    for _ in range(len(ratios)):
        clamped = sparsity.clamp(0.0, max_sparsity)
        excess = float(((sparsity - clamped) * size).sum())  # weights still to place
        sparsity = clamped
        free &= (clamped > 0) & (clamped < max_sparsity)
        if abs(excess) < 1e-12 or not bool(free.any()):
            break
        sparsity[free] += excess / float(size[free].sum())
    return [float(v) for v in sparsity]


def integer_budgets(fractions: list[float], sizes: list[int], total: int) -> list[int]:
    """Whole counts ``k_i <= sizes[i]``, close to ``fractions[i] * sizes[i]``, summing to
    ``total`` (largest-remainder rounding)."""
    if total < 0 or total > sum(sizes):
        raise ValueError(f"cannot place {total} of {sum(sizes)} weights")
    wanted = [f * n for f, n in zip(fractions, sizes, strict=True)]
    counts = [min(math.floor(w), n) for w, n in zip(wanted, sizes, strict=True)]
    order = sorted(range(len(sizes)), key=lambda i: (counts[i] - wanted[i], i))
    missing = total - sum(counts)
    step = 1 if missing > 0 else -1
    while missing:
        moved = False
        for i in order if step > 0 else reversed(order):
            if missing == 0:
                break
            if 0 <= counts[i] + step <= sizes[i]:
                counts[i] += step
                missing -= step
                moved = True
        if not moved:
            raise ValueError("no room left to place the budget")
    return counts


def exact_layer_sparsities(
    block_sparsity: dict[str, float], block_layers: dict[str, dict[str, int]], target: float
) -> dict[str, float]:
    """Per-layer sparsities whose pruned counts (``round(s * numel)``) add up to exactly
    ``round(target * N)`` over all layers, each block keeping its share."""
    blocks = list(block_layers)
    sizes = [sum(block_layers[b].values()) for b in blocks]
    total = round(target * sum(sizes))
    per_block = integer_budgets([block_sparsity[b] for b in blocks], sizes, total)
    result: dict[str, float] = {}
    for block, count, size in zip(blocks, per_block, sizes, strict=True):
        names = list(block_layers[block])
        numels = [block_layers[block][n] for n in names]
        counts = integer_budgets([count / size] * len(names), numels, count)
        result.update({n: c / k for n, c, k in zip(names, counts, numels, strict=True)})
    return result


@dataclass
class OWLPlan:
    """What OWL measured and decided: per block outlier share and sparsity, per layer sparsity."""

    outlier_ratios: dict[str, float]
    block_sparsity: dict[str, float]
    layer_sparsity: dict[str, float]

    def summary(self) -> dict:
        values = list(self.block_sparsity.values())
        return {
            "block_sparsity": {k: round(v, 6) for k, v in self.block_sparsity.items()},
            "outlier_ratio": {k: round(v, 6) for k, v in self.outlier_ratios.items()},
            "min": round(min(values), 6),
            "max": round(max(values), 6),
        }


@torch.no_grad()
def dense_input_sq_norms(
    model: nn.Module,
    calibration: torch.Tensor,
    grouped: dict[str, dict[str, nn.Module]],
    batch_size: int = 8,
    blocks: str | None = None,
    show_progress: bool = True,
    device: str | torch.device | None = None,
) -> dict[str, torch.Tensor]:
    """``sum_t x_j^2`` at every target linear's input, on the dense model, in one forward pass
    block by block (no block is re-run: nothing changes between blocks); each block computes
    on ``device`` (see ``hf_sparse.execution``)."""
    decoder_blocks = find_decoder_blocks(model, blocks)
    compute = resolve_device(device)
    device = input_device(model)
    modules = [block for _, block in decoder_blocks]
    was_training = model.training
    model.eval()
    norms: dict[str, torch.Tensor] = {}
    try:
        batches = [b.to(device) for b in calibration.split(batch_size)]
        captured = capture_block_inputs(model, modules[0], batches, modules[1:])
        hidden = captured.hidden
        bar = tqdm(decoder_blocks, desc="OWL: dense activations", disable=not show_progress)
        for position, (name, block) in enumerate(bar):
            calls = list(
                zip(captured.block_args[position], captured.block_kwargs[position], strict=True)
            )
            linears = grouped.get(name) or {}
            with (
                onloaded(block, compute),
                StatsCollector(linears, need_xtx=False, need_sq_norms=True) as collector,
            ):
                outputs = [
                    block(h.to(compute), *to_device(a, compute), **to_device(k, compute))
                    for h, (a, k) in zip(hidden, calls, strict=True)
                ]
            hidden = [_block_output(output) for output in outputs]
            collector.fill_missing()
            all_reduce_stats(collector.stats)
            norms.update({n: collector.stats[n].sq_norms for n in linears})
    finally:
        model.train(was_training)
    return norms


def plan_owl(
    grouped: dict[str, dict[str, nn.Module]],
    sq_norms: dict[str, torch.Tensor],
    target: float,
    m: float,
    lam: float,
    matrix: Callable[[str, nn.Module], torch.Tensor] | None = None,
) -> OWLPlan:
    """OWL sparsities for the blocks of ``grouped`` from their inputs' ``sq_norms``.

    ``matrix(name, module)`` gives the matrix whose outliers count (default: the weight; a
    merge passes a task vector).
    """
    matrix = matrix or (lambda _name, module: _dense_weight(module))
    ratios: dict[str, float] = {}
    sizes: dict[str, dict[str, int]] = {}
    for block, linears in grouped.items():
        if not linears:
            continue
        scores = [wanda_scores(matrix(n, mod), sq_norms[n]) for n, mod in linears.items()]
        ratios[block] = outlier_ratio(scores, m)
        sizes[block] = {n: s.numel() for n, s in zip(linears, scores, strict=True)}
    names = list(ratios)
    values = owl_block_sparsities(
        [ratios[b] for b in names], [sum(sizes[b].values()) for b in names], target, lam
    )
    block_sparsity = dict(zip(names, values, strict=True))
    layers = exact_layer_sparsities(block_sparsity, sizes, target)
    logger.info(
        "OWL (M=%g, lambda=%g): block sparsity %.3f..%.3f around %.3f; outlier share %.4f..%.4f",
        m, lam, min(values), max(values), target, min(ratios.values()), max(ratios.values()),
    )  # fmt: skip
    return OWLPlan(ratios, block_sparsity, layers)


def _dense_weight(module: nn.Module) -> torch.Tensor:
    """The weight matrix, read from the offload store of an accelerate-offloaded layer."""
    weight = weight_matrix(module)
    return stored_tensor(module) if weight.device.type == "meta" else weight
