"""Analysis building blocks: perturbations undo exactly, controls, stability, breakdowns."""

from __future__ import annotations

import pytest
import torch

from hf_sparse.analysis import (
    EffectProbe,
    breakdown,
    component_of,
    jaccard_matrix,
    layer_of,
    perturbed,
    random_entries,
    resolve_count,
    spearman,
    spearman_matrix,
    top_k_entries,
)
from hf_sparse.masks import ParameterMasks
from tests.conftest import build_tiny_model, make_token_windows

NAME = "model.layers.1.mlp.down_proj.weight"


def _mask(model, density=0.1, seed=0):
    weight = dict(model.named_parameters())[NAME]
    generator = torch.Generator().manual_seed(seed)
    return {NAME: torch.rand(weight.shape, generator=generator) < density}


@pytest.mark.parametrize(
    ("kind", "strength"), [("zero", 1.0), ("sign_flip", 1.0), ("scale", 3.0), ("noise", 0.5)]
)
def test_perturbations_change_only_the_chosen_entries_and_undo_exactly(kind, strength):
    model = build_tiny_model("llama")
    masks = _mask(model)
    weight = dict(model.named_parameters())[NAME]
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    original = weight.detach().clone()
    mask = masks[NAME]
    with perturbed(model, masks, kind, strength, seed=1):
        inside = weight.detach()[mask]
        assert torch.equal(weight.detach()[~mask], original[~mask])
        expected = {
            "zero": torch.zeros_like(inside),
            "sign_flip": -original[mask],
            "scale": 3.0 * original[mask],
        }
        if kind in expected:
            torch.testing.assert_close(inside, expected[kind])
        else:
            spread = (inside - original[mask]).std() / original.std()
            assert spread == pytest.approx(0.5, rel=0.25)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


def test_bad_perturbations_are_refused_before_any_change():
    model = build_tiny_model("llama")
    with (
        pytest.raises(ValueError, match="unknown perturbation 'blur'"),
        perturbed(model, _mask(model), "blur"),
    ):
        pass
    missing = {"model.layers.9.nothing.weight": torch.ones(2, 2, dtype=bool)}
    with pytest.raises((KeyError, ValueError), match="nothing"), perturbed(model, missing):
        pass


def test_counts_top_bottom_and_random_controls():
    scores = {"a": torch.arange(10.0), "b": torch.arange(10.0, 16.0).reshape(2, 3)}
    assert resolve_count(3, 16) == 3 and resolve_count(25.0, 16) == 4
    with pytest.raises(ValueError, match="selected parameters hold 16"):
        resolve_count(17, 16)
    top = top_k_entries(scores, 4)
    assert top["b"].sum() == 4 and top["a"].sum() == 0
    bottom = top_k_entries(scores, 2, largest=False)
    assert bottom["a"][:2].all() and bottom.count() == 2
    shapes = {n: s.shape for n, s in scores.items()}
    control = random_entries(shapes, 4, seed=0, exclude=top)
    assert control.count() == 4 and not (control & top).count()
    assert random_entries(shapes, 4, seed=0).count() == 4
    assert not torch.equal(
        random_entries(shapes, 4, seed=0)["a"], random_entries(shapes, 4, seed=1)["a"]
    ) or not torch.equal(
        random_entries(shapes, 4, seed=0)["b"], random_entries(shapes, 4, seed=1)["b"]
    )


def test_jaccard_and_spearman_against_direct_formulas():
    a = ParameterMasks({"x": torch.tensor([1, 1, 0, 0, 1], dtype=torch.bool)})
    b = ParameterMasks({"x": torch.tensor([1, 0, 0, 1, 1], dtype=torch.bool)})
    matrix = jaccard_matrix([a, b, a])
    assert matrix[0, 1] == pytest.approx(2 / 4) and matrix[0, 2] == 1.0
    x = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0])
    assert spearman(x, x**3) == pytest.approx(1.0)
    assert spearman(x, -x) == pytest.approx(-1.0)
    y = torch.tensor([2.0, 1.0, 4.0, 3.0, 5.0])  # d^2 sum = 4 -> 1 - 6*4/(5*24) = 0.8
    assert spearman(x, y) == pytest.approx(0.8)
    ties = torch.tensor([1.0, 1.0, 2.0, 3.0])
    # scipy.stats.spearmanr([1,1,2,3],[1,2,3,4]) = 0.9486832980505138
    assert spearman(ties, torch.tensor([1.0, 2.0, 3.0, 4.0])) == pytest.approx(0.9486833, abs=1e-6)
    generator = torch.Generator().manual_seed(0)
    s1 = {"w": torch.rand(100, 100, generator=generator)}
    s2 = {"w": s1["w"] + 0.01 * torch.rand(100, 100, generator=generator)}
    full = spearman_matrix([s1, s2])
    sub = spearman_matrix([s1, s2], max_entries=2000)
    assert float(full[0, 1]) > 0.99
    assert float(sub[0, 1]) == pytest.approx(float(full[0, 1]), abs=0.01)


