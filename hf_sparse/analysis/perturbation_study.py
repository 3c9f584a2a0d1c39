"""Perturbation experiments on the top-k weights, each with its controls.

For every k (a progressive curve when several are given) and every perturbation, the effect
(perplexity, KL to the unperturbed model on fixed windows) of perturbing

- the top-k entries by score,
- ``control_seeds`` sets of k entries drawn uniformly at random from the same candidates
  (mean and standard deviation reported),
- the bottom-k entries,
- every candidate entry at once (``all_k``: the whole target perturbed at the same strength,
  the ceiling the top-k effect is read against),

optionally restricted to a component (``q``, ``mlp``, ...) or a range of blocks, so that a
large effect can be told apart from "any k weights would do that".
"""

from __future__ import annotations

import logging
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from .breakdown import COMPONENTS, component_of, layer_of
from .controls import random_entries, resolve_count, top_k_entries
from .effects import EffectProbe
from .perturb import check_perturbation, perturbed

logger = logging.getLogger(__name__)

COMPONENT_GROUPS = {
    "attention": ("q", "k", "v", "qkv", "o"),
    "mlp": ("gate", "up", "gate_up", "down", "fc1", "fc2"),
}


@dataclass(frozen=True)
class Target:
    """Which scored tensors a perturbation may touch: components and a block range."""

    components: tuple[str, ...] | None = None  # COMPONENTS or "attention" / "mlp"; None = all
    layers: tuple[int, int] | None = None  # inclusive block range; None = all

    @property
    def label(self) -> str:
        parts = ["+".join(self.components) if self.components else "all"]
        if self.layers is not None:
            parts.append(f"layers {self.layers[0]}-{self.layers[1]}")
        return ", ".join(parts)


def restrict(scores: Mapping[str, torch.Tensor], target: Target) -> dict[str, torch.Tensor]:
    """The scores of the tensors ``target`` covers (an error when none or unknown names)."""
    wanted = None
    if target.components is not None:
        wanted = set()
        for item in target.components:
            if item in COMPONENT_GROUPS:
                wanted.update(COMPONENT_GROUPS[item])
            elif item in COMPONENTS:
                wanted.add(item)
            else:
                raise ValueError(
                    f"unknown component {item!r}; valid: {list(COMPONENTS)} or "
                    f"{sorted(COMPONENT_GROUPS)}"
                )
    chosen = {}
    for name, score in scores.items():
        if wanted is not None and component_of(name) not in wanted:
            continue
        if target.layers is not None:
            layer = layer_of(name)
            if layer is None or not target.layers[0] <= layer <= target.layers[1]:
                continue
        chosen[name] = score
    if not chosen:
        present = sorted({component_of(n) for n in scores})
        raise ValueError(
            f"target {target.label} matches none of the scored parameters; components present "
            f"in this architecture: {present}"
        )
    return chosen


@dataclass
class PerturbationPoint:
    kind: str
    strength: float
    k: int
    target: str
    top: dict
    random_mean: dict
    random_std: dict
    bottom: dict
    random_runs: list[dict] = field(default_factory=list)
    all_k: dict | None = None  # every candidate entry perturbed (None: not measured)
    all_count: int | None = None

    def to_dict(self) -> dict:
        return self.__dict__.copy()


def _summary(effects: list[dict]) -> tuple[dict, dict]:
    keys = effects[0].keys()
    mean = {k: statistics.fmean(e[k] for e in effects) for k in keys}
    std = {k: statistics.pstdev([e[k] for e in effects]) if len(effects) > 1 else 0.0 for k in keys}
    return mean, std


def perturbation_study(
    model: nn.Module,
    scores: Mapping[str, torch.Tensor],
    windows: torch.Tensor,
    ks: Sequence[int | float],
    perturbations: Sequence[tuple[str, float]] = (("zero", 1.0),),
    targets: Sequence[Target] = (Target(),),
    control_seeds: int = 3,
    probe: EffectProbe | None = None,
    show_progress: bool = True,
) -> list[PerturbationPoint]:
    """Effects of perturbing the top-k entries of ``scores`` and their controls; see the
    module docstring. ``ks``: counts (int) or percentages (float) of each target's entries."""
    for kind, strength in perturbations:
        check_perturbation(kind, strength)
    if control_seeds < 1:
        raise ValueError(f"control_seeds must be >= 1, got {control_seeds}")
    restricted = [(t, restrict(scores, t)) for t in targets]  # all checked before any work
    plans = []
    for target, chosen in restricted:
        total = sum(s.numel() for s in chosen.values())
        for k in ks:
            count = resolve_count(k, total)
            for kind, strength in perturbations:
                plans.append((target, chosen, count, kind, strength))
    probe = probe or EffectProbe(model, windows)
    points = []
    everything: dict[tuple, dict] = {}  # (target, kind, strength) -> all_k effect, measured once
    for target, chosen, count, kind, strength in tqdm(
        plans, desc="perturbations", disable=not show_progress
    ):
        shapes = {n: s.shape for n, s in chosen.items()}
        top = top_k_entries(chosen, count)
        bottom = top_k_entries(chosen, count, largest=False)

        def effect(masks, seed: int = 0, kind: str = kind, strength: float = strength) -> dict:
            with perturbed(model, masks, kind, strength, seed):
                return probe.measure().to_dict()

        runs = [effect(random_entries(shapes, count, seed), seed) for seed in range(control_seeds)]
        mean, std = _summary(runs)
        key = (target.label, kind, strength)
        if key not in everything:
            everything[key] = effect(
                {n: torch.ones(s, dtype=torch.bool) for n, s in shapes.items()}
            )
        total = sum(s.numel() for s in chosen.values())
        points.append(
            PerturbationPoint(
                kind, strength, count, target.label, effect(top), mean, std, effect(bottom), runs,
                everything[key], total,
            )
        )  # fmt: skip
        logger.info(
            "%s x%.3g on top-%d (%s): ppl %.3f vs random %.3f +- %.3f, bottom %.3f",
            kind, strength, count, target.label, points[-1].top["perplexity"],
            mean["perplexity"], std["perplexity"], points[-1].bottom["perplexity"],
        )  # fmt: skip
    return points
