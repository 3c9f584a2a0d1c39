"""SPD maths on plain tensors: components, causal-importance gates, masks and the four losses.

From "Stochastic Parameter Decomposition" (Bushnaq, Braun, Sharkey et al., 2025). A weight
``W`` (``[d_out, d_in]``) is written as ``U @ V`` with ``U: [d_out, C]`` and ``V: [C, d_in]``,
so subcomponent ``c`` is the rank-one matrix ``U[:, c] V[c, :]`` and its inner activation on an
input ``x`` is ``V[c, :] . x``. A tiny MLP per subcomponent maps the inner activation to a
causal importance ``g_c(x)`` through a leaky hard sigmoid; training draws masks
``m = g + (1 - g) r`` (``r ~ U(0, 1)``) and asks the masked model to reproduce the target.

Nothing here knows about modules, PEFT or Trainer: tensors in, tensors out.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

DEFAULT_LEAK = 0.01  # slope of the leaky side of the hard sigmoids (the paper's 0.01)
P_EPS = 1e-12  # keeps the gradient of g**p finite at g = 0 when p < 1


class _LowerLeakyHardSigmoid(torch.autograd.Function):
    """Forward ``clamp(x, 0, 1)``; backward 1 inside, 0 above 1, and below 0 a slope ``leak``
    for gradients that ask for a larger value only (``grad < 0``)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, leak: float) -> torch.Tensor:
        ctx.save_for_backward(x)
        ctx.leak = leak
        return x.clamp(0.0, 1.0)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        (x,) = ctx.saved_tensors
        below = torch.where(grad < 0, ctx.leak * grad, torch.zeros_like(grad))
        inside = torch.where(x <= 1, grad, torch.zeros_like(grad))
        return torch.where(x <= 0, below, inside), None


def lower_leaky_hard_sigmoid(x: torch.Tensor, leak: float = DEFAULT_LEAK) -> torch.Tensor:
    """Hard sigmoid whose gradient leaks below 0 (SPD's ``sigma_H,lower``), in one direction.

    Used for the causal importances that build the masks. The value is clamped to ``[0, 1]``
    so masks stay in ``[0, 1]``. A shut gate (pre-activation <= 0) still receives ``leak``
    times a reconstruction gradient that asks to switch it on, so a component that is needed
    can come back; a gradient that would push it further below 0 is dropped, so shut gates do
    not drift ever more negative (the reference implementation's rule, goodfire-ai/spd
    ``LowerLeakyHardSigmoidFunction``).
    """
    return _LowerLeakyHardSigmoid.apply(x, leak)


def upper_leaky_hard_sigmoid(x: torch.Tensor, leak: float = DEFAULT_LEAK) -> torch.Tensor:
    """Hard sigmoid that leaks above 1 (SPD's ``sigma_H,upper``): ``0`` below 0, ``x`` in
    ``[0, 1]``, ``1 + leak (x - 1)`` above.

    Used for the importance-minimality penalty: a gate pushed past 1 still costs (and is
    pulled back), and a shut gate (pre-activation < 0) gets no gradient from the penalty.
    """
    return torch.where(x > 1, 1 + leak * (x - 1), x.clamp(0.0, 1.0))


def inner_acts(x: torch.Tensor, V: torch.Tensor) -> torch.Tensor:
    """``V[c, :] . x`` for every subcomponent: ``[..., d_in] -> [..., C]``."""
    return x @ V.t()


def gate_mlp(
    inner: torch.Tensor,
    w1: torch.Tensor,
    b1: torch.Tensor,
    w2: torch.Tensor,
    b2: torch.Tensor,
) -> torch.Tensor:
    """Pre-activation of the per-subcomponent gate MLPs (scalar -> hidden -> scalar, GELU).

    ``inner: [..., C]``, ``w1, b1, w2: [C, H]``, ``b2: [C]`` -> ``[..., C]``. Each subcomponent
    has its own MLP and sees only its own inner activation (the paper's ``Gamma_c``).
    """
    hidden = F.gelu(inner.unsqueeze(-1) * w1 + b1)
    return (hidden * w2).sum(-1) + b2


