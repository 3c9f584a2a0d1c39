"""Combining per-rank results of the golden and reverse searches across ranks.

Golden masks and the reverse search score one sample at a time, so each rank scores its own
samples (``per_rank_scores`` in ``metrics.py`` turns the metrics' all-reduce off) and the
per-rank results are combined here: masks by intersection, worst positions by maximum, sums
by sum. Every rank then holds the result of all samples of all ranks, and makes the same
decisions. Tensors travel on ``device`` (NCCL reduces GPU tensors only) and come back to the
CPU. Nothing happens when ``torch.distributed`` is not initialised.
"""

from __future__ import annotations

import torch

from ..calibration import distributed_world
from ..masks import ParameterMasks


def is_distributed() -> bool:
    return distributed_world()[1] > 1


def all_reduce_(
    tensors: dict[str, torch.Tensor], op: torch.distributed.ReduceOp, device: torch.device
) -> None:
    """Reduce every tensor of ``tensors`` across ranks in place (same name order everywhere)."""
    if not is_distributed():
        return
    for name in sorted(tensors):
        tensor = tensors[name]
        moved = tensor.to(device)
        torch.distributed.all_reduce(moved, op=op)
        tensor.copy_(moved)


def sum_across_ranks(value: float, device: torch.device) -> float:
    if not is_distributed():
        return value
    total = torch.tensor([value], dtype=torch.float64, device=device)
    torch.distributed.all_reduce(total)
    return float(total.item())


def intersect_across_ranks(masks: ParameterMasks, device: torch.device) -> ParameterMasks:
    """Entries kept on every rank (each rank's masks being the intersection of its samples)."""
    if not is_distributed():
        return masks
    flags = {name: mask.to(torch.uint8) for name, mask in masks.items()}
    all_reduce_(flags, torch.distributed.ReduceOp.MIN, device)
    return ParameterMasks({name: flag.bool() for name, flag in flags.items()})
