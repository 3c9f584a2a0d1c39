"""Ground-truth metrics on decompositions whose answer is known by construction."""

from __future__ import annotations

import pytest
import torch

from hf_sparse.spd.metrics import (
    alive_components,
    ci_l0,
    coactivation_clusters,
    identity_ci_report,
    mmcs_ml2r,
)


def _perfect(W: torch.Tensor, extra: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """U, V with component i = W[:, i] e_i^T, plus ``extra`` zero components."""
    n = W.shape[1]
    U = torch.cat([W, torch.zeros(W.shape[0], extra)], 1)
    V = torch.cat([torch.eye(n), torch.zeros(extra, n)], 0)
    return U, V


def test_a_perfect_decomposition_scores_one():
    torch.manual_seed(0)
    W = torch.randn(2, 5)
    U, V = _perfect(W, extra=3)
    perm = torch.randperm(8)
    match = mmcs_ml2r(W, U[:, perm], V[perm])
    assert match.mmcs == pytest.approx(1.0, abs=1e-6)
    assert match.ml2r == pytest.approx(1.0, abs=1e-6)
    assert sorted(perm[match.best_component].tolist()) == [0, 1, 2, 3, 4]


def test_ml2r_sees_a_feature_split_over_two_components():
    W = torch.randn(3, 4)
    U, V = _perfect(W)
    U = torch.cat([U * 0.5, U * 0.5], 1)  # each feature carried half by two components
    V = torch.cat([V, V], 0)
    match = mmcs_ml2r(W, U, V)
    assert match.mmcs == pytest.approx(1.0, abs=1e-6)
    assert match.ml2r == pytest.approx(0.5, abs=1e-6)


def test_mmcs_sees_wrong_directions_and_signs():
    W = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    U = torch.tensor([[1.0, -1.0], [1.0, 1.0]])  # 45 degrees off
    V = torch.eye(2)
    assert mmcs_ml2r(W, U, V).mmcs == pytest.approx(2**-0.5, abs=1e-6)
    assert mmcs_ml2r(W, -W, V).mmcs <= 0.0  # the negated matrix matches nothing
    assert mmcs_ml2r(W, -W, -V).mmcs == pytest.approx(1.0, abs=1e-6)  # same matrix


def test_mmcs_refuses_mismatched_shapes():
    with pytest.raises(ValueError, match="shapes"):
        mmcs_ml2r(torch.zeros(2, 5), torch.zeros(3, 4), torch.zeros(4, 5))


def test_alive_and_l0():
    ci = torch.tensor([[0.0, 0.5, 0.05], [0.0, 0.2, 0.0], [0.0, 0.0, 0.0]])
    assert alive_components(ci, 0.1).tolist() == [False, True, False]
    assert ci_l0(ci, 0.1) == pytest.approx(2 / 3)


def test_identity_ci_report_perfect_and_broken():
    perfect = torch.zeros(3, 6)
    perfect[0, 4], perfect[1, 0], perfect[2, 2] = 1.0, 0.9, 1.0
    report = identity_ci_report(perfect)
    assert report.one_to_one_fraction == 1.0 and report.n_alive == 3
    assert report.error == pytest.approx(0.1 / 3)
    broken = perfect.clone()
    broken[0, 0] = 1.0  # feature 0 now also uses feature 1's component
    broken[2, 2], broken[2, 3] = 0.5, 0.5  # feature 2 split over two
    report = identity_ci_report(broken)
    assert report.active_per_feature == [2, 1, 2]
    assert report.one_to_one_fraction == pytest.approx(1 / 3)
    shared = torch.zeros(2, 3)
    shared[:, 1] = 1.0  # both features use one component
    assert identity_ci_report(shared).one_to_one_fraction == 0.0


def test_coactivation_clusters_groups_components_that_fire_together():
    a = torch.tensor([1, 1, 0, 0, 1, 0], dtype=torch.bool)
    b = torch.tensor([0, 0, 1, 1, 0, 0], dtype=torch.bool)
    active = torch.stack([a, b, a, b, a.clone().fill_(False)], 1)
    clusters = coactivation_clusters(active, 0.9, names=["a1", "b1", "a2", "b2", "dead"])
    assert sorted(sorted(c) for c in clusters) == [["a1", "a2"], ["b1", "b2"]]


def _clusters_by_definition(active: torch.Tensor, min_similarity: float) -> set[frozenset]:
    """Average linkage straight from its definition: merge the two clusters whose member pairs
    have the highest mean Jaccard similarity, until that mean falls below the threshold."""
    a = active.float()
    fired = (a.sum(0) > 0).nonzero().flatten().tolist()
    a = a[:, fired]
    both = a.t() @ a
    sim = (both / (a.sum(0)[:, None] + a.sum(0)[None, :] - both).clamp_min(1)).tolist()
    clusters = [[i] for i in range(len(fired))]
    while len(clusters) > 1:
        scores = {
            (x, y): sum(sim[i][j] for i in clusters[x] for j in clusters[y])
            / (len(clusters[x]) * len(clusters[y]))
            for x in range(len(clusters))
            for y in range(x + 1, len(clusters))
        }
        (x, y), best = max(scores.items(), key=lambda item: item[1])
        if best < min_similarity:
            break
        clusters[x] += clusters.pop(y)
    return {frozenset(str(fired[i]) for i in c) for c in clusters}


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_coactivation_clusters_equal_average_linkage_by_definition(seed):
    generator = torch.Generator().manual_seed(seed)
    groups = torch.randint(0, 6, (40,), generator=generator)  # 6 hidden groups of components
    group_on = torch.rand(300, 6, generator=generator) < 0.3
    noise = torch.rand(300, 40, generator=generator) < 0.08
    active = group_on[:, groups] ^ noise
    active[:, :2] = False  # two dead components are left out
    for threshold in (0.2, 0.4, 0.6):
        clusters = coactivation_clusters(active, threshold)
        assert {frozenset(c) for c in clusters} == _clusters_by_definition(active, threshold)
        assert [len(c) for c in clusters] == sorted((len(c) for c in clusters), reverse=True)
        assert sum(len(c) for c in clusters) == 38


def test_tms_acceptance_needs_directions_and_one_component_per_feature():
    from hf_sparse.spd.experiments import get_experiment
    from hf_sparse.spd.toy_run import summarise

    experiment = get_experiment("tms_5-2")
    good = {"n_alive": 5, "one_to_one_fraction": 1.0, "mmcs": 0.999, "ml2r": 0.98}
    metrics = {"layers": {"linear1": dict(good), "linear2": dict(good)}, "mse_ci_masked": 0.0}
    assert summarise(experiment, metrics)["ground_truth_recovered"] is True
    for change in ({"mmcs": 0.96}, {"ml2r": 1.2}, {"n_alive": 6}, {"one_to_one_fraction": 0.8}):
        metrics["layers"]["linear1"] = {**good, **change}
        assert summarise(experiment, metrics)["ground_truth_recovered"] is False


def test_tms_hidden_identity_is_judged_as_k_dense_components():
    """TMS 5-2-id's hidden 2x2 identity carries every feature: the reference expects it as
    2 dense components active on every input (its ``dense_ci`` with k=2), not one per feature."""
    from hf_sparse.spd.experiments import get_experiment
    from hf_sparse.spd.toy_run import summarise

    experiment = get_experiment("tms_5-2-id")
    assert experiment.dense_layers == {"hidden_layers.0": 2}
    assert "hidden_layers.0" not in experiment.identity_layers
    good = {"n_alive": 5, "one_to_one_fraction": 1.0, "mmcs": 0.999, "ml2r": 0.98}
    dense = {"n_alive": 2, "active_per_feature": [2, 2, 2, 2, 2]}
    metrics = {
        "layers": {"linear1": dict(good), "linear2": dict(good), "hidden_layers.0": dense},
        "mse_ci_masked": 0.0,
    }
    summary = summarise(experiment, metrics)
    assert summary["hidden_layers.0.dense_as_expected"] is True
    assert summary["ground_truth_recovered"] is True
    for change in ({"n_alive": 3}, {"active_per_feature": [1, 1, 2, 2, 2]}):
        metrics["layers"]["hidden_layers.0"] = {**dense, **change}
        summary = summarise(experiment, metrics)
        assert summary["hidden_layers.0.dense_as_expected"] is False
        assert summary["ground_truth_recovered"] is False


def test_features_the_target_dropped_are_not_ground_truth():
    from hf_sparse.spd import SPDConfig, get_spd_model
    from hf_sparse.spd.experiments import get_experiment
    from hf_sparse.spd.toy_models import build_toy_model
    from hf_sparse.spd.toy_run import toy_metrics

    experiment = get_experiment("tms_5-2")
    target = build_toy_model(experiment.toy)
    with torch.no_grad():
        target.linear1.weight[:, 3] = 0.0  # a feature the target does not represent
        target.tie_weights_()
    target.requires_grad_(False)
    torch.manual_seed(0)
    model = get_spd_model(target, SPDConfig(C=4, target_modules=["linear1", "linear2"]))
    metrics = toy_metrics(model, experiment)
    assert metrics["represented_features"] == [0, 1, 2, 4]
    assert len(metrics["layers"]["linear1"]["active_per_feature"]) == 4
    assert 0 < metrics["layers"]["linear1"]["ml2r"] < 100  # no division by a zero column
