"""Correlation between the decoder layers' sensitivity profiles.

A layer's profile is, for every component it holds (q, k, v, o, gate, up, down, ...), the
quantiles ``PROFILE_QUANTILES`` of its log10 scores. Two layers whose scores are distributed
alike across their components correlate near 1 (Pearson, over the profile's features). Only
components present in every layer enter the profiles, so all profiles have the same features.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping

import torch

from .breakdown import component_of, layer_of

PROFILE_QUANTILES = (0.5, 0.9, 0.99, 0.999, 1.0)


def layer_profiles(scores: Mapping[str, torch.Tensor]) -> tuple[list[int], list[str], torch.Tensor]:
    """``(layers, feature names, [layers, features] float64 profiles)``."""
    by_layer: dict[int, dict[str, list[torch.Tensor]]] = defaultdict(lambda: defaultdict(list))
    for name, score in scores.items():
        layer = layer_of(name)
        if layer is not None:
            by_layer[layer][component_of(name)].append(score.reshape(-1))
    if len(by_layer) < 2:
        raise ValueError(
            f"layer correlation needs scores in at least two decoder layers, got {len(by_layer)}"
        )
    layers = sorted(by_layer)
    shared = sorted(set.intersection(*(set(by_layer[layer]) for layer in layers)))
    if not shared:
        raise ValueError("no component is scored in every layer: no common profile to correlate")
    quantiles = torch.tensor(PROFILE_QUANTILES, dtype=torch.float64)
    rows = []
    for layer in layers:
        row = []
        for component in shared:
            values = torch.cat(by_layer[layer][component]).double().clamp_min(1e-30).log10()
            if values.numel() > 1_000_000:  # torch.quantile's input limit: a fixed subsample
                generator = torch.Generator().manual_seed(0)
                values = values[torch.randperm(values.numel(), generator=generator)[:1_000_000]]
            row.append(torch.quantile(values, quantiles))
        rows.append(torch.cat(row))
    features = [f"{c} q{q:g}" for c in shared for q in PROFILE_QUANTILES]
    return layers, features, torch.stack(rows)


def layer_correlation(scores: Mapping[str, torch.Tensor]) -> dict:
    """``{"layers", "features", "pearson"}``: Pearson correlation of the layers' profiles."""
    layers, features, profiles = layer_profiles(scores)
    centred = profiles - profiles.mean(1, keepdim=True)
    norms = centred.norm(dim=1, keepdim=True).clamp_min(1e-30)
    unit = centred / norms
    pearson = (unit @ unit.t()).clamp(-1.0, 1.0)
    return {"layers": layers, "features": features, "pearson": pearson.tolist()}
