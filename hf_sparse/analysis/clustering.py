"""Clusters of sensitivity profiles (per tensor or per output row) with scikit-learn.

A profile describes how a tensor's (or row's) scores are distributed: log of the mean, log of
the max, the spread of log-scores and the share of the profile's entries in the global top-k
set. Features are standardised; k-means or DBSCAN groups them; each cluster is summarised by
what it contains (components, depth range, mean score, top-k share).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping

import torch

from .breakdown import component_of, layer_of

CLUSTER_METHODS = ("kmeans", "dbscan")
PROFILE_LEVELS = ("tensor", "row")
FEATURES = ("log_mean", "log_max", "log_std", "top_share")


def profiles(
    scores: Mapping[str, torch.Tensor], top: Mapping[str, torch.Tensor], level: str = "tensor"
) -> tuple[list[str], torch.Tensor]:
    """``(labels, [n, len(FEATURES)] features)``: one profile per tensor or per output row."""
    if level not in PROFILE_LEVELS:
        raise ValueError(f"profile level must be one of {list(PROFILE_LEVELS)}, got {level!r}")
    labels, rows = [], []
    for name, score in scores.items():
        groups = score.reshape(score.shape[0], -1) if level == "row" and score.ndim > 1 else None
        chosen = top[name] if name in top else torch.zeros_like(score, dtype=torch.bool)
        units = (
            [
                (f"{name}[{i}]", groups[i], chosen.reshape(score.shape[0], -1)[i])
                for i in range(len(groups))
            ]
            if groups is not None
            else [(name, score.reshape(-1), chosen.reshape(-1))]
        )
        for label, values, mask in units:
            logs = values.double().clamp_min(1e-30).log()
            labels.append(label)
            rows.append(
                [
                    float(values.double().mean().clamp_min(1e-30).log()),
                    float(logs.max()),
                    float(logs.std()) if values.numel() > 1 else 0.0,
                    float(mask.double().mean()),
                ]
            )
    return labels, torch.tensor(rows, dtype=torch.float64)


def cluster_profiles(
    features: torch.Tensor,
    method: str = "kmeans",
    n_clusters: int = 4,
    eps: float = 0.8,
    min_samples: int = 3,
    seed: int = 0,
) -> torch.Tensor:
    """Cluster ids (``-1`` = DBSCAN noise) of standardised profiles."""
    if method not in CLUSTER_METHODS:
        raise ValueError(
            f"clustering method must be one of {list(CLUSTER_METHODS)}, got {method!r}"
        )
    try:
        from sklearn.cluster import DBSCAN, KMeans
    except ImportError as error:
        raise ImportError(
            "clustering needs scikit-learn: pip install 'hf-sparse[analysis]'"
        ) from error
    x = features.double()
    x = (x - x.mean(0)) / x.std(0).clamp_min(1e-12)
    if method == "kmeans":
        if not 1 <= n_clusters <= x.shape[0]:
            raise ValueError(f"n_clusters must be in [1, {x.shape[0]}] profiles, got {n_clusters}")
        model = KMeans(n_clusters=n_clusters, n_init=10, random_state=seed)
    else:
        model = DBSCAN(eps=eps, min_samples=min_samples)
    return torch.as_tensor(model.fit_predict(x.numpy()), dtype=torch.long)


def summarise_clusters(labels: list[str], features: torch.Tensor, ids: torch.Tensor) -> list[dict]:
    """What each cluster holds: size, components, depth range, mean features."""
    summary = []
    for cluster in sorted(set(ids.tolist())):
        members = [i for i, c in enumerate(ids.tolist()) if c == cluster]
        names = [labels[i].split("[")[0] for i in members]
        layers = [layer for n in names if (layer := layer_of(n)) is not None]
        mean = features[members].mean(0)
        summary.append(
            {
                "cluster": cluster,
                "size": len(members),
                "components": dict(Counter(component_of(n) for n in names).most_common()),
                "layers": [min(layers), max(layers)] if layers else None,
                **{f"mean_{f}": float(v) for f, v in zip(FEATURES, mean, strict=True)},
                "examples": [labels[i] for i in members[:3]],
            }
        )
    return summary
