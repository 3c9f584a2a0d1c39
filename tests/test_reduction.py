"""Ordered sums: the same bits however the terms are split into contiguous ranges."""

from __future__ import annotations

import pytest
import torch

from hf_sparse.reduction import OrderedSum, combine, dyadic_block


def _terms(count: int) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(count)
    # wide range of magnitudes, so the order of additions shows in the last bits
    return [torch.randn(64, generator=generator) * 10 ** (i % 7) for i in range(count)]


def _split_sum(terms: list[torch.Tensor], step: int, cuts: list[int]) -> torch.Tensor:
    """Terms at positions 0, step, 2*step, ...; each range [cut_i, cut_i+1) on its own 'rank'."""
    bounds = [0, *cuts, len(terms)]
    nodes = []
    for lo, hi in zip(bounds[:-1], bounds[1:], strict=True):
        part = OrderedSum(lowest=lo * step)
        for index in range(lo, hi):
            part.add(index * step, terms[index].clone())
        nodes.extend(part.nodes)
    return combine(nodes)


@pytest.mark.parametrize("count", [1, 2, 5, 13, 32])
@pytest.mark.parametrize("step", [1, 4])
def test_any_contiguous_split_gives_the_same_bits(count, step):
    terms = _terms(count)
    whole = _split_sum(terms, step, [])
    torch.testing.assert_close(whole, torch.stack(terms).sum(0), rtol=1e-5, atol=1e-3)
    for cuts in ([count // 2], [count // 3, 2 * count // 3], list(range(1, count))):
        cuts = sorted({c for c in cuts if 0 < c < count})
        assert torch.equal(_split_sum(terms, step, cuts), whole), cuts


def test_plain_running_sums_do_differ_between_splits():
    """The problem the tree solves: running sums per range, then a sum of the ranges."""
    terms = _terms(32)
    one = torch.zeros(64)
    for term in terms:
        one += term
    two = sum(terms[:16], torch.zeros(64)) + sum(terms[16:], torch.zeros(64))
    assert not torch.equal(one, two)


def test_a_rank_keeps_few_partial_sums():
    part = OrderedSum(lowest=0)
    for index in range(1000):
        part.add(index, torch.ones(1))
    assert len(part.nodes) <= 11 and float(combine(part.nodes)) == 1000
    with pytest.raises(ValueError, match="must not decrease"):
        part.add(5, torch.ones(1))


def test_terms_at_one_position_accumulate():
    part = OrderedSum()
    part.add(3, torch.tensor([1.0]))
    part.add(3, torch.tensor([2.0]))
    assert len(part.nodes) == 1 and float(part.total()) == 3.0
    assert dyadic_block(4, 7) == (4, 4) and dyadic_block(3, 4) == (0, 8)