def test_breakdown_by_component_and_depth():
    model = build_tiny_model("llama")
    scores = {n: p.detach().abs() for n, p in model.named_parameters()}
    assert component_of("model.layers.3.self_attn.q_proj.weight") == "q"
    assert component_of("model.embed_tokens.weight") == "embeddings"
    assert component_of("model.layers.0.input_layernorm.weight") == "norms"
    assert component_of("transformer.h.0.ln_1.weight") == "norms"
    assert component_of("transformer.wte.weight") == "embeddings"
    assert (
        layer_of("model.layers.12.mlp.up_proj.weight") == 12 and layer_of("lm_head.weight") is None
    )
    top = top_k_entries(scores, 50)
    table = breakdown(scores, top)
    assert sum(v["top"] for v in table["component"].values()) == 50
    assert sum(v["share_of_top"] for v in table["component"].values()) == pytest.approx(1.0)
    assert set(table["layer"]) == {"0", "1"}
    total = sum(p.numel() for p in model.parameters())
    assert sum(v["parameters"] for v in table["component"].values()) == total


def test_effect_probe_baseline_and_perturbed():
    model = build_tiny_model("llama")
    probe = EffectProbe(model, make_token_windows(n=4, length=16))
    assert probe.baseline.kl == pytest.approx(0.0, abs=1e-9)
    assert 1 < probe.baseline.perplexity < 1e4
    with perturbed(model, _mask(model, 0.5), "zero"):
        effect = probe.measure()
    assert effect.kl > 1e-6 and effect.perplexity != probe.baseline.perplexity
    assert probe.measure().kl == pytest.approx(0.0, abs=1e-9)


def test_perturbation_study_top_k_hurts_more_than_its_controls():
    from hf_sparse.analysis.perturbation_study import Target, perturbation_study

    model = build_tiny_model("llama")
    scores = {n: p.detach().abs() for n, p in model.named_parameters() if "layers" in n}
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    windows = make_token_windows(n=4, length=16)
    points = perturbation_study(
        model,
        scores,
        windows,
        ks=[64, 2.0],
        perturbations=[("zero", 1.0), ("scale", 10.0)],
        targets=[Target(), Target(components=("mlp",), layers=(1, 1))],
        control_seeds=2,
        show_progress=False,
    )
    assert len(points) == 2 * 2 * 2
    assert all(len(p.random_runs) == 2 for p in points)
    scaled = [p for p in points if p.kind == "scale"]
    # scaling the largest weights tenfold hurts more than scaling random or the smallest ones
    assert all(p.top["kl"] > p.random_mean["kl"] > p.bottom["kl"] for p in scaled)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    with pytest.raises(ValueError, match="components present in this architecture"):
        perturbation_study(model, scores, windows, [4], targets=[Target(components=("fc1",))])
    with pytest.raises(ValueError, match="unknown component 'ffn'"):
        perturbation_study(model, scores, windows, [4], targets=[Target(components=("ffn",))])
    with pytest.raises(ValueError, match="choose 1 <= k"):
        perturbation_study(model, scores, windows, [10**9])


