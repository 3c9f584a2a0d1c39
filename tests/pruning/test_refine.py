"""RIA scores and DSnoT mask refinement: the maths on tensors, and prune_ on tiny models."""

from __future__ import annotations

import pytest
import torch

from hf_sparse.models import target_linears, weight_matrix
from hf_sparse.pruning import MagnitudeConfig, SparseGPTConfig, WandaConfig, prune_
from hf_sparse.pruning.core import NMPattern, keep_mask_from_scores, obs_prune
from hf_sparse.pruning.refine import dsnot_refine, ria_scores
from tests.conftest import ARCHS, build_tiny_model, make_token_windows

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: statistics on one thread


def test_ria_score_is_relative_importance_times_root_activation_norm():
    weight = torch.tensor([[1.0, -2.0], [3.0, 4.0]])
    sq_norms = torch.tensor([16.0, 81.0])  # ||X|| = 4, 9 -> ||X||^0.5 = 2, 3
    expected = torch.tensor(
        [[1 / 4 + 1 / 3, 2 / 6 + 2 / 3], [3 / 4 + 3 / 7, 4 / 6 + 4 / 7]]
    ) * torch.tensor([2.0, 3.0])
    torch.testing.assert_close(ria_scores(weight, sq_norms), expected)
    with pytest.raises(ValueError, match="shape mismatch"):
        ria_scores(weight, torch.ones(3))


def _layer(rows=16, cols=32, seed=0):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(256, cols, generator=generator) + 0.5  # non-zero means
    w = torch.randn(rows, cols, generator=generator)
    return w, x


def test_dsnot_keeps_counts_per_row_and_lowers_the_mean_output_error():
    w, x = _layer()
    sq = x.pow(2).sum(0)
    keep = keep_mask_from_scores(w.abs() * sq.sqrt(), 0.6, per_row=True)
    refined = dsnot_refine(w, keep, x.mean(0), sq, iterations=50)
    assert torch.equal(refined.sum(1), keep.sum(1))
    error = lambda k: ((w * ~k) @ x.mean(0)).abs()  # noqa: E731
    assert torch.all(error(refined) <= error(keep) + 1e-6)
    assert error(refined).sum() < 0.5 * error(keep).sum()
    assert torch.equal(refined, dsnot_refine(w, keep, x.mean(0), sq, iterations=50))


def test_dsnot_with_n_m_swaps_inside_groups():
    w, x = _layer()
    sq = x.pow(2).sum(0)
    pattern = NMPattern(2, 4)
    keep = keep_mask_from_scores(w.abs() * sq.sqrt(), 0.5, pattern)
    refined = dsnot_refine(w, keep, x.mean(0), sq, iterations=20, pattern=pattern)
    assert torch.all(refined.reshape(16, -1, 4).sum(-1) == 2)
    assert not torch.equal(refined, keep)


def test_per_row_budgets_are_exact_when_sparsity_times_columns_is_fractional():
    scores = torch.rand(7, 10, generator=torch.Generator().manual_seed(0))
    keep = keep_mask_from_scores(scores, 0.33, per_row=True, exact_total=True)  # 3.3 per row
    assert int((~keep).sum()) == round(0.33 * 70)
    assert set((~keep).sum(1).tolist()) <= {3, 4}
    w = torch.randn(24, 40, generator=torch.Generator().manual_seed(1))
    _, keep = obs_prune(w, torch.eye(40), 0.37, block_size=16, exact_total=True)
    assert int((~keep).sum()) == round(0.37 * w.numel())


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize(
    "config",
    [
        WandaConfig(sparsity=0.6, score="ria"),
        WandaConfig(sparsity=0.6, refine="dsnot"),
        WandaConfig(mask="2:4", score="ria", refine="dsnot"),
        MagnitudeConfig(sparsity=0.5, refine="dsnot"),
        WandaConfig(sparsity=0.7, score="ria", refine="dsnot", sparsity_profile="owl", owl_m=2),
    ],
    ids=["ria", "dsnot", "ria-dsnot-2:4", "magnitude-dsnot", "ria-dsnot-owl"],
)
def test_options_keep_the_exact_budget_and_are_deterministic(arch, config):
    masks = []
    for _ in range(2):
        model = build_tiny_model(arch)
        result = prune_(model, config, make_token_windows(n=4, length=16), 2, show_progress=False)
        linears = {n: m for g in target_linears(model).values() for n, m in g.items()}
        for name, module in linears.items():
            weight = weight_matrix(module)
            assert torch.all(weight[~result.masks[name]] == 0), name
            if config.pattern is not None:
                groups = result.masks[name].reshape(weight.shape[0], -1, 4).sum(-1)
                assert torch.all(groups == 2), name
        total = sum(weight_matrix(m).numel() for m in linears.values())
        zeros = sum(int((weight_matrix(m) == 0).sum()) for m in linears.values())
        if config.owl:
            assert zeros == round(config.sparsity * total)
        else:  # per-row rounding: at most half a weight per row
            cols = min(weight_matrix(m).shape[1] for m in linears.values())
            assert abs(zeros / total - config.sparsity) <= 0.5 / cols
        masks.append(result.masks)
    assert all(torch.equal(masks[0][n], masks[1][n]) for n in masks[0])


def test_dsnot_changes_the_wanda_mask_and_option_errors_are_clear():
    windows = make_token_windows(n=4, length=16)
    plain = prune_(build_tiny_model("llama"), WandaConfig(sparsity=0.6), windows, 2, False)
    refined = prune_(
        build_tiny_model("llama"), WandaConfig(sparsity=0.6, refine="dsnot"), windows, 2, False
    )
    assert any(not torch.equal(plain.masks[n], refined.masks[n]) for n in plain.masks)
    with pytest.raises(ValueError, match="refine='dsnot' is not available for sparsegpt"):
        SparseGPTConfig(sparsity=0.5, refine="dsnot")
    with pytest.raises(ValueError, match="score must be one of"):
        WandaConfig(sparsity=0.5, score="magnitude")
    assert MagnitudeConfig(sparsity=0.5, refine="dsnot").needs_calibration
