"""Plots of causal-importance patterns (matplotlib, imported only here; optional).

The figure the SPD paper (Bushnaq et al., 2025) shows for toy models: for each decomposed
layer, the importance of each component (columns) when one input feature is on alone (rows),
with components ordered by the feature that uses them and dead ones dropped. A clean
decomposition is a diagonal.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

import torch


def _matplotlib():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as error:
        raise ImportError(
            "plots need matplotlib: pip install matplotlib (results are still written)"
        ) from error
    return plt


def order_components(ci: torch.Tensor, threshold: float = 0.1) -> list[int]:
    """Alive components ordered by the feature where each is most important."""
    alive = (ci > threshold).any(0).nonzero().flatten()
    owners = ci[:, alive].argmax(0)
    order = sorted(range(len(alive)), key=lambda k: (int(owners[k]), -float(ci[:, alive[k]].max())))
    return [int(alive[k]) for k in order]


def plot_ci_one_hot(
    ci_by_layer: Mapping[str, Sequence[Sequence[float]] | torch.Tensor],
    path: str | os.PathLike,
    threshold: float = 0.1,
) -> None:
    """One heatmap per layer of one-hot causal importances ``[n_features, C]``."""
    plt = _matplotlib()
    names = list(ci_by_layer)
    fig, axes = plt.subplots(1, len(names), figsize=(4 * len(names), 3.5), squeeze=False)
    for ax, name in zip(axes[0], names, strict=True):
        ci = torch.as_tensor(ci_by_layer[name], dtype=torch.float32)
        order = order_components(ci, threshold)
        shown = ci[:, order] if order else torch.zeros(ci.shape[0], 1)
        image = ax.imshow(shown.numpy(), vmin=0, vmax=1, cmap="Blues", aspect="auto")
        ax.set_title(f"{name}: {len(order)} alive of {ci.shape[1]}")
        ax.set_xlabel("component (alive, ordered)")
        ax.set_ylabel("input feature")
        fig.colorbar(image, ax=ax, fraction=0.046)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
