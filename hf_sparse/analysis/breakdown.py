"""Where the top-k weights sit: share and mean score per component and per depth."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from ..models import linear_role

COMPONENTS = ("embeddings", "q", "k", "v", "qkv", "o", "gate", "up", "gate_up", "down", "fc1",
              "fc2", "norms", "lm_head", "other")  # fmt: skip
_LAYER = re.compile(r"\.(?:layers|h|layer|blocks|decoder\.layers)\.(\d+)\.")


def component_of(name: str) -> str:
    """Component of a parameter from its name (``model.layers.3.self_attn.q_proj.weight``)."""
    module = name.rsplit(".", 1)[0]
    role = linear_role(module) or linear_role(name)  # stacked experts: ``...experts.down_proj``
    if role is not None:
        return role
    lowered = name.lower()
    if "lm_head" in lowered:
        return "lm_head"
    if "embed" in lowered or re.search(r"(^|\.)(wte|wpe)\.", lowered):
        return "embeddings"
    if "norm" in lowered or re.search(r"(^|\.)ln_", lowered):
        return "norms"
    return "other"


def layer_of(name: str) -> int | None:
    """Decoder-block index of a parameter, or None outside the blocks."""
    match = _LAYER.search(name)
    return int(match.group(1)) if match else None


@dataclass
class GroupStats:
    parameters: int = 0
    top: int = 0
    score_sum: float = 0.0

    def as_dict(self, total_top: int) -> dict:
        return {
            "parameters": self.parameters,
            "top": self.top,
            "share_of_top": self.top / total_top if total_top else 0.0,
            "fraction_in_top": self.top / self.parameters if self.parameters else 0.0,
            "mean_score": self.score_sum / self.parameters if self.parameters else 0.0,
        }


def breakdown(
    scores: Mapping[str, torch.Tensor], top: Mapping[str, torch.Tensor]
) -> dict[str, dict[str, dict]]:
    """``{"component": {name: stats}, "layer": {index: stats}}`` of the top-k set ``top``
    (masks) against all scored parameters: count, share of the top-k set, fraction of the
    group in the top-k set, mean score."""
    by_component: dict[str, GroupStats] = {}
    by_layer: dict[str, GroupStats] = {}
    total_top = 0
    for name, score in scores.items():
        count = int(top[name].sum()) if name in top else 0
        total_top += count
        keys = [(by_component, component_of(name))]
        layer = layer_of(name)
        if layer is not None:
            keys.append((by_layer, str(layer)))
        for table, key in keys:
            stats = table.setdefault(key, GroupStats())
            stats.parameters += score.numel()
            stats.top += count
            stats.score_sum += float(score.double().sum())
    order = {c: i for i, c in enumerate(COMPONENTS)}
    return {
        "component": {
            k: by_component[k].as_dict(total_top)
            for k in sorted(by_component, key=lambda c: order.get(c, len(order)))
        },
        "layer": {k: by_layer[k].as_dict(total_top) for k in sorted(by_layer, key=int)},
    }