@pytest.mark.parametrize("method", ["kmeans", "dbscan"])
def test_clustering_separates_distinct_profiles(method):
    from hf_sparse.analysis.clustering import cluster_profiles, profiles, summarise_clusters

    generator = torch.Generator().manual_seed(0)
    scores = {}
    for layer in range(6):  # attention tensors tiny scores, MLP tensors large ones
        scores[f"model.layers.{layer}.self_attn.q_proj.weight"] = (
            torch.rand(32, 32, generator=generator) * 1e-3
        )
        scores[f"model.layers.{layer}.mlp.up_proj.weight"] = (
            torch.rand(32, 32, generator=generator) * 10
        )
    top = top_k_entries(scores, 64)
    labels, features = profiles(scores, top)
    assert features.shape == (12, 4)
    ids = cluster_profiles(features, method, n_clusters=2, eps=1.5, min_samples=2)
    q_ids = {int(ids[i]) for i, n in enumerate(labels) if "q_proj" in n}
    up_ids = {int(ids[i]) for i, n in enumerate(labels) if "up_proj" in n}
    assert len(q_ids) == 1 and len(up_ids) == 1 and q_ids != up_ids
    summary = summarise_clusters(labels, features, ids)
    assert sorted(s["size"] for s in summary) == [6, 6]
    assert {tuple(s["components"]) for s in summary} == {("q",), ("up",)}
    rows, row_features = profiles(scores, top, level="row")
    assert row_features.shape == (12 * 32, 4) and rows[0].endswith("[0]")
    with pytest.raises(ValueError, match="clustering method must be one of"):
        cluster_profiles(features, "spectral")


def test_all_k_control_perturbs_every_candidate_once_per_target():
    from hf_sparse.analysis.effects import EffectProbe
    from hf_sparse.analysis.perturb import perturbed
    from hf_sparse.analysis.perturbation_study import Target, perturbation_study

    model = build_tiny_model("llama")
    scores = {n: p.detach().abs() for n, p in model.named_parameters() if "mlp" in n}
    windows = make_token_windows(n=2, length=12)
    probe = EffectProbe(model, windows)
    points = perturbation_study(
        model, scores, windows, [8, 32], [("scale", 3.0)], [Target()], 1, probe, False
    )
    everything = {n: torch.ones(s.shape, dtype=torch.bool) for n, s in scores.items()}
    with perturbed(model, everything, "scale", 3.0):
        expected = probe.measure().to_dict()
    total = sum(s.numel() for s in scores.values())
    for point in points:
        assert point.all_count == total
        assert point.all_k == pytest.approx(expected)
        assert point.all_k["kl"] > point.top["kl"]  # every weight x3 moves more than the top-k


def test_cluster_perturbation_uses_the_clusters_top_entries_and_its_own_weights():
    from hf_sparse.analysis.cluster_effects import _member_masks, cluster_perturbations
    from hf_sparse.analysis.effects import EffectProbe

    model = build_tiny_model("llama")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    scores = {n: p.detach().abs() for n, p in model.named_parameters() if "proj" in n}
    top = top_k_entries(scores, 40)
    names = sorted(scores)
    labels = names[:2] + [f"{names[2]}[0]", f"{names[2]}[1]"]
    clusters = [0, 0, 1, 1]
    shapes = {n: s.shape for n, s in scores.items()}
    region = _member_masks(labels[2:], shapes)
    assert int(region[names[2]].sum()) == 2 * shapes[names[2]][1]
    probe = EffectProbe(model, make_token_windows(n=2, length=12))
    rows = cluster_perturbations(model, top, shapes, labels, clusters, probe, "scale", 5.0, 2)
    first = rows[0]
    assert first["k"] == sum(int(top[n].sum()) for n in names[:2])
    expected_second = int((top[names[2]][:2]).sum())
    assert rows[1]["k"] == expected_second
    assert ("skipped" in rows[1]) == (expected_second == 0)
    assert first["k"] > 0 and first["top"]["kl"] > first["random_mean"]["kl"]
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


def test_layer_correlation_matches_a_direct_pearson():
    from hf_sparse.analysis.correlation import layer_correlation, layer_profiles

    generator = torch.Generator().manual_seed(0)
    scores = {}
    for layer, scale in enumerate((1.0, 1.0, 100.0)):
        for comp in ("self_attn.q_proj", "mlp.up_proj"):
            spread = 3.0 if comp.startswith("mlp") and layer == 2 else 1.0
            values = torch.rand(16, 16, generator=generator).pow(spread) * scale
            scores[f"model.layers.{layer}.{comp}.weight"] = values
    result = layer_correlation(scores)
    layers, features, profiles = layer_profiles(scores)
    assert result["layers"] == [0, 1, 2] and len(features) == profiles.shape[1] == 10
    direct = torch.corrcoef(profiles)
    torch.testing.assert_close(torch.tensor(result["pearson"], dtype=torch.float64), direct)
    matrix = torch.tensor(result["pearson"])
    assert matrix[0, 1] > matrix[0, 2]  # layers 0 and 1 are alike, layer 2 is not
    with pytest.raises(ValueError, match="at least two decoder layers"):
        layer_correlation({"model.layers.0.mlp.up_proj.weight": torch.rand(4, 4)})
