"""Pruning maths (hf_sparse.pruning.core) against slow, obviously-correct references."""

from __future__ import annotations

import logging

import pytest
import torch

from hf_sparse.linalg import damped_inverse_cholesky
from hf_sparse.pruning.core import (
    NMPattern,
    keep_mask_from_scores,
    magnitude_mask,
    obs_prune,
    parse_mask_structure,
    wanda_mask,
)

CORE_LOGGER = "hf_sparse.pruning.core"


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _distinct_scores(rows: int, cols: int, seed: int = 0) -> torch.Tensor:
    """A random permutation of distinct positive values, so rankings have no ties."""
    perm = torch.randperm(rows * cols, generator=_gen(seed)).to(torch.float32)
    return (perm + 1.0).reshape(rows, cols)


def _ref_keep_lowest_dropped(scores: list[float], count: int) -> list[bool]:
    """Brute force: sort the indices by score and drop the ``count`` lowest."""
    order = sorted(range(len(scores)), key=lambda i: scores[i])
    dropped = set(order[:count])
    return [i not in dropped for i in range(len(scores))]


def _ref_mask(scores: torch.Tensor, sparsity: float, pattern, per_row: bool) -> torch.Tensor:
    rows, cols = scores.shape
    if pattern is not None:
        keep = []
        for r in range(rows):
            row = []
            for g in range(0, cols, pattern.m):
                group = scores[r, g : g + pattern.m].tolist()
                row += _ref_keep_lowest_dropped(group, pattern.m - pattern.n)
            keep.append(row)
        return torch.tensor(keep)
    if per_row:
        count = round(sparsity * cols)
        return torch.tensor(
            [_ref_keep_lowest_dropped(scores[r].tolist(), count) for r in range(rows)]
        )
    flat = _ref_keep_lowest_dropped(scores.flatten().tolist(), round(sparsity * scores.numel()))
    return torch.tensor(flat).reshape(rows, cols)


# --------------------------------------------------------------------------- mask structure


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (None, None),
        ("unstructured", None),
        ("2:4", NMPattern(2, 4)),
        ("4:8", NMPattern(4, 8)),
        ("1:2", NMPattern(1, 2)),
        (" 2 : 4 ", NMPattern(2, 4)),
    ],
)
def test_parse_mask_structure_valid(text, expected):
    assert parse_mask_structure(text) == expected


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("4:2", "0 < N < M"),
        ("0:4", "0 < N < M"),
        ("4:4", "0 < N < M"),
        ("abc", "'unstructured' or 'N:M'"),
        ("2-4", "'unstructured' or 'N:M'"),
        ("", "'unstructured' or 'N:M'"),
        ("-1:4", "'unstructured' or 'N:M'"),
        ("2:4:8", "'unstructured' or 'N:M'"),
    ],
)
def test_parse_mask_structure_invalid(text, message):
    with pytest.raises(ValueError, match=message) as err:
        parse_mask_structure(text)
    assert repr(text) in str(err.value)


@pytest.mark.parametrize(("n", "m", "sparsity"), [(2, 4, 0.5), (4, 8, 0.5), (1, 4, 0.75)])
def test_nm_pattern_properties(n, m, sparsity):
    pattern = NMPattern(n, m)
    assert pattern.sparsity == pytest.approx(sparsity)
    assert pattern.pruned_per_group == m - n
    assert str(pattern) == f"{n}:{m}"


# --------------------------------------------------------------------------- score masks


@pytest.mark.parametrize("sparsity", [0.0, 0.1, 0.25, 0.5, 0.7, 0.9])
@pytest.mark.parametrize("per_row", [False, True])
def test_keep_mask_from_scores_unstructured(sparsity, per_row):
    scores = _distinct_scores(6, 16, seed=1)
    keep = keep_mask_from_scores(scores, sparsity, per_row=per_row)
    assert keep.dtype == torch.bool and keep.shape == scores.shape
    if per_row:
        assert ((~keep).sum(1) == round(sparsity * 16)).all()
    else:
        assert int((~keep).sum()) == round(sparsity * scores.numel())
    assert torch.equal(keep, _ref_mask(scores, sparsity, None, per_row))


