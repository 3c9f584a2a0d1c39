"""Dynamic rank at inference: run each compressed layer on only some of its basis directions.

The directions of a group's basis come ordered by singular value (Basis Sharing, ICLR 2025,
keeps ``k`` of them), so a prefix of ``r <= k`` directions is the best rank-``r`` truncation in
the whitened space. With ``B = S V^T L^{-1}`` the basis outputs ``z = x B^T`` have second moment
``S^2`` on the group's calibration data, so direction ``j`` carries about ``||C_j||^2 sigma_j^2``
of one layer's output energy (``C_j``: that layer's coefficient column).

Compute really drops: both matmuls run on the active factors only (``B[:r]`` and ``C[:, :r]``,
or the gathered rows/columns when directions are reordered), never on zero-padded ones.

Strategies (a registry, ``STRATEGIES``):

- ``baseline``: the full ``k``.
- ``global_static``: per basis, the smallest ``r`` whose ``sigma^2`` hold ``energy`` of their
  sum, fixed for every input. With ``reorder=True`` each layer sorts the directions by its own
  ``||C_j||^2 sigma_j^2`` and keeps the smallest set holding ``energy`` of that (so the layers of
  a group may keep different directions and ranks).
- ``prompt_adaptive``: per sequence and layer, the smallest prefix holding ``energy`` of that
  sequence's own output energy ``||C_j||^2 * sum_t z_tj^2``, chosen on the prompt (prefill: the
  first matmul runs at full rank to see ``z``, the second on the active columns). Decoding steps
  keep the prompt's choice and gather only the active basis rows and coefficient columns. With
  ``reorder=True`` the directions are sorted by the prompt's contribution first (summed over the
  batch), so the kept set is the largest contributors rather than a prefix.

``max_rank`` caps every active rank. ``RankReport.rank_masks()`` gives, per layer, the share of
calls that used each direction (``plot_rank_masks`` in ``plots.py`` draws it as a heatmap).

Usage::

    with dynamic_rank(model, "prompt_adaptive", energy=0.95, max_rank=256) as report:
        perplexity(model, windows)
    report.mean_fraction  # average active rank / k

Energy, cap and reordering default to the adapter config's ``dynamic_rank_threshold``,
``max_basis_rank`` and ``reorder_channels``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from .layer import BasisSharingLayer

# A direction selection: an int r (the prefix [:r]) or a LongTensor of gathered directions.
Index = int | torch.Tensor


@dataclass(frozen=True)
class RankSettings:
    energy: float = 0.95
    max_rank: int | None = None
    reorder: bool = False

    def cap(self, ranks: torch.Tensor) -> torch.Tensor:
        return ranks if self.max_rank is None else ranks.clamp(max=self.max_rank)


@dataclass
class RankReport:
    """Active ranks seen while the context was open (one entry per layer call and sequence),
    and per layer how often each basis direction was used."""

    strategy: str
    energy: float
    max_rank: int | None = None
    reorder: bool = False
    active: list[int] = field(default_factory=list)
    full: list[int] = field(default_factory=list)
    usage: dict[str, torch.Tensor] = field(default_factory=dict)  # layer -> [k] counts
    calls: dict[str, int] = field(default_factory=dict)  # layer -> sequences seen

    def record(self, name: str, k: int, order: torch.Tensor | None, ranks: list[int]) -> None:
        counts = self.usage.setdefault(name, torch.zeros(k, dtype=torch.float64))
        for r in ranks:
            counts[order[:r].cpu() if order is not None else slice(0, r)] += 1
        self.calls[name] = self.calls.get(name, 0) + len(ranks)
        self.active.extend(ranks)
        self.full.extend([k] * len(ranks))

    def rank_masks(self) -> dict[str, torch.Tensor]:
        """Per layer, the share (0..1) of sequences that used each basis direction."""
        return {name: self.usage[name] / max(self.calls[name], 1) for name in self.usage}

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
            "max_rank": self.max_rank,
            "reorder": self.reorder,
            "mean_rank": self.mean_rank,
            "mean_fraction": self.mean_fraction,
            "parameter_fraction": self.parameter_fraction,
            "calls": len(self.active),
        }


def _cumulative_rank(values: torch.Tensor, energy: float) -> torch.Tensor:
    """Per row of ``values`` (``[b, k]``, >= 0): smallest prefix holding ``energy`` of the sum."""
    total = values.sum(-1, keepdim=True).clamp_min(torch.finfo(values.dtype).tiny)
    cumulative = values.cumsum(-1) / total
    return ((cumulative < energy - 1e-7).sum(-1) + 1).clamp(max=values.shape[-1])


def _prefix_mask(z: torch.Tensor, ranks: torch.Tensor) -> torch.Tensor:
    """Zero ``z[b, ..., r_b:]`` for each sequence ``b`` (only when a batch mixes ranks)."""
    keep = torch.arange(z.shape[-1], device=z.device) < ranks.view(-1, *([1] * (z.ndim - 1)))
    return z * keep.to(z.dtype)


class _Factors:
    """The active basis rows and coefficient columns of each layer, gathered once per selection
    (kept only under ``no_grad``: with autograd on they are re-sliced so gradients flow)."""

    def __init__(self) -> None:
        self.cache: dict[tuple[int, str], tuple[Index, torch.Tensor, torch.Tensor]] = {}

    def get(self, layer: BasisSharingLayer, adapter: str, index: Index):
        key = (id(layer), adapter)
        hit = self.cache.get(key)
        if hit is not None and _same(hit[0], index):
            return hit[1], hit[2]
        basis = layer.basis(adapter)
        coefficient = layer.basis_sharing_coefficient[adapter]
        if isinstance(index, int):
            rows, columns = basis[:index], coefficient[:, :index]
        else:
            rows = basis.index_select(0, index.to(basis.device))
            columns = coefficient.index_select(1, index.to(coefficient.device))
        if torch.is_grad_enabled():
            return rows, columns
        rows, columns = rows.contiguous(), columns.contiguous()
        self.cache[key] = (index, rows, columns)
        return rows, columns


def _same(a: Index, b: Index) -> bool:
    if isinstance(a, int) or isinstance(b, int):
        return a == b if isinstance(a, int) and isinstance(b, int) else False
    return a.shape == b.shape and bool(torch.equal(a, b.to(a.device)))


def _project(x: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    return F.linear(x.to(basis.dtype), basis)


def _output(z: torch.Tensor, coefficient: torch.Tensor) -> torch.Tensor:
    return F.linear(z.to(coefficient.dtype), coefficient)


Policy = Callable[[BasisSharingLayer, str, torch.Tensor], torch.Tensor]


def _baseline(settings: RankSettings, model: nn.Module, report: RankReport, names) -> Policy:
    def policy(layer: BasisSharingLayer, adapter: str, x: torch.Tensor) -> torch.Tensor:
        coefficient = layer.basis_sharing_coefficient[adapter]
        k = coefficient.shape[1]
        batch = x.shape[0] if x.ndim > 2 else 1
        report.record(names[id(layer)], k, None, [k] * batch)
        return _output(_project(x, layer.basis(adapter)), coefficient)

    return policy


def static_selection(
    layer: BasisSharingLayer, adapter: str, sigmas: torch.Tensor, settings: RankSettings
) -> tuple[torch.Tensor | None, int]:
    """``(order or None, r)`` that ``global_static`` keeps for ``layer`` (see module doc)."""
    power = sigmas.detach().double().pow(2)
    if settings.reorder:
        column = layer.basis_sharing_coefficient[adapter].detach().double().pow(2).sum(0)
        score = column * power.to(column.device)
        order = score.argsort(descending=True)
        rank = _cumulative_rank(score[order][None], settings.energy)
    else:
        order, rank = None, _cumulative_rank(power[None], settings.energy)
    return order, int(settings.cap(rank)[0])


def _global_static(settings: RankSettings, model: nn.Module, report: RankReport, names):
    chosen: dict[tuple[int, str], tuple[torch.Tensor | None, int]] = {}
    factors = _Factors()

    def policy(layer: BasisSharingLayer, adapter: str, x: torch.Tensor) -> torch.Tensor:
        key = (id(layer), adapter)
        if key not in chosen:
            sigma = _sigmas(model, adapter)[layer.basis_sharing_key[adapter]]
            chosen[key] = static_selection(layer, adapter, sigma, settings)
        order, r = chosen[key]
        basis, coefficient = factors.get(layer, adapter, r if order is None else order[:r])
        batch = x.shape[0] if x.ndim > 2 else 1
        k = layer.basis_sharing_coefficient[adapter].shape[1]
        report.record(names[id(layer)], k, order, [r] * batch)
        return _output(_project(x, basis), coefficient)

    return policy


def _prompt_adaptive(settings: RankSettings, model: nn.Module, report: RankReport, names):
    chosen: dict[tuple[int, str], tuple[torch.Tensor | None, torch.Tensor]] = {}
    factors = _Factors()

    def policy(layer: BasisSharingLayer, adapter: str, x: torch.Tensor) -> torch.Tensor:
        seq = x if x.ndim > 2 else x[None]
        coefficient = layer.basis_sharing_coefficient[adapter]
        k = coefficient.shape[1]
        previous = chosen.get((id(layer), adapter))
        if seq.shape[1] == 1 and previous is not None and previous[1].numel() == seq.shape[0]:
            order, ranks = previous  # a decoding step: the prompt's choice, active rows only
            r_max = int(ranks.max())
            index = r_max if order is None else order[:r_max]
            basis, columns = factors.get(layer, adapter, index)
            z = _project(seq, basis)
        else:
            full = _project(seq, layer.basis(adapter))
            column = coefficient.detach().double().pow(2).sum(0)
            flat = full.detach().double().reshape(seq.shape[0], -1, k)
            contribution = flat.pow(2).sum(1) * column  # [b, k]
            order = None
            if settings.reorder:
                order = contribution.sum(0).argsort(descending=True)
                contribution = contribution[:, order]
            ranks = settings.cap(_cumulative_rank(contribution, settings.energy))
            chosen[(id(layer), adapter)] = (order, ranks)
            r_max = int(ranks.max())
            if order is None:
                z, index = full[..., :r_max], r_max
            else:
                index = order[:r_max]
                z = full.index_select(-1, index.to(full.device))
            _, columns = factors.get(layer, adapter, index)
        if bool((ranks != r_max).any()):
            z = _prefix_mask(z, ranks.to(z.device))
        report.record(names[id(layer)], k, order, ranks.tolist())
        y = _output(z, columns)
        return y if x.ndim > 2 else y[0]

    return policy


STRATEGIES: dict[str, Callable[..., Policy]] = {
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


def static_fraction(
    model: nn.Module,
    energy: float,
    adapter: str = "default",
    max_rank: int | None = None,
    reorder: bool = False,
) -> float:
    """Mean ``r / k`` over the compressed layers that ``global_static`` at ``energy`` keeps,
    computed from the factors alone (no forward pass)."""
    sigmas = _sigmas(model, adapter)
    settings = RankSettings(float(energy), max_rank, reorder)
    fractions = []
    for layer in _layers(model):
        sigma = sigmas[layer.basis_sharing_key[adapter]]
        _, rank = static_selection(layer, adapter, sigma, settings)
        fractions.append(rank / sigma.numel())
    return sum(fractions) / len(fractions)


def energy_for_fraction(
    model: nn.Module,
    fraction: float,
    adapter: str = "default",
    steps: int = 40,
    reorder: bool = False,
) -> float:
    """The ``global_static`` energy whose mean kept fraction is closest to ``fraction`` from
    below (bisection): the same rank budget as another strategy, e.g. ``prompt_adaptive``."""
    low, high = 1e-6, 1.0
    for _ in range(steps):
        middle = (low + high) / 2
        if static_fraction(model, middle, adapter, reorder=reorder) <= fraction:
            low = middle
        else:
            high = middle
    return low


def _layers(model: nn.Module) -> list[BasisSharingLayer]:
    return [m for m in model.modules() if isinstance(m, BasisSharingLayer)]


def _settings(model, adapter, energy, max_rank, reorder) -> RankSettings:
    config = getattr(model, "peft_config", {}).get(adapter)
    if energy is None:
        energy = getattr(config, "dynamic_rank_threshold", 0.95)
    if max_rank is None:
        max_rank = getattr(config, "max_basis_rank", None)
    if reorder is None:
        reorder = bool(getattr(config, "reorder_channels", False))
    if isinstance(energy, bool) or not isinstance(energy, int | float) or not 0 < energy <= 1:
        raise ValueError(f"energy must be in (0, 1], got {energy!r}; e.g. 0.95")
    if max_rank is not None and (
        isinstance(max_rank, bool) or not isinstance(max_rank, int) or max_rank < 1
    ):
        raise ValueError(f"max_rank must be a positive integer or None, got {max_rank!r}")
    return RankSettings(float(energy), max_rank, bool(reorder))


@contextlib.contextmanager
def dynamic_rank(
    model: nn.Module,
    strategy: str = "baseline",
    energy: float | None = None,
    max_rank: int | None = None,
    reorder: bool | None = None,
    adapter: str = "default",
) -> Iterator[RankReport]:
    """Run ``model``'s compressed layers with a rank strategy inside the block (see module
    doc); ``None`` arguments come from the adapter config (else 0.95, no cap, no reorder)."""
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {sorted(STRATEGIES)}, got {strategy!r}")
    settings = _settings(model, adapter, energy, max_rank, reorder)
    layers = _layers(model)
    if not layers:
        raise ValueError("the model has no basis_sharing layers")
    names = {  # as the tuner names them: relative to the wrapped model
        id(m): name.removeprefix("base_model.model.")
        for name, m in model.named_modules()
        if isinstance(m, BasisSharingLayer)
    }
    report = RankReport(strategy, settings.energy, settings.max_rank, settings.reorder)
    policy = STRATEGIES[strategy](settings, model, report, names)
    for layer in layers:
        layer.basis_sharing_rank_policy = policy
    try:
        yield report
    finally:
        for layer in layers:
            layer.basis_sharing_rank_policy = None
