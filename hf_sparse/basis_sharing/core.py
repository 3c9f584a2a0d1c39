"""Basis Sharing maths on plain tensors: whitening, grouped SVD, rank formula, refits.

Reference: Wang et al., "Basis Sharing: Cross-Layer Parameter Sharing for Large Language Model
Compression", ICLR 2025. The per-layer special case (a group of one layer) is SVD-LLM's
truncation-aware whitened SVD (Wang et al., "SVD-LLM: Truncation-aware Singular Value
Decomposition for Large Language Model Compression", ICLR 2025).

Layout: every weight is ``[out, in]`` (``y = x W^T``). The ``n`` layers of a group read inputs of
the same width, so their weights are stacked along the *output* axis; the SVD of the stacked,
whitened matrix gives one basis ``B`` (``[k, in]``, acting on the input and shared by the group)
and per-layer coefficients ``C_i`` (``[out_i, k]``): ``W_i ≈ C_i B`` and ``y_i = (x B^T) C_i^T``.

With ``X^T X = L L^T`` (``X`` summed over the group's layers), ``||X (W - C B)^T||_F`` equals
``||(W L) - C (B L)||_F``, so the truncated SVD of ``[W_1 L; ...; W_n L] = U S V^T`` is optimal:
``B = S_k V_k^T L^{-1}`` and ``C_i`` = the rows of ``U_k`` belonging to layer ``i``.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch

logger = logging.getLogger(__name__)


def compression_rank(d_in: int, d_out: int, n_layers: int, ratio: float) -> int:
    """Rank ``k`` that removes ``ratio`` of the parameters of ``n_layers`` ``[d_out, d_in]``
    matrices sharing one basis: ``k = floor((1 - ratio) * d1 * d2 * n / (d1 + d2 * n))``.

    ``d1 = d_in`` (the shared basis is ``k x d1``), ``d2 = d_out`` (each coefficient is
    ``d2 x k``). Basis Sharing (ICLR 2025), Sec. 3.
    """
    if isinstance(ratio, bool) or not isinstance(ratio, int | float) or not 0 < ratio < 1:
        raise ValueError(f"ratio must be in (0, 1), got {ratio!r}; e.g. 0.2 removes 20%")
    for name, value in (("d_in", d_in), ("d_out", d_out), ("n_layers", n_layers)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    exact = (1.0 - float(ratio)) * d_in * d_out * n_layers / (d_in + d_out * n_layers)
    return math.floor(round(exact, 9))  # 0.8 * ... = 1637.9999999 must floor to 1638


def max_rank(d_in: int, d_out: int, n_layers: int) -> int:
    """The rank of the stacked ``[n * d_out, d_in]`` matrix cannot exceed ``min(d_in, n*d_out)``."""
    return min(d_in, n_layers * d_out)


def whitening_factor(xtx: torch.Tensor, damping: float = 1e-4, max_tries: int = 6) -> torch.Tensor:
    """Lower Cholesky factor ``L`` (float64) with ``L L^T = X^T X + λ I``.

    ``λ = damping * mean(diag X^T X)``; dead inputs (zero diagonal) get a unit diagonal. When
    the factorisation fails the damping grows tenfold (a jitter retry), up to ``max_tries``.
    The reference code adds the most negative eigenvalue instead; a relative jitter is cheaper
    and keeps ``λ`` meaningful across layers.
    """
    if xtx.ndim != 2 or xtx.shape[0] != xtx.shape[1]:
        raise ValueError(f"xtx must be a square [in, in] matrix, got {tuple(xtx.shape)}")
    if not torch.isfinite(xtx).all():
        raise ValueError("xtx holds NaN/inf: check the calibration activations")
    h = xtx.to(torch.float64).clone()
    h = 0.5 * (h + h.t())
    dead = torch.diag(h) == 0
    h[dead, dead] = 1.0
    mean_diag = torch.diag(h).mean().clamp_min(1e-12)
    eye = torch.eye(h.shape[0], dtype=h.dtype, device=h.device)
    for attempt in range(max_tries):
        # damping 0: try the exact factor first, then a tiny jitter
        scale = damping if damping > 0 else (0.0 if attempt == 0 else 1e-10)
        lam = scale * (10**attempt) * mean_diag
        chol, info = torch.linalg.cholesky_ex(h + lam * eye)
        if int(info) == 0:
            return chol
        logger.warning("Cholesky of X^T X failed with damping %.3g; retrying larger", float(lam))
    raise RuntimeError(
        f"X^T X is not positive definite even with damping {damping * 10 ** (max_tries - 1)} x "
        "mean(diag): check the calibration data (NaN/inf activations?)"
    )


@dataclass
class SharedFactors:
    """One group's factorisation: ``W_i ≈ coefficients[i] @ basis``."""

    basis: torch.Tensor  # [k, in], float64
    coefficients: list[torch.Tensor]  # [out_i, k] per layer, float64
    singular_values: torch.Tensor  # [k], of the stacked whitened matrix (descending)

    @property
    def rank(self) -> int:
        return self.basis.shape[0]


