"""OWL (outlier-weighed layerwise sparsity): the maths, exact budgets, and prune_ on tiny models."""

from __future__ import annotations

import pytest
import torch

from hf_sparse.models import target_linears, weight_matrix
from hf_sparse.pruning import MagnitudeConfig, SparseGPTConfig, WandaConfig, prune_
from hf_sparse.pruning.apply import _owl_plan
from hf_sparse.pruning.config import pruning_config_from_dict
from hf_sparse.pruning.owl import (
    dense_input_sq_norms,
    exact_layer_sparsities,
    integer_budgets,
    outlier_ratio,
    owl_block_sparsities,
)
from tests.conftest import ARCHS, build_tiny_model, make_token_windows

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: statistics on one thread


def test_outlier_ratio_counts_scores_above_m_times_the_mean():
    scores = [torch.tensor([1.0, 1.0, 1.0, 1.0]), torch.tensor([[1.0, 16.0]])]
    # mean = 22/6; with m=2 the threshold is 7.33: one of six entries
    assert outlier_ratio(scores, 2.0) == pytest.approx(1 / 6)
    assert outlier_ratio(scores, 5.0) == 0.0


def test_block_sparsities_keep_the_weighted_mean_and_a_band_of_two_lambda():
    ratios, sizes = [0.01, 0.05, 0.02, 0.08], [100, 300, 200, 400]
    values = owl_block_sparsities(ratios, sizes, 0.7, 0.1)
    mean = sum(v * n for v, n in zip(values, sizes, strict=True)) / sum(sizes)
    assert mean == pytest.approx(0.7, abs=1e-12)
    assert max(values) - min(values) == pytest.approx(0.2)


def test_block_sparsity_is_monotone_in_the_outlier_share():
    ratios = [0.03, 0.01, 0.09, 0.05, 0.02]
    values = owl_block_sparsities(ratios, [10] * 5, 0.6, 0.08)
    order = sorted(range(5), key=lambda i: ratios[i])
    assert [values[i] for i in order] == sorted(values, reverse=True)  # more outliers, kept more


def test_equal_outlier_shares_or_zero_lambda_give_the_uniform_target():
    assert owl_block_sparsities([0.02, 0.02], [5, 7], 0.5, 0.1) == [0.5, 0.5]
    assert owl_block_sparsities([0.01, 0.02], [5, 7], 0.5, 0.0) == [0.5, 0.5]


def test_clamped_blocks_pass_their_excess_to_the_others():
    values = owl_block_sparsities([0.0, 1.0, 1.0], [1, 1, 1], 0.95, 0.4)
    assert max(values) <= 0.99 and min(values) >= 0
    assert sum(values) / 3 == pytest.approx(0.95)


def test_integer_budgets_sum_exactly_and_respect_sizes():
    counts = integer_budgets([0.333, 0.5, 0.71], [7, 9, 13], 15)
    assert sum(counts) == 15
    assert all(0 <= c <= n for c, n in zip(counts, [7, 9, 13], strict=True))
    layers = exact_layer_sparsities(
        {"a": 0.61, "b": 0.59}, {"a": {"a.q": 33, "a.k": 17}, "b": {"b.q": 33, "b.k": 17}}, 0.6
    )
    assert sum(round(s * n) for s, n in zip(layers.values(), [33, 17, 33, 17], strict=True)) == 60


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize(
    "config",
    [
        MagnitudeConfig(sparsity=0.6, sparsity_profile="owl", owl_lambda=0.1, owl_m=2),
        WandaConfig(sparsity=0.7, sparsity_profile="owl", owl_lambda=0.2, owl_m=2),
        SparseGPTConfig(sparsity=0.55, sparsity_profile="owl", block_size=16, owl_m=2),
    ],
    ids=["magnitude", "wanda", "sparsegpt"],
)
def test_owl_overall_sparsity_is_exact_to_one_weight(arch, config):
    model = build_tiny_model(arch)
    result = prune_(model, config, make_token_windows(n=4, length=16), 2, show_progress=False)
    linears = [m for g in target_linears(model).values() for m in g.values()]
    total = sum(weight_matrix(m).numel() for m in linears)
    zeros = sum(int((weight_matrix(m) == 0).sum()) for m in linears)
    assert zeros == round(config.sparsity * total)
    assert sum(int((~k).sum()) for k in result.masks.values()) == zeros
    block_values = list(result.owl.block_sparsity.values())
    assert max(block_values) - min(block_values) == pytest.approx(2 * config.owl_lambda)
    assert model.config.sparsity["owl"]["max"] == pytest.approx(max(block_values), abs=1e-6)


def test_owl_outlier_shares_come_from_the_dense_model_and_are_deterministic():
    config = WandaConfig(sparsity=0.6, sparsity_profile="owl", owl_m=2)
    calibration = make_token_windows(n=4, length=16)
    plans, masks = [], []
    for _ in range(2):
        model = build_tiny_model("llama")
        grouped = target_linears(model)
        dense = dense_input_sq_norms(model, calibration, grouped, 2, show_progress=False)
        plans.append(_owl_plan(model, config, grouped, calibration, 2, False))
        masks.append(prune_(model, config, calibration, 2, show_progress=False).masks)
    # the plan made before pruning equals the one prune_ made (measured before any change)
    assert plans[0].outlier_ratios == plans[1].outlier_ratios
    assert all(torch.equal(masks[0][n], masks[1][n]) for n in masks[0])
    assert set(dense) == {n for g in grouped.values() for n in g}


def test_planting_outliers_in_a_block_lowers_its_sparsity():
    config = WandaConfig(sparsity=0.5, sparsity_profile="owl", owl_m=5)
    windows = make_token_windows(n=4, length=16)
    model = build_tiny_model("llama", num_hidden_layers=4)
    grouped = target_linears(model)
    before = _owl_plan(model, config, grouped, windows, 2, False)
    block = min(before.outlier_ratios, key=before.outlier_ratios.get)
    with torch.no_grad():  # every 10th weight of that block x8: a heavy tail of outliers
        for module in grouped[block].values():
            weight_matrix(module).view(-1)[::10] *= 8
    after = _owl_plan(model, config, grouped, windows, 2, False)
    assert after.outlier_ratios[block] > before.outlier_ratios[block]
    assert after.block_sparsity[block] < before.block_sparsity[block]


def test_owl_config_errors_are_clear():
    with pytest.raises(ValueError, match="unstructured mask"):
        WandaConfig(mask="2:4", sparsity_profile="owl")
    with pytest.raises(ValueError, match="sparsity_profile must be one of"):
        WandaConfig(sparsity=0.5, sparsity_profile="owlish")
    with pytest.raises(ValueError, match="owl_lambda"):
        WandaConfig(sparsity=0.5, sparsity_profile="owl", owl_lambda=0.7)
    assert MagnitudeConfig(sparsity=0.5, sparsity_profile="owl").needs_calibration
    assert not MagnitudeConfig(sparsity=0.5).needs_calibration
    with pytest.raises(ValueError, match="needs calibration data"):
        prune_(build_tiny_model("llama"), MagnitudeConfig(sparsity=0.5, sparsity_profile="owl"))
    config = pruning_config_from_dict(
        "sparsegpt", {"sparsity": 0.7, "sparsity_profile": "owl", "owl_m": 7, "owl_lambda": 0.05}
    )
    assert (config.owl, config.owl_m, config.owl_lambda) == (True, 7, 0.05)
