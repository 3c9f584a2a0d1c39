"""top_k: exact counts per scope against a sort-based reference; layouts from models."""

from __future__ import annotations

import pytest
import torch

from hf_sparse.masks import TensorLayout, count_for, top_k
from hf_sparse.models import parameter_layouts


def distinct_scores(*shapes: tuple[int, ...], seed: int = 0) -> dict[str, torch.Tensor]:
    """Scores that are a random permutation, so the top-k set is unique."""
    total = sum(torch.Size(s).numel() for s in shapes)
    values = torch.randperm(total, generator=torch.Generator().manual_seed(seed)).float()
    scores, start = {}, 0
    for i, shape in enumerate(shapes):
        n = torch.Size(shape).numel()
        scores[f"t{i}"] = values[start : start + n].reshape(shape)
        start += n
    return scores


def reference_mask(values: torch.Tensor, k: int) -> torch.Tensor:
    order = values.reshape(-1).argsort(descending=True)
    mask = torch.zeros(values.numel(), dtype=torch.bool)
    mask[order[:k]] = True
    return mask.reshape(values.shape)


def test_global_scope_keeps_the_largest_overall():
    scores = distinct_scores((8, 6), (5,), (4, 3))
    masks = top_k(scores, 10.0, "global")
    flat = torch.cat([s.reshape(-1) for s in scores.values()])
    k = count_for(10.0, flat.numel())
    threshold = flat.sort(descending=True).values[k - 1]
    assert masks.count() == k
    for name, s in scores.items():
        assert torch.equal(masks[name], s >= threshold)


def test_tensor_scope_keeps_percent_of_each():
    scores = distinct_scores((8, 6), (5, 4))
    masks = top_k(scores, 25.0, "tensor")
    for name, s in scores.items():
        assert torch.equal(masks[name], reference_mask(s, count_for(25.0, s.numel())))


def test_row_scope_respects_row_axis():
    scores = distinct_scores((4, 10), (10, 4))
    layout = {"t0": TensorLayout(row_axis=0), "t1": TensorLayout(row_axis=1)}
    masks = top_k(scores, 30.0, "row", layout)
    assert masks["t0"].sum(1).tolist() == [3] * 4
    assert masks["t1"].sum(0).tolist() == [3] * 4
    for r in range(4):
        assert torch.equal(masks["t0"][r], reference_mask(scores["t0"][r], 3))
        assert torch.equal(masks["t1"][:, r], reference_mask(scores["t1"][:, r], 3))


def test_head_scope_ranks_inside_each_head():
    scores = distinct_scores((8, 6), (6, 8))
    layout = {
        "t0": TensorLayout(head_size=2, head_axis=0),  # 4 heads of 2 rows
        "t1": TensorLayout(head_size=4, head_axis=1),  # 2 heads of 4 columns
    }
    masks = top_k(scores, 50.0, "head", layout)
    for h in range(4):
        part = scores["t0"][2 * h : 2 * h + 2]
        assert torch.equal(masks["t0"][2 * h : 2 * h + 2], reference_mask(part, 6))
    for h in range(2):
        part = scores["t1"][:, 4 * h : 4 * h + 4]
        assert torch.equal(masks["t1"][:, 4 * h : 4 * h + 4], reference_mask(part, 12))


def test_bad_input():
    scores = distinct_scores((4, 4))
    for bad in (0, -1, 100.5, "x"):
        with pytest.raises(ValueError, match=r"\(0, 100\]"):
            top_k(scores, bad)
    with pytest.raises(ValueError, match="valid scopes"):
        top_k(scores, 5, "layer")
    with pytest.raises(ValueError, match="NaN"):
        top_k({"x": torch.tensor([1.0, float("nan")])}, 50)
    with pytest.raises(ValueError, match="empty"):
        top_k({}, 5)


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gpt_neox", "opt"])
def test_parameter_layouts_give_heads_for_attention(tiny_model, arch):
    model = tiny_model(arch)
    layouts = parameter_layouts(model)
    params = dict(model.named_parameters())
    assert set(layouts) == set(params)
    attention = [n for n, lay in layouts.items() if lay.head_size is not None]
    assert len(attention) == 2 * 4 if arch in ("llama", "opt") else 2 * 2
    scores = {n: torch.rand(p.shape) for n, p in params.items()}
    masks = top_k(scores, 25.0, "head", layouts)
    for name in attention:
        lay = layouts[name]
        per_head = masks[name].movedim(lay.head_axis, 0)
        per_head = per_head.reshape(-1, lay.head_size * per_head[0].numel()).sum(1)
        assert len(set(per_head.tolist())) == 1  # every head keeps the same count
