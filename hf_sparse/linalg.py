"""Linear algebra shared by the methods that solve with a layer-input Hessian (SparseGPT's OBS
solver, SparseGPT-pruned task vectors, OBS saliency): damping before Cholesky, with retries."""

from __future__ import annotations

import logging

import torch

logger = logging.getLogger(__name__)


def damped_inverse_cholesky(
    hessian: torch.Tensor, damp: float = 0.01, max_tries: int = 6
) -> torch.Tensor:
    """Upper Cholesky factor of ``(H + λI)^-1`` with ``λ = damp * mean(diag H)``.

    Dead inputs (zero diagonal) get a unit diagonal. When the factorisation fails the
    damping grows tenfold, up to ``max_tries`` times, with a warning each time.
    """
    h = hessian.to(torch.float64 if hessian.dtype == torch.float64 else torch.float32).clone()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1.0
    mean_diag = torch.diag(h).mean()
    eye = torch.eye(h.shape[0], dtype=h.dtype, device=h.device)
    for attempt in range(max_tries):
        lam = damp * (10**attempt) * mean_diag
        chol, info = torch.linalg.cholesky_ex(h + lam * eye)
        if int(info) == 0:
            inverse = torch.cholesky_inverse(chol)
            upper, info = torch.linalg.cholesky_ex(inverse, upper=True)
            if int(info) == 0:
                return upper
        logger.warning(
            "Cholesky failed with damping %.3g; retrying with %.3g", float(lam), float(lam) * 10
        )
    raise RuntimeError(
        f"Hessian is not positive definite even with damping {damp * 10 ** (max_tries - 1)} x "
        "mean(diag): check the calibration data (NaN/inf activations?)"
    )


GRAM_MIN_WIDTH = 512  # below this the one product is as fast as the blocks
GRAM_BLOCKS = 4


def gram(rows: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """``rows^T rows`` (``[d, d]``) from its upper block triangle only, mirrored: for wide
    inputs ``(k + 1) / 2k`` of the product's FLOPs (k = ``GRAM_BLOCKS``), and exactly
    symmetric. ``out`` given: the product is added to it instead (``out += rows^T rows``)."""
    width = rows.shape[1]
    if width < GRAM_MIN_WIDTH:
        if out is None:
            return rows.t() @ rows
        return out.addmm_(rows.t(), rows)
    result = out if out is not None else torch.zeros(width, width, dtype=rows.dtype,
                                                     device=rows.device)  # fmt: skip
    step = -(-width // GRAM_BLOCKS)
    for start in range(0, width, step):
        end = min(start + step, width)
        strip = rows[:, start:end].t() @ rows[:, start:]  # [block, width - start]
        result[start:end, start:].add_(strip)
        result[end:, start:end].add_(strip[:, end - start :].t())
    return result
