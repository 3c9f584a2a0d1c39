"""Basis Sharing maths against slow, obviously-correct references on small random matrices."""

from __future__ import annotations

import math

import pytest
import torch

from hf_sparse.basis_sharing.core import (
    compression_rank,
    energy_rank,
    refit_coefficients,
    shared_basis_svd,
    whitened_error,
    whitening_factor,
)


def correlated_inputs(tokens: int, d_in: int, seed: int) -> torch.Tensor:
    """Inputs with very unequal directions (what makes whitening matter)."""
    g = torch.Generator().manual_seed(seed)
    mixing = torch.randn(d_in, d_in, generator=g, dtype=torch.float64)
    scales = torch.logspace(0, -3, d_in, dtype=torch.float64)
    return torch.randn(tokens, d_in, generator=g, dtype=torch.float64) @ (scales[:, None] * mixing)


def output_error(x, weights, factors) -> float:
    """sum_i ||X W_i^T - X B^T C_i^T||_F^2, computed from the samples themselves."""
    total = 0.0
    for w, c in zip(weights, factors.coefficients, strict=True):
        total += float((x @ w.t() - x @ factors.basis.t() @ c.t()).pow(2).sum())
    return total


def test_rank_formula_matches_the_paper_for_a_4096_layer():
    # k = floor((1 - CR) d1 d2 n / (d1 + d2 n)): 0.8 * 4096 / 2 per layer, 0.8 * 4096 * 2 / 3
    assert compression_rank(4096, 4096, 1, 0.2) == 1638
    assert compression_rank(4096, 4096, 2, 0.2) == 2184
    assert compression_rank(4096, 4096, 4, 0.2) == 2621
    assert compression_rank(4096, 4096, 2, 0.4) == 1638
    # the stored parameters never exceed (1 - CR) of the dense ones
    for n in (1, 2, 4, 8):
        k = compression_rank(4096, 11008, n, 0.3)
        assert k * (4096 + 11008 * n) <= 0.7 * 4096 * 11008 * n
        assert (k + 1) * (4096 + 11008 * n) > 0.7 * 4096 * 11008 * n


@pytest.mark.parametrize("ratio", [0.0, 1.0, -0.1, 1.5, True, "0.2"])
def test_rank_refuses_ratios_outside_the_open_interval(ratio):
    with pytest.raises(ValueError, match="ratio must be in"):
        compression_rank(64, 64, 2, ratio)


@pytest.mark.parametrize("n_layers", [1, 2, 3])
def test_whitened_grouped_svd_reaches_the_eckart_young_optimum(n_layers):
    d_in, d_out, rank = 12, 7, 5
    x = correlated_inputs(200, d_in, seed=n_layers)
    g = torch.Generator().manual_seed(10 + n_layers)
    weights = [torch.randn(d_out, d_in, generator=g, dtype=torch.float64) for _ in range(n_layers)]
    # the group shares its input statistics: X^T X summed over layers (here one X for all)
    factors = shared_basis_svd(weights, rank, whitening_factor(x.t() @ x, damping=0.0))
    # best possible rank-k approximation of the stacked outputs [X W_1^T, ..., X W_n^T]
    outputs = torch.cat([x @ w.t() for w in weights], dim=1)
    optimum = float(torch.linalg.svdvals(outputs)[rank:].pow(2).sum())
    assert output_error(x, weights, factors) == pytest.approx(optimum, rel=1e-6)
    assert factors.basis.shape == (rank, d_in)
    assert [c.shape for c in factors.coefficients] == [(d_out, rank)] * n_layers


def test_sharing_beats_random_bases_and_plain_svd_on_the_output_error():
    d_in, d_out, rank = 10, 6, 4
    x = correlated_inputs(300, d_in, seed=3)
    g = torch.Generator().manual_seed(4)
    weights = [torch.randn(d_out, d_in, generator=g, dtype=torch.float64) for _ in range(2)]
    whitened = shared_basis_svd(weights, rank, whitening_factor(x.t() @ x, damping=0.0))
    plain = shared_basis_svd(weights, rank, None)
    assert output_error(x, weights, whitened) < output_error(x, weights, plain)
    for seed in range(5):
        basis = torch.randn(rank, d_in, generator=torch.Generator().manual_seed(seed)).double()
        coefficients = [refit_coefficients(w, basis, x.t() @ x, damping=0.0) for w in weights]
        random = type(whitened)(basis, coefficients, torch.zeros(rank))
        assert output_error(x, weights, whitened) <= output_error(x, weights, random) + 1e-9


