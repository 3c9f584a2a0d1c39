"""Clustered perturbation: perturb the critical weights of one sensitivity cluster at a time.

For each cluster of profiles (tensors or output rows, ``clustering.py``) the top-k entries
that lie inside its members are perturbed together; the controls are ``control_seeds`` sets of
as many entries drawn at random from the same members (the cluster's other weights), so a
cluster's effect can be told apart from "any weights of those tensors would do that".
"""

from __future__ import annotations

import re
import statistics
from collections.abc import Mapping, Sequence

import torch
from torch import nn

from .controls import random_entries
from .effects import EffectProbe
from .perturb import check_perturbation, perturbed

_ROW = re.compile(r"^(?P<name>.+)\[(?P<row>\d+)\]$")


def _member_masks(labels: Sequence[str], shapes: Mapping[str, torch.Size]) -> dict:
    """Boolean masks covering the members (whole tensors, or ``name[row]`` rows)."""
    masks: dict[str, torch.Tensor] = {}
    for label in labels:
        match = _ROW.match(label)
        name = match["name"] if match and label not in shapes else label
        mask = masks.setdefault(name, torch.zeros(shapes[name], dtype=torch.bool))
        if name == label:
            mask.fill_(True)
        else:
            mask[int(match["row"])] = True
    return masks


def cluster_perturbations(
    model: nn.Module,
    top: Mapping[str, torch.Tensor],
    shapes: Mapping[str, torch.Size],
    labels: Sequence[str],
    clusters: Sequence[int],
    probe: EffectProbe,
    kind: str = "zero",
    strength: float = 1.0,
    control_seeds: int = 3,
    seed: int = 0,
) -> list[dict]:
    """One row per cluster: its critical entries perturbed vs same-size random controls from
    the same members (``effect`` dicts: perplexity, KL)."""
    check_perturbation(kind, strength)
    if len(labels) != len(clusters):
        raise ValueError(f"{len(labels)} labels but {len(clusters)} cluster ids")
    rows = []
    for cluster in sorted(set(clusters)):
        members = [label for label, c in zip(labels, clusters, strict=True) if c == cluster]
        region = _member_masks(members, shapes)
        critical = {n: m & top[n].cpu() for n, m in region.items() if n in top}
        count = int(sum(int(m.sum()) for m in critical.values()))
        row = {"cluster": int(cluster), "members": len(members), "k": count}
        if count == 0:
            rows.append({**row, "skipped": "no top-k entry lies in this cluster"})
            continue
        with perturbed(model, {n: m for n, m in critical.items() if m.any()}, kind, strength, seed):
            row["top"] = probe.measure().to_dict()
        inside = {n: m.shape for n, m in region.items()}
        runs = []
        for index in range(control_seeds):
            # random entries of the members: draw over the region's tensors, outside the rest
            outside = {n: ~m for n, m in region.items()}
            drawn = random_entries(inside, count, seed + 1000 + index, exclude=outside)
            with perturbed(model, dict(drawn.items()), kind, strength, seed + index):
                runs.append(probe.measure().to_dict())
        keys = runs[0].keys()
        row["random_mean"] = {k: statistics.fmean(r[k] for r in runs) for k in keys}
        row["random_std"] = {
            k: statistics.pstdev([r[k] for r in runs]) if len(runs) > 1 else 0.0 for k in keys
        }
        row.update(kind=kind, strength=strength)
        rows.append(row)
    return rows
