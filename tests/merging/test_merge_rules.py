"""Merge rules equal peft.utils.merge_utils on the same tensors and random streams."""

from __future__ import annotations

import pytest
import torch
from peft.utils import merge_utils

from hf_sparse.merging import agreeing_signs, merge_task_vectors, trim_magnitude


def task_vectors(n: int = 3, shape=(16, 24), seed: int = 0) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=generator) for _ in range(n)]


WEIGHTS = [0.5, 1.0, 0.7]


def test_task_arithmetic_matches_peft():
    tvs = task_vectors()
    ours = merge_task_vectors(tvs, WEIGHTS, "task_arithmetic")
    theirs = merge_utils.task_arithmetic(tvs, torch.tensor(WEIGHTS))
    torch.testing.assert_close(ours, theirs, rtol=0, atol=0)


@pytest.mark.parametrize("density", [0.1, 0.3, 0.7])
def test_magnitude_prune_matches_peft(density):
    tvs = task_vectors()
    ours = merge_task_vectors(tvs, WEIGHTS, "magnitude_prune", density)
    theirs = merge_utils.magnitude_prune(tvs, torch.tensor(WEIGHTS), density)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=0)


@pytest.mark.parametrize("sign_method", ["total", "frequency"])
@pytest.mark.parametrize("density", [0.2, 0.5])
def test_ties_matches_peft(density, sign_method):
    tvs = task_vectors()
    ours = merge_task_vectors(tvs, WEIGHTS, "ties", density, sign_method)
    theirs = merge_utils.ties(tvs, torch.tensor(WEIGHTS), density, sign_method)
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("method", ["dare_linear", "dare_ties"])
def test_dare_matches_peft_on_the_same_random_stream(method):
    tvs = task_vectors()
    ours = merge_task_vectors(tvs, WEIGHTS, method, 0.3, generator=torch.Generator().manual_seed(7))
    torch.manual_seed(7)
    theirs = getattr(merge_utils, method)(tvs, torch.tensor(WEIGHTS), 0.3)
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-7)
    again = merge_task_vectors(
        tvs, WEIGHTS, method, 0.3, generator=torch.Generator().manual_seed(7)
    )
    assert torch.equal(ours, again)


def test_trim_keeps_the_largest_and_signs_are_elected():
    tv = torch.tensor([0.1, -3.0, 2.0, -0.5])
    assert trim_magnitude(tv, 0.5).tolist() == [0.0, -3.0, 2.0, 0.0]
    stacked = torch.tensor([[1.0, -1.0], [2.0, 3.0], [-4.0, -1.0]])
    assert agreeing_signs(stacked, "total").tolist() == [
        [False, False],
        [False, True],
        [True, False],
    ]
    assert agreeing_signs(stacked, "frequency").tolist() == [
        [True, True],
        [True, False],
        [False, True],
    ]


def test_bad_input():
    tvs = task_vectors()
    for density in (0, 1.5, -0.1):
        with pytest.raises(ValueError, match=r"density must be in \(0, 1\]"):
            merge_task_vectors(tvs, WEIGHTS, "ties", density)
    with pytest.raises(ValueError, match="3 task vectors"):
        merge_task_vectors(tvs, [1.0], "ties", 0.5)
    with pytest.raises(ValueError, match="valid"):
        merge_task_vectors(tvs, WEIGHTS, "slerp")
    with pytest.raises(ValueError, match="one shape"):
        merge_task_vectors([tvs[0], tvs[1].t()], [1, 1], "ties", 0.5)
    with pytest.raises(ValueError, match="sign method"):
        merge_task_vectors(tvs, WEIGHTS, "ties", 0.5, sign_method="median")


def _correlated_inputs(tokens: int = 512, features: int = 48, seed: int = 0) -> torch.Tensor:
    """Activations like an LM's: correlated features with a few large-scale columns."""
    generator = torch.Generator().manual_seed(seed)
    mixing = torch.randn(features, features, generator=generator)
    scales = torch.ones(features)
    scales[:4] = 20.0  # outlier features
    return (torch.randn(tokens, features, generator=generator) @ mixing) * scales


@pytest.mark.parametrize("density", [0.1, 0.2, 0.3])
def test_obs_task_vector_reconstructs_outputs_better_than_magnitude(density):
    from hf_sparse.merging import prune_task_vector_obs, reconstruction_error

    x = _correlated_inputs()
    hessian = x.t() @ x / x.shape[0]
    tau = torch.randn(32, 48, generator=torch.Generator().manual_seed(1)) * 0.01
    obs = prune_task_vector_obs(tau, hessian, density)
    magnitude = trim_magnitude(tau, density)
    assert (obs != 0).float().mean().item() == pytest.approx(density, abs=0.01)
    obs_error, norm = reconstruction_error(tau, obs, hessian)
    magnitude_error, _ = reconstruction_error(tau, magnitude, hessian)
    direct = ((x @ (tau - obs).t()) ** 2).sum().item() / x.shape[0]
    assert obs_error == pytest.approx(direct, rel=1e-4)
    assert obs_error < 0.7 * magnitude_error
    assert norm == pytest.approx(((x @ tau.t()) ** 2).sum().item() / x.shape[0], rel=1e-4)