def causal_importances(
    pre: torch.Tensor, leak: float = DEFAULT_LEAK
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(g_lower, g_upper)``: equal in ``[0, 1]``; they differ in their leaks (above)."""
    return lower_leaky_hard_sigmoid(pre, leak), upper_leaky_hard_sigmoid(pre, leak)


def stochastic_mask(ci: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """``m = g + (1 - g) r`` with ``r ~ U(0, 1)`` elementwise: important components are kept,
    unimportant ones are scaled at random, so ablating them must not matter."""
    r = torch.rand(ci.shape, generator=generator, dtype=ci.dtype, device=ci.device)
    return ci + (1 - ci) * r


def component_output(
    x: torch.Tensor,
    U: torch.Tensor,
    V: torch.Tensor,
    mask: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    delta: torch.Tensor | None = None,
    delta_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """``sum_c m_c (V[c] . x) U[:, c] (+ delta_mask * delta @ x) + bias``.

    ``mask`` broadcasts against ``[..., C]`` (None = all ones); ``delta`` is the ``[d_out,
    d_in]`` residual ``W - U V`` and ``delta_mask`` broadcasts against ``[...]`` (None = 1).
    """
    acts = inner_acts(x, V)
    if mask is not None:
        acts = acts * mask
    out = acts @ U.t()
    if delta is not None:
        delta_out = x @ delta.t()
        if delta_mask is not None:
            delta_out = delta_out * delta_mask.unsqueeze(-1)
        out = out + delta_out
    if bias is not None:
        out = out + bias
    return out


def weight_delta(weight: torch.Tensor, U: torch.Tensor, V: torch.Tensor) -> torch.Tensor:
    """The delta component ``W - U V`` (gradient flows into ``U`` and ``V``)."""
    return weight - U @ V


def faithfulness_loss(
    weights: Sequence[torch.Tensor], Us: Sequence[torch.Tensor], Vs: Sequence[torch.Tensor]
) -> torch.Tensor:
    """Mean squared difference between the target weights and ``U V``, over all entries of all
    decomposed matrices (the paper's L_faithfulness)."""
    if not (len(weights) == len(Us) == len(Vs)) or not weights:
        raise ValueError(
            "faithfulness_loss needs one (weight, U, V) triple per layer, at least one"
        )
    total = sum(((w - u @ v) ** 2).sum() for w, u, v in zip(weights, Us, Vs, strict=True))
    count = sum(w.numel() for w in weights)
    return total / count


def importance_minimality_loss(
    ci_upper: Sequence[torch.Tensor], p: float, eps: float = P_EPS
) -> torch.Tensor:
    """``sum_layers sum_c mean_batch (g_c + eps)**p`` (the paper's L_importance-minimality).

    ``ci_upper`` holds one ``[..., C]`` tensor per layer (from the upper-leaky sigmoid).
    """
    check_pnorm(p)
    if not ci_upper:
        raise ValueError("importance_minimality_loss needs at least one layer's importances")
    total = 0.0
    for ci in ci_upper:
        per_item = ((ci + eps) ** p).sum(-1)
        total = total + per_item.mean()
    return total


def check_pnorm(p: float) -> None:
    if isinstance(p, bool) or not isinstance(p, int | float) or not math.isfinite(p) or p <= 0:
        raise ValueError(
            f"pnorm (p) must be a finite number > 0, got {p!r}; the paper uses p in [0.9, 2]"
        )


def mse_loss(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared error over all entries (toy models)."""
    return ((output - target) ** 2).mean()


def kl_loss(
    logits: torch.Tensor, target_logits: torch.Tensor, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """``KL(target || output)`` per position over the last (vocabulary) axis, averaged over the
    positions where ``mask`` is true (language models)."""
    target_logp = F.log_softmax(target_logits.float(), dim=-1)
    logp = F.log_softmax(logits.float(), dim=-1)
    kl = (target_logp.exp() * (target_logp - logp)).sum(-1)
    if mask is None:
        return kl.mean()
    mask = mask.to(kl.dtype)
    return (kl * mask).sum() / mask.sum().clamp_min(1)


RECON_LOSSES = {"mse": mse_loss, "kl": kl_loss}


def recon_loss(
    kind: str, output: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Reconstruction loss by name: ``mse`` (toy models) or ``kl`` (language models)."""
    if kind not in RECON_LOSSES:
        raise ValueError(f"output_loss must be one of {sorted(RECON_LOSSES)}, got {kind!r}")
    if kind == "kl":
        return kl_loss(output, target, mask)
    return mse_loss(output, target)


def importance_coeff_at(
    step: int,
    total_steps: int,
    start: float,
    final: float,
    start_frac: float = 0.0,
    end_frac: float = 1.0,
) -> float:
    """The importance-minimality coefficient at ``step``: ``start`` until ``start_frac`` of the
    run, then linear to ``final`` at ``end_frac``, then ``final``."""
    if total_steps <= 0 or start == final:
        return final
    progress = step / total_steps
    if progress <= start_frac:
        return start
    if progress >= end_frac or end_frac <= start_frac:
        return final
    t = (progress - start_frac) / (end_frac - start_frac)
    return start + t * (final - start)
