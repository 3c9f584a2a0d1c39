"""Published improvements to the mask-only pruners (magnitude, Wanda), on plain tensors.

- RIA: Zhang et al., "Plug-and-Play: An Efficient Post-training Pruning Method for Large
  Language Models", ICLR 2024. Relative importance ``|W_ij| / sum_k |W_kj| + |W_ij| /
  sum_k |W_ik|`` (a weight against its input column and its output row) times the activation
  term ``||X_j||^a`` with ``a = 0.5``; compared over the whole layer (N:M: within each group).
- DSnoT: Zhang et al., "Dynamic Sparse No Training: Training-Free Fine-tuning for Sparse
  LLMs", ICLR 2024. After a mask is chosen, each output row swaps one pruned weight back in and
  one kept weight out per round, to drive the expected output error
  ``e_i = sum_j (1 - M_ij) W_ij E[x_j]`` towards zero: grow the pruned weight that cancels most
  of ``e_i``, prune the least important kept weight (Wanda score) whose removal does not push
  ``e_i`` back past zero; a row stops when a swap no longer reduces ``|e_i|``. The weights keep
  their dense values; only the mask moves, so no weight is updated and the count is unchanged.
"""

from __future__ import annotations

import torch

from .core import NMPattern, _check_nm_columns

RIA_ACTIVATION_POWER = 0.5


def ria_scores(weight: torch.Tensor, input_sq_norms: torch.Tensor) -> torch.Tensor:
    """RIA: ``(|W_ij|/sum_k|W_kj| + |W_ij|/sum_k|W_ik|) * ||X_j||^0.5``; ``input_sq_norms``
    are the summed squares of each input column (``||X_j||^2``)."""
    if input_sq_norms.shape != (weight.shape[1],):
        raise ValueError(
            f"shape mismatch: input norms have shape {tuple(input_sq_norms.shape)}, "
            f"expected ({weight.shape[1]},) for a weight of shape {tuple(weight.shape)}"
        )
    w = weight.detach().abs().float()
    tiny = torch.finfo(torch.float32).tiny
    relative = w / w.sum(0, keepdim=True).clamp_min(tiny) + w / w.sum(1, keepdim=True).clamp_min(
        tiny
    )
    activation = input_sq_norms.float().clamp_min(0).pow(RIA_ACTIVATION_POWER / 2)
    return relative * activation.unsqueeze(0)


@torch.no_grad()
def dsnot_refine(
    weight: torch.Tensor,
    keep: torch.Tensor,
    input_means: torch.Tensor,
    input_sq_norms: torch.Tensor,
    iterations: int = 50,
    pattern: NMPattern | None = None,
) -> torch.Tensor:
    """DSnoT mask refinement of one layer; returns a new keep-mask with the same count per row
    (N:M: per group). ``input_means`` = ``E[x_j]``, ``input_sq_norms`` = ``sum_t x_j^2``."""
    w = weight.detach().float()
    rows, cols = w.shape
    if keep.shape != w.shape:
        raise ValueError(f"mask shape {tuple(keep.shape)} != weight shape {tuple(w.shape)}")
    for vector, label in ((input_means, "input_means"), (input_sq_norms, "input_sq_norms")):
        if vector.shape != (cols,):
            raise ValueError(f"{label} has shape {tuple(vector.shape)}, expected ({cols},)")
    if pattern is not None:
        _check_nm_columns(cols, pattern)
    keep = keep.clone()
    contribution = w * input_means.float().to(w.device).unsqueeze(0)  # W_ij E[x_j]
    importance = w.abs() * input_sq_norms.float().to(w.device).clamp_min(0).sqrt().unsqueeze(0)
    error = (contribution * (~keep)).sum(1)  # dense - sparse mean output, per row
    active = torch.ones(rows, dtype=torch.bool, device=w.device)
    arange = torch.arange(rows, device=w.device)
    inf = torch.tensor(float("inf"), device=w.device)
    for _ in range(iterations):
        if not bool(active.any()):
            break
        sign = torch.sign(error).unsqueeze(1)
        # grow: the pruned weight whose contribution cancels most of the error
        gain = torch.where(~keep, contribution * sign, -inf)
        grow = gain.argmax(1)
        after_grow = error - contribution[arange, grow]
        # prune: least important kept weight whose removal keeps moving the error towards 0
        candidates = keep.clone()
        if pattern is not None:
            group = torch.arange(cols, device=w.device) // pattern.m
            candidates &= group.unsqueeze(0) == (grow // pattern.m).unsqueeze(1)
        toward = torch.sign(contribution) != torch.sign(after_grow).unsqueeze(1)
        score = torch.where(candidates & toward, importance, inf)
        fallback = torch.where(candidates, importance, inf)
        none_toward = torch.isinf(score.min(1).values)
        score = torch.where(none_toward.unsqueeze(1), fallback, score)
        prune = score.argmin(1)
        new_error = after_grow + contribution[arange, prune]
        accept = active & (new_error.abs() < error.abs()) & torch.isfinite(gain.max(1).values)
        accept &= ~torch.isinf(score.min(1).values)
        if not bool(accept.any()):
            break
        rows_ok = arange[accept]
        keep[rows_ok, grow[accept]] = True
        keep[rows_ok, prune[accept]] = False
        error = torch.where(accept, new_error, error)
        active = accept
    return keep