def test_obs_with_full_density_keeps_the_task_vector_and_rescale_never_hurts():
    from hf_sparse.merging import ObsOptions, prune_task_vector_obs, reconstruction_error

    x = _correlated_inputs(seed=2)
    hessian = x.t() @ x / x.shape[0]
    tau = torch.randn(16, 48, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(prune_task_vector_obs(tau, hessian, 1.0), tau)
    magnitude = trim_magnitude(tau, 0.2)
    from hf_sparse.merging import rescale_rows

    rescaled = rescale_rows(tau, magnitude, hessian)
    assert torch.equal(rescaled != 0, magnitude != 0)
    assert (
        reconstruction_error(tau, rescaled, hessian)[0]
        <= reconstruction_error(tau, magnitude, hessian)[0]
    )
    plain = prune_task_vector_obs(tau, hessian, 0.2)
    scaled = prune_task_vector_obs(tau, hessian, 0.2, ObsOptions(rescale=True))
    assert reconstruction_error(tau, scaled, hessian)[0] <= reconstruction_error(
        tau, plain, hessian
    )[0] * (1 + 1e-6)


def test_merge_rules_refuse_bad_input():
    tvs = task_vectors()
    with pytest.raises(ValueError, match=r"density must be in \(0, 1\]"):
        merge_task_vectors(tvs, WEIGHTS, "ties", 0.0)
    with pytest.raises(ValueError, match="2 weights for 3 task vectors"):
        merge_task_vectors(tvs, WEIGHTS[:2], "ties", 0.5)
    with pytest.raises(ValueError, match="needs layer-input Hessians"):
        merge_task_vectors(tvs, WEIGHTS, "sparsegpt_tv", 0.5)
    with pytest.raises(ValueError, match="unknown merge method"):
        merge_task_vectors(tvs, WEIGHTS, "slerp", 0.5)


def test_normalize_divides_by_the_contributing_weights():
    tvs = task_vectors()
    summed = merge_task_vectors(tvs, WEIGHTS, "task_arithmetic")
    normalized = merge_task_vectors(tvs, WEIGHTS, "task_arithmetic", normalize=True)
    torch.testing.assert_close(normalized, summed / sum(WEIGHTS))
    ones = [1.0, 1.0, 1.0]  # with unit weights TIES' count and mergekit's weight sum agree
    torch.testing.assert_close(
        merge_task_vectors(tvs, ones, "ties", 0.5, normalize=True),
        merge_task_vectors(tvs, ones, "ties", 0.5),
    )


@pytest.mark.parametrize(
    "method,combine", [("dare_sparsegpt", "sum"), ("dare_sparsegpt_ties", "ties")]
)
def test_dare_with_error_correction_is_sparsegpt_divided_by_the_density(method, combine):
    """The specification's DARE with ``use_sparsegpt=True``: OBS chooses and corrects the kept
    entries, then DARE's 1/density rescale; without a Hessian, magnitude trim then 1/density."""
    from hf_sparse.merging import ObsOptions, prune_task_vector_obs

    x = _correlated_inputs(seed=4)
    hessian = x.t() @ x / x.shape[0]
    tvs = [t * 0.01 for t in task_vectors(shape=(16, 48), seed=5)]
    density = 0.25
    obs = [prune_task_vector_obs(t, hessian, density) for t in tvs]
    rescaled = [
        prune_task_vector_obs(t, hessian, density, ObsOptions(density_rescale=True)) for t in tvs
    ]
    for plain, scaled in zip(obs, rescaled, strict=True):
        torch.testing.assert_close(scaled, plain / density)
        assert (scaled != 0).float().mean().item() == pytest.approx(density, abs=0.01)
    merged = merge_task_vectors(tvs, WEIGHTS, method, density, hessians=hessian)
    if combine == "sum":
        expected = sum(w * s for w, s in zip(WEIGHTS, rescaled, strict=True))
    else:
        expected = merge_task_vectors(rescaled, WEIGHTS, "ties", 1.0)
    torch.testing.assert_close(merged, expected, rtol=1e-5, atol=1e-7)
    bias = torch.tensor([0.4, -0.1, 0.02, -2.0])
    from hf_sparse.merging.core import MERGE_METHODS, sparsify

    kept = sparsify(bias, MERGE_METHODS[method], 0.5)
    assert kept.tolist() == pytest.approx([0.8, 0.0, 0.0, -4.0])
    with pytest.raises(ValueError, match="needs layer-input Hessians"):
        merge_task_vectors(tvs, WEIGHTS, method, density)


def test_dare_rescale_and_least_squares_rescale_are_distinct_config_fields():
    from hf_sparse.merging import MergeConfig

    assert MergeConfig("sparsegpt_tv", density=0.2, dare_rescale=True).dare_rescale
    assert MergeConfig("sparsegpt_tv", density=0.2, rescale=True).rescale
    with pytest.raises(ValueError, match="undo each other"):
        MergeConfig("dare_sparsegpt", density=0.2, rescale=True)
    with pytest.raises(ValueError, match="undo each other"):
        MergeConfig("sparsegpt_tv", density=0.2, rescale=True, dare_rescale=True)
    with pytest.raises(ValueError, match="dare_rescale applies to OBS methods"):
        MergeConfig("ties", density=0.2, dare_rescale=True)
