"""Dynamic rank at inference: use only a prefix of each basis.

The basis directions of a group come ordered by singular value (Basis Sharing, ICLR 2025, keeps
``k`` of them), so a prefix of ``r <= k`` directions is the best rank-``r`` truncation in the
whitened space. Strategies (a registry, ``STRATEGIES``):

- ``baseline``: the full ``k``.
- ``global_static``: per basis, the smallest ``r`` whose singular values hold ``energy`` of
  ``sum(sigma^2)``, fixed for every input.
- ``prompt_adaptive``: per sequence and layer, the smallest prefix holding ``energy`` of that
  sequence's own output energy ``||C_j||^2 * sum_t z_tj^2`` (``z = x B^T``). For a perplexity
  window the "prompt" is the whole window, so the choice sees the window's tokens (a count per
  layer, not their values); for generation it is chosen at prefill.

Usage::

    with dynamic_rank(model, "prompt_adaptive", energy=0.95) as report:
        perplexity(model, windows)
    report.mean_fraction  # average active rank / k
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
from torch import nn

from .layer import BasisSharingLayer


@dataclass
class RankReport:
    """Active ranks seen while the context was open (one entry per layer call and sequence)."""

    strategy: str
    energy: float
    active: list[int] = field(default_factory=list)
    full: list[int] = field(default_factory=list)

    @property
    def mean_rank(self) -> float:
        return sum(self.active) / max(len(self.active), 1)

    @property
    def mean_fraction(self) -> float:
        """Average of active / full rank over the layer calls (and sequences)."""
        pairs = zip(self.active, self.full, strict=True)
        return sum(a / f for a, f in pairs) / max(len(self.active), 1)

    @property
    def parameter_fraction(self) -> float:
        """Share of the factor entries used, weighting each call by its full rank."""
        return sum(self.active) / max(sum(self.full), 1)

    def to_dict(self) -> dict:
        return {
            "strategy": self.strategy,
            "energy": self.energy,
            "mean_rank": self.mean_rank,
            "mean_fraction": self.mean_fraction,
            "parameter_fraction": self.parameter_fraction,
            "calls": len(self.active),
        }


def _prefix_mask(z: torch.Tensor, ranks: torch.Tensor) -> torch.Tensor:
    """Zero ``z[b, ..., r_b:]`` for each sequence ``b``."""
    k = z.shape[-1]
    keep = torch.arange(k, device=z.device) < ranks.view(-1, *([1] * (z.ndim - 1)))
    return z * keep.to(z.dtype)


def _cumulative_rank(values: torch.Tensor, energy: float) -> torch.Tensor:
    """Per row of ``values`` (``[b, k]``, >= 0): smallest prefix holding ``energy`` of the sum."""
    total = values.sum(-1, keepdim=True).clamp_min(torch.finfo(values.dtype).tiny)
    cumulative = values.cumsum(-1) / total
    return ((cumulative < energy - 1e-7).sum(-1) + 1).clamp(max=values.shape[-1])


def _baseline(energy: float, model: nn.Module, report: RankReport) -> Callable:
    def policy(layer: BasisSharingLayer, adapter: str, z: torch.Tensor) -> torch.Tensor:
        batch = z.shape[0] if z.ndim > 2 else 1
        report.active.extend([z.shape[-1]] * batch)
        report.full.extend([z.shape[-1]] * batch)
        return z

    return policy


def _global_static(energy: float, model: nn.Module, report: RankReport) -> Callable:
    cache: dict[tuple[str, str], int] = {}

    def policy(layer: BasisSharingLayer, adapter: str, z: torch.Tensor) -> torch.Tensor:
        key = (adapter, layer.basis_sharing_key[adapter])
        if key not in cache:
            sigma = _sigmas(model, adapter)[key[1]].double()
            cache[key] = int(_cumulative_rank(sigma.pow(2)[None], energy)[0])
        r, k = cache[key], z.shape[-1]
        batch = z.shape[0] if z.ndim > 2 else 1
        report.active.extend([r] * batch)
        report.full.extend([k] * batch)
        out = z.clone()
        out[..., r:] = 0
        return out

    return policy


def _prompt_adaptive(energy: float, model: nn.Module, report: RankReport) -> Callable:
    chosen: dict[int, torch.Tensor] = {}  # id(layer) -> ranks chosen at the last prompt

    def policy(layer: BasisSharingLayer, adapter: str, z: torch.Tensor) -> torch.Tensor:
        seq = z if z.ndim > 2 else z[None]
        previous = chosen.get(id(layer))
        if seq.shape[1] == 1 and previous is not None and previous.numel() == seq.shape[0]:
            ranks = previous  # a decoding step: keep the rank its prompt chose
        else:
            column = layer.basis_sharing_coefficient[adapter].detach().double().pow(2).sum(0)
            flat = seq.detach().double().reshape(seq.shape[0], -1, seq.shape[-1])
            contribution = flat.pow(2).sum(1) * column  # [b, k]
            ranks = _cumulative_rank(contribution, energy)
            chosen[id(layer)] = ranks
        report.active.extend(ranks.tolist())
        report.full.extend([z.shape[-1]] * seq.shape[0])
        return _prefix_mask(seq, ranks).reshape(z.shape)

    return policy


STRATEGIES: dict[str, Callable[[float, nn.Module, RankReport], Callable]] = {
    "baseline": _baseline,
    "global_static": _global_static,
    "prompt_adaptive": _prompt_adaptive,
}


def _sigmas(model: nn.Module, adapter: str):
    for module in model.modules():
        bank = getattr(module, "_modules", {}).get("basis_sharing_sigmas")
        if bank is not None and adapter in bank:
            return bank[adapter]
    raise ValueError("no basis_sharing singular values found; is this a basis_sharing model?")


def static_fraction(model: nn.Module, energy: float, adapter: str = "default") -> float:
    """Mean ``r / k`` over the compressed layers that ``global_static`` at ``energy`` keeps,
    computed from the singular values alone (no forward pass)."""
    sigmas = _sigmas(model, adapter)
    layers = [m for m in model.modules() if isinstance(m, BasisSharingLayer)]
    fractions = []
    for layer in layers:
        sigma = sigmas[layer.basis_sharing_key[adapter]].double()
        fractions.append(int(_cumulative_rank(sigma.pow(2)[None], energy)[0]) / sigma.numel())
    return sum(fractions) / len(fractions)


def energy_for_fraction(
    model: nn.Module, fraction: float, adapter: str = "default", steps: int = 40
) -> float:
    """The ``global_static`` energy whose mean kept fraction is closest to ``fraction`` from
    below (bisection): the same rank budget as another strategy, e.g. ``prompt_adaptive``."""
    low, high = 1e-6, 1.0
    for _ in range(steps):
        middle = (low + high) / 2
        if static_fraction(model, middle, adapter) <= fraction:
            low = middle
        else:
            high = middle
    return low


@contextlib.contextmanager
def dynamic_rank(
    model: nn.Module, strategy: str = "baseline", energy: float = 0.95
) -> Iterator[RankReport]:
    """Run ``model``'s compressed layers with a rank strategy inside the block."""
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {sorted(STRATEGIES)}, got {strategy!r}")
    if isinstance(energy, bool) or not isinstance(energy, int | float) or not 0 < energy <= 1:
        raise ValueError(f"energy must be in (0, 1], got {energy!r}; e.g. 0.95")
    layers = [m for m in model.modules() if isinstance(m, BasisSharingLayer)]
    if not layers:
        raise ValueError("the model has no basis_sharing layers")
    report = RankReport(strategy, float(energy))
    policy = STRATEGIES[strategy](float(energy), model, report)
    for layer in layers:
        layer.basis_sharing_rank_policy = policy
    try:
        yield report
    finally:
        for layer in layers:
            layer.basis_sharing_rank_policy = None