@pytest.mark.parametrize("pattern", [NMPattern(2, 4), NMPattern(4, 8), NMPattern(1, 4)])
def test_keep_mask_from_scores_nm(pattern):
    scores = _distinct_scores(5, 16, seed=2)
    keep = keep_mask_from_scores(scores, 0.0, pattern)
    groups = keep.reshape(5, 16 // pattern.m, pattern.m)
    assert (groups.sum(-1) == pattern.n).all()
    assert torch.equal(keep, _ref_mask(scores, 0.0, pattern, per_row=False))


def test_keep_mask_from_scores_nm_needs_divisible_columns():
    with pytest.raises(ValueError, match="multiple of 4"):
        keep_mask_from_scores(torch.rand(3, 10), 0.5, NMPattern(2, 4))


@pytest.mark.parametrize(
    ("sparsity", "pattern"),
    [(0.3, None), (0.5, None), (0.0, NMPattern(2, 4)), (0.0, NMPattern(4, 8))],
)
def test_magnitude_mask_keeps_largest_abs(sparsity, pattern):
    signs = torch.where(torch.rand(8, 16, generator=_gen(3)) < 0.5, -1.0, 1.0)
    weight = _distinct_scores(8, 16, seed=4) * signs
    keep = magnitude_mask(weight, sparsity, pattern)
    assert torch.equal(keep, _ref_mask(weight.abs(), sparsity, pattern, per_row=False))
    if pattern is None:
        # Every kept |w| is at least as large as every pruned one (a global threshold).
        assert weight.abs()[keep].min() > weight.abs()[~keep].max()


@pytest.mark.parametrize(
    ("sparsity", "pattern"),
    [(0.25, None), (0.5, None), (0.0, NMPattern(2, 4)), (0.0, NMPattern(4, 8))],
)
def test_wanda_mask_matches_bruteforce_row_ranking(sparsity, pattern):
    rows, cols = 6, 16
    weight = torch.randn(rows, cols, generator=_gen(5))
    norms = torch.rand(cols, generator=_gen(6)) * 10 + 0.1
    keep = wanda_mask(weight, norms, sparsity, pattern)
    scores = [
        [abs(weight[r, c].item()) * norms[c].item() ** 0.5 for c in range(cols)]
        for r in range(rows)
    ]
    expected = _ref_mask(torch.tensor(scores, dtype=torch.float64), sparsity, pattern, per_row=True)
    assert torch.equal(keep, expected)
    if pattern is None:
        assert ((~keep).sum(1) == round(sparsity * cols)).all()


def test_wanda_differs_from_magnitude_when_norms_vary():
    weight = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    norms = torch.tensor([100.0, 1.0, 1.0, 0.01])  # scores 10, 2, 3, 0.4
    assert wanda_mask(weight, norms, 0.5).tolist() == [[True, False, True, False]]
    assert magnitude_mask(weight, 0.5).tolist() == [[False, False, True, True]]


@pytest.mark.parametrize("bad_shape", [(15,), (17,), (1, 16), (16, 1)])
def test_wanda_mask_rejects_wrong_norm_shape(bad_shape):
    with pytest.raises(ValueError, match="shape mismatch"):
        wanda_mask(torch.randn(4, 16), torch.rand(bad_shape), 0.5)


# --------------------------------------------------------------------------- OBS references


def _damped(hessian: torch.Tensor, damp: float) -> torch.Tensor:
    """``H + damp * mean(diag H) * I`` in float64, dead inputs given a unit diagonal."""
    h = hessian.to(torch.float64).clone()
    dead = torch.diag(h) == 0
    idx = dead.nonzero().flatten()
    h[idx, idx] = 1.0
    lam = damp * torch.diag(h).mean()
    return h + lam * torch.eye(h.shape[0], dtype=h.dtype)


def _reference_sequential_obs(target, hessian, keep, damp=0.01) -> torch.Tensor:
    """Slow OBS: prune column after column, re-inverting the remaining Hessian each time."""
    w = target.to(torch.float64).clone()
    w[:, torch.diag(hessian) == 0] = 0
    hd = _damped(hessian, damp)
    cols = w.shape[1]
    for j in range(cols):
        hinv = torch.linalg.inv(hd[j:, j:])
        for r in range(w.shape[0]):
            if not keep[r, j]:
                w[r, j:] -= (w[r, j] / hinv[0, 0]) * hinv[0, :]
    w[~keep] = 0
    return w


def _features(n: int, cols: int, seed: int, correlated: bool = True) -> torch.Tensor:
    """Random float64 inputs ``X`` [n, cols]; ``correlated`` mixes the columns."""
    gen = _gen(seed)
    x = torch.randn(n, cols, generator=gen, dtype=torch.float64)
    if correlated:
        x = x @ (
            torch.eye(cols, dtype=torch.float64)
            + torch.randn(cols, cols, generator=gen, dtype=torch.float64) * 0.5
        )
    return x


def test_obs_prune_prefix_equals_least_squares():
    rows, cols, pruned, damp = 5, 8, 3, 0.01
    x = _features(64, cols, seed=7)
    hessian = x.T @ x
    gen = _gen(8)
    signs = torch.where(torch.rand(rows, cols, generator=gen) < 0.5, -1.0, 1.0).double()
    magnitude = torch.empty(rows, cols, dtype=torch.float64)
    magnitude[:, :pruned] = 0.05 + 0.05 * torch.rand(rows, pruned, generator=gen)
    magnitude[:, pruned:] = 2.0 + torch.rand(rows, cols - pruned, generator=gen)
    target = signs * magnitude

    result, keep = obs_prune(target, hessian, pruned / cols, block_size=cols, damp=damp)

    expected_keep = torch.ones(rows, cols, dtype=torch.bool)
    expected_keep[:, :pruned] = False
    assert torch.equal(keep, expected_keep)
    assert result.dtype == torch.float32
    # Reference: min ||X_aug (w - w')||^2 with w'_pruned = 0, where X_aug^T X_aug = H + lam I.
    lam = damp * torch.diag(hessian).mean()
    x_aug = torch.cat([x, lam.sqrt() * torch.eye(cols, dtype=torch.float64)])
    for r in range(rows):
        solution = torch.linalg.lstsq(x_aug[:, pruned:], (x_aug @ target[r]).unsqueeze(1)).solution
        expected = torch.cat([torch.zeros(pruned, dtype=torch.float64), solution.squeeze(1)])
        torch.testing.assert_close(result[r].double(), expected, rtol=1e-4, atol=1e-5)
    # The correction is real: the kept weights moved away from their original values.
    assert (result[:, pruned:].double() - target[:, pruned:]).abs().max() > 1e-2


@pytest.mark.parametrize(
    ("sparsity", "pattern", "block_size", "dead"),
    [
        (0.5, None, 4, ()),
        (0.3, None, 4, ()),
        (0.6, None, 16, ()),
        (0.5, None, 5, ()),  # a last block narrower than block_size
        (0.5, None, 4, (2, 9)),  # dead inputs
        (0.0, NMPattern(2, 4), 4, ()),
        (0.0, NMPattern(2, 4), 8, (5,)),
        (0.0, NMPattern(4, 8), 8, ()),
    ],
)
def test_obs_prune_matches_sequential_reference(sparsity, pattern, block_size, dead):
    rows, cols = 6, 16
    x = _features(48, cols, seed=9)
    x[:, list(dead)] = 0
    hessian = x.T @ x
    target = torch.randn(rows, cols, generator=_gen(10), dtype=torch.float64)

    result, keep = obs_prune(target, hessian, sparsity, pattern, block_size=block_size)

    expected = _reference_sequential_obs(target, hessian, keep)
    torch.testing.assert_close(result.double(), expected, rtol=1e-4, atol=1e-4)
    assert not result[~keep].any()
    for column in dead:
        assert not result[:, column].any()


@pytest.mark.parametrize(("sparsity", "block_size"), [(0.5, 4), (0.3, 4), (0.75, 8), (0.5, 16)])
def test_obs_prune_unstructured_count_per_block(sparsity, block_size):
    rows, cols = 6, 16
    x = _features(48, cols, seed=11)
    target = torch.randn(rows, cols, generator=_gen(12))
    _, keep = obs_prune(target, x.T @ x, sparsity, block_size=block_size)
    for start in range(0, cols, block_size):
        block = keep[:, start : start + block_size]
        assert int((~block).sum()) == round(sparsity * block.numel())


@pytest.mark.parametrize("pattern", [NMPattern(2, 4), NMPattern(4, 8), NMPattern(1, 4)])
def test_obs_prune_nm_groups_exact(pattern):
    rows, cols = 6, 32
    x = _features(64, cols, seed=13)
    target = torch.randn(rows, cols, generator=_gen(14))
    result, keep = obs_prune(target, x.T @ x, 0.0, pattern, block_size=16 if pattern.m != 8 else 8)
    assert (keep.reshape(rows, -1, pattern.m).sum(-1) == pattern.n).all()
    assert ((result != 0).reshape(rows, -1, pattern.m).sum(-1) <= pattern.n).all()


@pytest.mark.parametrize(
    ("sparsity", "pattern"), [(0.5, None), (0.7, None), (0.0, NMPattern(2, 4))]
)
def test_obs_prune_task_vector_beats_magnitude(sparsity, pattern):
    rows, cols = 16, 32
    x = _features(256, cols, seed=15).float()
    base = torch.randn(rows, cols, generator=_gen(16))
    finetuned = base + 0.1 * torch.randn(rows, cols, generator=_gen(17))
    task_vector = finetuned - base

    pruned_obs, keep = obs_prune(task_vector, x.T @ x, sparsity, pattern, block_size=16)
    mag_keep = magnitude_mask(task_vector, sparsity, pattern)
    pruned_mag = task_vector * mag_keep

    assert (~keep).sum() == (~mag_keep).sum()
    err_obs = torch.linalg.norm(x @ (task_vector - pruned_obs).T)
    err_mag = torch.linalg.norm(x @ (task_vector - pruned_mag).T)
    assert err_obs < err_mag


def test_obs_prune_reuses_inverse_factor():
    x = _features(32, 8, seed=18)
    hessian = x.T @ x
    target = torch.randn(4, 8, generator=_gen(19))
    direct = obs_prune(target, hessian, 0.5, block_size=4)
    reused = obs_prune(
        target, hessian, 0.5, block_size=4, hinv_upper=damped_inverse_cholesky(hessian)
    )
    torch.testing.assert_close(direct[0], reused[0])
    assert torch.equal(direct[1], reused[1])


# --------------------------------------------------------------------------- OBS edge cases


def test_obs_prune_dead_columns_are_zero_and_finite():
    rows, cols = 4, 8
    x = _features(32, cols, seed=20)
    x[:, [0, 3, 7]] = 0
    target = torch.randn(rows, cols, generator=_gen(21))
    for sparsity in (0.0, 0.25, 0.5):
        result, keep = obs_prune(target, x.T @ x, sparsity, block_size=4)
        assert torch.isfinite(result).all()
        assert not result[:, [0, 3, 7]].any()
        assert torch.isfinite(damped_inverse_cholesky(x.T @ x)).all()
    # All-dead Hessian: nothing to learn from, everything zero, still finite.
    result, _ = obs_prune(target, torch.zeros(cols, cols), 0.5, block_size=4)
    assert torch.isfinite(result).all() and not result.any()


def test_obs_prune_retries_cholesky_with_more_damping(caplog):
    cols = 4
    hessian = torch.eye(cols, dtype=torch.float64)
    hessian[:2, :2] = torch.tensor([[1.0, 1.5], [1.5, 1.0]])  # eigenvalues -0.5 and 2.5
    target = torch.randn(3, cols, generator=_gen(22))
    with caplog.at_level(logging.WARNING, logger=CORE_LOGGER):
        result, keep = obs_prune(target, hessian, 0.5, block_size=cols)
    failures = [r for r in caplog.records if "Cholesky failed" in r.getMessage()]
    assert len(failures) == 2  # 0.01 and 0.1 x mean(diag) fail, 1.0 succeeds
    assert all(r.levelno == logging.WARNING for r in failures)
    assert torch.isfinite(result).all()
    # Same answer as asking for the sufficient damping directly.
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger=CORE_LOGGER):
        direct, direct_keep = obs_prune(target, hessian, 0.5, block_size=cols, damp=1.0)
    assert not caplog.records
    torch.testing.assert_close(result, direct)
    assert torch.equal(keep, direct_keep)
    expected = _reference_sequential_obs(target, hessian, keep, damp=1.0)
    torch.testing.assert_close(result.double(), expected, rtol=1e-4, atol=1e-5)


def test_obs_prune_nan_hessian_raises():
    with pytest.raises(RuntimeError, match="not positive definite.*NaN"):
        obs_prune(torch.randn(3, 4), torch.full((4, 4), float("nan")), 0.5)


@pytest.mark.parametrize(
    ("target_shape", "hessian_shape", "kwargs", "message"),
    [
        ((4, 8), (6, 6), {}, "shape mismatch"),
        ((4, 8), (8, 6), {}, "shape mismatch"),
        ((4, 8), (8,), {}, "shape mismatch"),
        ((4, 10), (10, 10), {"pattern": NMPattern(2, 4)}, "multiple of 4"),
        ((4, 16), (16, 16), {"pattern": NMPattern(4, 8), "block_size": 4}, "block_size 4"),
    ],
)
def test_obs_prune_rejects_bad_shapes(target_shape, hessian_shape, kwargs, message):
    with pytest.raises(ValueError, match=message):
        obs_prune(torch.randn(target_shape), torch.ones(hessian_shape), 0.5, **kwargs)
