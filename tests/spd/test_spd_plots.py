"""CI-pattern figures (matplotlib is optional: skipped without it)."""

from __future__ import annotations

import pytest
import torch

from hf_sparse.spd.plots import order_components


def test_components_are_ordered_by_owner_and_dead_ones_dropped():
    ci = torch.tensor([[0.0, 0.0, 0.9, 0.0], [0.8, 0.0, 0.0, 0.05]])
    assert order_components(ci, 0.1) == [2, 0]


def test_plot_writes_a_png(tmp_path):
    pytest.importorskip("matplotlib")
    from hf_sparse.spd.plots import plot_ci_one_hot

    path = tmp_path / "ci.png"
    plot_ci_one_hot({"linear1": torch.eye(3, 5), "linear2": torch.zeros(3, 4)}, path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
