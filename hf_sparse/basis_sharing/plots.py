"""Heatmap of the rank masks dynamic rank captured (matplotlib, imported only here; optional).

Rows are the compressed layers in model order, columns the basis directions in the group's
singular-value order, colour the share of sequences that used the direction
(``RankReport.rank_masks()``). A static prefix shows as a solid bar per row; prompt-adaptive
ranks fade out to the right; reordered channels show as gaps.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

import torch


def plot_rank_masks(
    masks: Mapping[str, torch.Tensor], path: str | os.PathLike, title: str = ""
) -> None:
    """Write one heatmap of ``{layer: [k] usage share}`` to ``path`` (bases of different
    ranks are padded on the right with a value shown as blank)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as error:
        raise ImportError("plots need matplotlib: pip install matplotlib") from error
    if not masks:
        raise ValueError("no rank masks to plot: run the model inside dynamic_rank() first")
    names = list(masks)
    width = max(int(m.numel()) for m in masks.values())
    grid = torch.full((len(names), width), float("nan"))
    for row, name in enumerate(names):
        values = masks[name].detach().float().cpu()
        grid[row, : values.numel()] = values
    height = min(max(2.5, 0.18 * len(names) + 1.2), 20)
    fig, ax = plt.subplots(figsize=(10, height))
    image = ax.imshow(grid.numpy(), vmin=0, vmax=1, cmap="viridis", aspect="auto",
                      interpolation="nearest")  # fmt: skip
    ax.set_yticks(range(len(names)))
    ax.set_yticklabels(names, fontsize=max(3, min(8, 400 // max(len(names), 1))))
    ax.set_xlabel("basis direction (singular-value order)")
    ax.set_title(title or "share of sequences using each basis direction")
    fig.colorbar(image, ax=ax, fraction=0.03)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
