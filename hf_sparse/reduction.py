"""Sums whose bits do not depend on how the terms were split over processes.

Floating-point addition is not associative, so ``(a + b) + (c + d)`` (two ranks, then an
all-reduce) and ``((a + b) + c) + d`` (one process) differ in the last bits. For SparseGPT that
is enough to flip near-tied mask choices in the first block and, through the next blocks'
inputs, more and more of them with depth. ``OrderedSum`` removes the dependence: every term
carries its position in the whole calibration set (the first window of its batch), and terms
are combined in one fixed binary tree over those positions, the same tree whichever ranks held
them. Each rank merges the subtrees that lie wholly inside its own range as terms arrive (so it
keeps only O(log n) partial sums), and the partial sums of all ranks are combined at the end
in the same tree on every rank.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class _Node:
    """The sum of the terms whose positions lie in ``[first, last]`` (a subtree of the tree)."""

    first: int
    last: int
    value: torch.Tensor


def dyadic_block(first: int, last: int) -> tuple[int, int]:
    """``(start, size)`` of the smallest block ``[k * 2^j, (k + 1) * 2^j)`` holding both."""
    level = (first ^ last).bit_length()
    return (first >> level) << level, 1 << level


class OrderedSum:
    """A running sum of same-shaped tensors, each added at a non-decreasing integer position.

    ``lowest`` is the lowest position this rank can see (its first window): subtrees reaching
    below it may hold another rank's terms, so they are left for ``total``. Terms at one
    position accumulate in arrival order.
    """

    def __init__(self, lowest: int = 0) -> None:
        self.lowest = lowest
        self.nodes: list[_Node] = []

    def add(self, position: int, value: torch.Tensor) -> None:
        if position < self.lowest or (self.nodes and position < self.nodes[-1].last):
            raise ValueError(
                f"position {position} arrives after {self.nodes[-1].last if self.nodes else None}"
                f" (lowest {self.lowest}): positions must not decrease"
            )
        top = self.nodes[-1] if self.nodes else None
        if top is not None and top.first == top.last == position:
            top.value.add_(value)
            return
        self._merge_closed(position)
        self.nodes.append(_Node(position, position, value))

    def _merge_closed(self, position: int) -> None:
        """Merge the top two subtrees while their common block can receive no more terms."""
        while len(self.nodes) >= 2:
            left, right = self.nodes[-2], self.nodes[-1]
            start, size = dyadic_block(left.first, right.last)
            if position < start + size or start < self.lowest:
                return
            left.value.add_(right.value)
            left.last = right.last
            self.nodes.pop()

    def total(self) -> torch.Tensor | None:
        """The sum over every rank (a collective call under ``torch.distributed``), or None
        when no rank added anything."""
        nodes = _gather_nodes(self.nodes)
        return combine(nodes) if nodes else None


def combine(nodes: list[_Node]) -> torch.Tensor:
    """The tree's sum of subtrees sorted by position (the split at each block's middle)."""
    if len(nodes) == 1:
        return nodes[0].value
    start, size = dyadic_block(nodes[0].first, nodes[-1].last)
    middle = start + size // 2
    left = [node for node in nodes if node.last < middle]
    right = [node for node in nodes if node.first >= middle]
    if len(left) + len(right) != len(nodes):
        raise RuntimeError("ordered sum: a partial sum straddles its block's middle")
    return combine(left) + combine(right)


def _gather_nodes(nodes: list[_Node]) -> list[_Node]:
    """Every rank's partial sums, in rank order (each rank holds a later range of positions)."""
    distributed = torch.distributed
    if not (distributed.is_available() and distributed.is_initialized()):
        return list(nodes)
    if distributed.get_world_size() == 1:
        return list(nodes)
    spans = [(node.first, node.last) for node in nodes]
    template = nodes[0].value if nodes else None
    meta = (spans, None if template is None else (tuple(template.shape), str(template.dtype)))
    everyone: list = [None] * distributed.get_world_size()
    distributed.all_gather_object(everyone, meta)
    shape_dtype = next((m[1] for m in everyone if m[1] is not None), None)
    if shape_dtype is None:
        return []
    shape, dtype_name = shape_dtype
    dtype = getattr(torch, dtype_name.removeprefix("torch."))
    device = _collective_device(template)
    home = device if template is None else template.device
    gathered: list[_Node] = []
    rank = distributed.get_rank()
    for source, (source_spans, _) in enumerate(everyone):
        for index, (first, last) in enumerate(source_spans):
            if source == rank:
                distributed.broadcast(nodes[index].value.to(device), src=source)
                gathered.append(nodes[index])
                continue
            tensor = torch.empty(shape, dtype=dtype, device=device)
            distributed.broadcast(tensor, src=source)
            gathered.append(_Node(first, last, tensor.to(home)))
    order = [node.first for node in gathered]
    if order != sorted(order):
        raise RuntimeError(
            "ordered sum: ranks hold interleaved positions; give each rank a contiguous shard "
            "in rank order (hf_sparse.data.shard_for_rank)"
        )
    return gathered


def _collective_device(template: torch.Tensor | None) -> torch.device:
    """NCCL moves CUDA tensors only; gloo moves CPU ones."""
    backend = torch.distributed.get_backend()
    if backend == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu") if template is None or backend == "gloo" else template.device