def test_plain_svd_of_one_layer_is_the_truncated_svd():
    w = torch.randn(9, 6, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    factors = shared_basis_svd([w], 3, None)
    u, s, vh = torch.linalg.svd(w)
    torch.testing.assert_close(factors.coefficients[0] @ factors.basis, u[:, :3] * s[:3] @ vh[:3])
    torch.testing.assert_close(factors.singular_values, s[:3])


def test_a_group_of_one_is_the_per_layer_whitened_truncation():
    x = correlated_inputs(100, 8, seed=5)
    w = torch.randn(5, 8, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    factors = shared_basis_svd([w], 3, whitening_factor(x.t() @ x, damping=0.0))
    optimum = float(torch.linalg.svdvals(x @ w.t())[3:].pow(2).sum())
    assert output_error(x, [w], factors) == pytest.approx(optimum, rel=1e-6)


def test_rank_above_min_of_input_and_stacked_output_is_refused():
    weights = [torch.randn(3, 10), torch.randn(3, 10)]
    with pytest.raises(ValueError, match=r"min\(d_in, n\*d_out\)"):
        shared_basis_svd(weights, 7, None)
    with pytest.raises(ValueError, match="must all be"):
        shared_basis_svd([torch.randn(3, 10), torch.randn(3, 9)], 2, None)


def test_whitening_retries_with_jitter_on_a_singular_matrix(caplog):
    x = torch.randn(3, 6, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    xtx = x.t() @ x - 1e-6 * torch.eye(6, dtype=torch.float64)  # rank 3 of 6, slightly
    # indefinite (as rounding leaves a singular X^T X): the exact factorisation fails
    factor = whitening_factor(xtx, damping=0.0)
    assert torch.isfinite(factor).all() and factor.dtype == torch.float64
    assert torch.equal(factor, factor.tril())
    assert "retrying" in caplog.text


def test_whitening_factor_reproduces_the_damped_matrix():
    x = correlated_inputs(50, 6, seed=1)
    xtx = (x.t() @ x).float()
    factor = whitening_factor(xtx, damping=1e-3)
    lam = 1e-3 * torch.diag(xtx.double()).mean()
    torch.testing.assert_close(factor @ factor.t(), xtx.double() + lam * torch.eye(6).double())
    with pytest.raises(ValueError, match="NaN"):
        whitening_factor(torch.full((3, 3), math.nan))


def test_refit_is_the_least_squares_solution():
    x = correlated_inputs(80, 7, seed=2)
    g = torch.Generator().manual_seed(3)
    w = torch.randn(4, 7, generator=g, dtype=torch.float64)
    basis = torch.randn(3, 7, generator=g, dtype=torch.float64)
    fitted = refit_coefficients(w, basis, x.t() @ x, damping=0.0)
    # brute force: lstsq of X W^T on Z = X B^T
    reference = torch.linalg.lstsq(x @ basis.t(), x @ w.t()).solution.t()
    torch.testing.assert_close(fitted, reference, rtol=1e-6, atol=1e-8)


def test_energy_rank_is_the_smallest_prefix():
    values = torch.tensor([5.0, 3.0, 1.0, 1.0])
    assert energy_rank(values, 0.5) == 1
    assert energy_rank(values, 0.8) == 2
    assert energy_rank(values, 0.81) == 3
    assert energy_rank(values, 1.0) == 4
    with pytest.raises(ValueError, match="energy"):
        energy_rank(values, 0.0)


def test_per_layer_refit_never_raises_a_layers_own_error():
    """Grouped SVD whitens with the summed statistics; refitting each layer's coefficients on
    its own X_i^T X_i (layer_refit) lowers sum_i ||X_i (W_i - C_i B)^T||^2."""
    d_in, d_out, rank = 10, 6, 4
    xs = [correlated_inputs(150, d_in, seed=s) for s in (11, 12)]
    xs[1] = xs[1] * torch.linspace(0.1, 3.0, d_in, dtype=torch.float64)  # different statistics
    g = torch.Generator().manual_seed(13)
    weights = [torch.randn(d_out, d_in, generator=g, dtype=torch.float64) for _ in range(2)]
    summed = sum(x.t() @ x for x in xs)
    factors = shared_basis_svd(weights, rank, whitening_factor(summed, damping=0.0))

    def own_error(coefficients):
        return sum(
            float((x @ (w - c @ factors.basis).t()).pow(2).sum())
            for x, w, c in zip(xs, weights, coefficients, strict=True)
        )

    refit = [
        refit_coefficients(w, factors.basis, x.t() @ x, damping=0.0)
        for w, x in zip(weights, xs, strict=True)
    ]
    assert own_error(refit) < own_error(factors.coefficients)


def test_whitened_error_is_the_relative_output_error():
    torch.manual_seed(0)
    x = torch.randn(50, 8, dtype=torch.float64)
    w = torch.randn(5, 8, dtype=torch.float64)
    a = w + 0.1 * torch.randn(5, 8, dtype=torch.float64)
    expected = (x @ (w - a).t()).pow(2).sum() / (x @ w.t()).pow(2).sum()
    assert whitened_error(w, a, x.t() @ x) == pytest.approx(float(expected), rel=1e-10)
    assert whitened_error(w, w, x.t() @ x) == 0.0
    with pytest.raises(ValueError, match="shapes do not fit"):
        whitened_error(w, a[:, :4], x.t() @ x)


def test_whitened_error_of_a_group_of_one_equals_the_discarded_energy():
    """SVD-LLM: the whitened truncation error is the discarded squared singular values."""
    torch.manual_seed(1)
    x = torch.randn(64, 10, dtype=torch.float64)
    w = torch.randn(6, 10, dtype=torch.float64)
    xtx = x.t() @ x
    factors = shared_basis_svd([w], 3, whitening_factor(xtx, damping=0.0))
    s = torch.linalg.svdvals(w @ whitening_factor(xtx, damping=0.0))
    expected = float(s[3:].pow(2).sum() / s.pow(2).sum())
    approx = factors.coefficients[0] @ factors.basis
    assert whitened_error(w, approx, xtx) == pytest.approx(expected, rel=1e-8)