def shared_basis_svd(
    weights: list[torch.Tensor], rank: int, whitening: torch.Tensor | None = None
) -> SharedFactors:
    """Grouped (whitened) SVD: one basis for all ``weights`` (each ``[out_i, in]``).

    ``whitening`` is the lower factor ``L`` of ``whitening_factor`` (None = plain SVD). One
    weight = per-layer truncation (SVD-LLM with whitening, plain SVD without).
    """
    if not weights:
        raise ValueError("weights is empty: a group needs at least one layer")
    d_in = weights[0].shape[1]
    if any(w.ndim != 2 or w.shape[1] != d_in for w in weights):
        shapes = [tuple(w.shape) for w in weights]
        raise ValueError(f"weights of a group must all be [out, {d_in}], got {shapes}")
    limit = min(d_in, sum(w.shape[0] for w in weights))
    if not isinstance(rank, int) or not 1 <= rank <= limit:
        raise ValueError(
            f"rank must be an integer in [1, min(d_in, n*d_out)] = [1, {limit}], got {rank!r}; "
            "raise the compression ratio or use a smaller group"
        )
    stacked = torch.cat([w.to(torch.float64) for w in weights], dim=0)
    if whitening is not None:
        whitening = whitening.to(device=stacked.device, dtype=torch.float64)
        if whitening.shape != (d_in, d_in):
            raise ValueError(f"whitening must be [{d_in}, {d_in}], got {tuple(whitening.shape)}")
        stacked = stacked @ whitening
    u, s, vh = torch.linalg.svd(stacked, full_matrices=False)
    u, s, vh = u[:, :rank], s[:rank], vh[:rank]
    basis = s[:, None] * vh  # [k, in] in whitened coordinates
    if whitening is not None:
        # B = S V^T L^{-1}  <=>  L^T B^T = V S
        basis = torch.linalg.solve_triangular(whitening.t(), basis.t(), upper=True).t()
    coefficients = list(u.split([w.shape[0] for w in weights], dim=0))
    return SharedFactors(basis, [c.contiguous() for c in coefficients], s)


def refit_coefficients(
    weight: torch.Tensor,
    basis: torch.Tensor,
    xtx: torch.Tensor,
    damping: float = 1e-6,
) -> torch.Tensor:
    """Least-squares coefficients for a fixed basis: ``argmin_C ||X W^T - X B^T C^T||_F``.

    ``C = W G B^T (B G B^T)^{-1}`` with ``G = X^T X`` collected at the *compressed* model's
    inputs (Basis Sharing, Sec. 3.3, "coefficient update"); ``[out, k]``, float64.
    """
    g = xtx.to(torch.float64)
    b = basis.to(torch.float64)
    w = weight.to(torch.float64)
    if b.shape[1] != g.shape[0] or w.shape[1] != g.shape[0]:
        raise ValueError(
            f"shapes do not fit: weight {tuple(w.shape)}, basis {tuple(b.shape)}, "
            f"xtx {tuple(g.shape)}"
        )
    gram = b @ g @ b.t()  # statistics of the basis outputs z = x B^T
    cross = w @ g @ b.t()
    mean_diag = torch.diag(gram).mean().clamp_min(1e-12)
    eye = torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)
    for attempt in range(6):
        chol, info = torch.linalg.cholesky_ex(gram + damping * (10**attempt) * mean_diag * eye)
        if int(info) == 0:
            return torch.cholesky_solve(cross.t(), chol).t()
    raise RuntimeError("B X^T X B^T is singular even with damping; check the calibration data")


def whitened_error(weight: torch.Tensor, approx: torch.Tensor, xtx: torch.Tensor) -> float:
    """Relative output error ``||X (W - A)^T||_F^2 / ||X W^T||_F^2`` from ``X^T X`` alone.

    Equals ``||(W - A) L||_F^2 / ||W L||_F^2`` for ``X^T X = L L^T`` (the whitened error that the
    truncation minimises), computed as ``tr(E G E^T) / tr(W G W^T)`` without a Cholesky.
    """
    g = xtx.to(torch.float64)
    w = weight.to(torch.float64)
    a = approx.to(device=w.device, dtype=torch.float64)
    if w.shape != a.shape or w.shape[1] != g.shape[0]:
        raise ValueError(
            f"shapes do not fit: weight {tuple(w.shape)}, approx {tuple(a.shape)}, "
            f"xtx {tuple(g.shape)}"
        )
    e = w - a
    total = float(((w @ g) * w).sum())
    return float(((e @ g) * e).sum()) / total if total > 0 else 0.0


def energy_rank(values: torch.Tensor, energy: float) -> int:
    """Smallest ``r`` with ``sum(values[:r]) >= energy * sum(values)`` (values >= 0, in order)."""
    if not 0 < energy <= 1:
        raise ValueError(f"energy must be in (0, 1], got {energy!r}")
    total = values.sum()
    if total <= 0:
        return 1
    cumulative = values.cumsum(0) / total
    return int(min(int((cumulative < energy - 1e-12).sum()) + 1, values.numel()))
