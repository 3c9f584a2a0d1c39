"""ParameterMasks: set algebra against plain tensor logic, storage round trips, checks."""

from __future__ import annotations

import pytest
import torch

from hf_sparse.masks import ParameterMasks, load_mask_metadata


def random_masks(seed: int, density: float = 0.3) -> ParameterMasks:
    generator = torch.Generator().manual_seed(seed)
    shapes = {"a.weight": (6, 10), "b.weight": (7,), "c.weight": (3, 4, 5)}
    return ParameterMasks(
        {n: torch.rand(s, generator=generator) < density for n, s in shapes.items()}
    )


def test_set_algebra_matches_tensor_logic():
    a, b = random_masks(0), random_masks(1)
    for name in a:
        assert torch.equal((a & b)[name], a[name] & b[name])
        assert torch.equal((a | b)[name], a[name] | b[name])
        assert torch.equal((a - b)[name], a[name] & ~b[name])
        assert torch.equal((~a)[name], ~a[name])
    inter = sum(int((a[n] & b[n]).sum()) for n in a)
    union = sum(int((a[n] | b[n]).sum()) for n in a)
    assert a.jaccard(b) == pytest.approx(inter / union)
    assert a.jaccard(a) == 1.0
    assert (a - a).count() == 0
    assert (a | ~a).density() == 1.0


def test_counts_and_report():
    masks = random_masks(2)
    assert masks.numel() == 60 + 7 + 60
    assert masks.count() == sum(int(m.sum()) for m in masks.values())
    rows = {r.name: r for r in masks.report()}
    assert rows["b.weight"].packed_bytes == 1
    assert rows["a.weight"].bool_bytes == 60
    assert rows["c.weight"].coo_bytes == int(masks["c.weight"].sum()) * 3 * 8


def test_mismatched_operands_raise():
    a = random_masks(0)
    with pytest.raises(ValueError, match="different parameters"):
        _ = a & a.select(["a.weight"])
    other = ParameterMasks({**a, "a.weight": torch.zeros(10, 6, dtype=torch.bool)})
    with pytest.raises(ValueError, match="a.weight"):
        _ = a | other
    with pytest.raises(ValueError, match="other than 0 and 1"):
        ParameterMasks({"x": torch.tensor([0, 2])})
    with pytest.raises(TypeError, match="bool or integer"):
        ParameterMasks({"x": torch.tensor([0.0, 1.0])})


def test_save_load_round_trip_with_metadata(tmp_path):
    masks = random_masks(3)
    path = masks.save(tmp_path / "m.safetensors", metadata={"metric": "fisher"})
    assert ParameterMasks.load(path) == masks
    assert load_mask_metadata(path) == {"metric": "fisher"}
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp left


def test_sparse_coo_round_trip():
    masks = random_masks(4)
    coo = masks.to_sparse_coo()
    assert all(t.is_sparse and t.indices().dtype == torch.int64 for t in coo.values())
    assert ParameterMasks.from_sparse_coo(coo) == masks
    with pytest.raises(TypeError, match="not a sparse"):
        ParameterMasks.from_sparse_coo({"x": torch.ones(2)})


def test_check_against_and_zero(tiny_model):
    model = tiny_model("llama")
    name = "model.layers.0.mlp.up_proj.weight"
    weight = dict(model.named_parameters())[name]
    mask = torch.zeros_like(weight, dtype=torch.bool)
    mask[0, :3] = True
    masks = ParameterMasks({name: mask})
    before = weight.detach().clone()
    masks.zero_(model)
    assert torch.all(weight[mask] == 0)
    assert torch.equal(weight[~mask], before[~mask])
    with pytest.raises(ValueError, match="does not have"):
        ParameterMasks({"nope.weight": mask}).check_against(model)
    with pytest.raises(ValueError, match="different model"):
        ParameterMasks({name: mask.t()}).check_against(model)


@pytest.mark.parametrize("encoding", ["auto", "bits", "indices"])
def test_encodings_round_trip(tmp_path, encoding):
    generator = torch.Generator().manual_seed(5)
    masks = ParameterMasks(
        {
            "sparse": torch.rand(64, 64, generator=generator) < 0.01,
            "dense": torch.rand(64, 64, generator=generator) < 0.5,
            "empty": torch.zeros(3, dtype=torch.bool),
        }
    )
    path = masks.save(tmp_path / "m.safetensors", encoding=encoding)
    assert ParameterMasks.load(path) == masks


def test_auto_encoding_picks_the_smaller_form(tmp_path):
    generator = torch.Generator().manual_seed(6)
    sparse = ParameterMasks({"w": torch.rand(256, 256, generator=generator) < 0.01})
    sizes = {
        enc: sparse.save(tmp_path / f"{enc}.safetensors", encoding=enc).stat().st_size
        for enc in ("auto", "bits", "indices")
    }
    assert sizes["auto"] == sizes["indices"] < sizes["bits"]
    stored = sparse.report()[0].stored_bytes
    assert stored == 4 * sparse.count()
    with pytest.raises(ValueError, match="encoding must be"):
        sparse.save(tmp_path / "x.safetensors", encoding="zip")
