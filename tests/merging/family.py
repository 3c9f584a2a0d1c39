"""Tiny base models and fine-tunes written to temporary folders (mergekit's way of testing).

A plain module, not a conftest.py: test folders hold no conftest of their own, so that
`from conftest import ...` always finds tests/conftest.py."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from tests.conftest import build_tiny_model


def perturbed_copy(base: torch.nn.Module, seed: int, scale: float = 0.05, only=(".layers.", ".h.")):
    """A fine-tune stand-in: the base with seeded noise on the decoder blocks' matrices."""
    model = copy.deepcopy(base)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if any(part in name for part in only) and param.ndim == 2:
                param.add_(torch.randn(param.shape, generator=generator) * scale)
    return model


@pytest.fixture
def saved_family(tmp_path: Path):
    """Factory: ``saved_family("llama", n)`` -> (base model, base folder, [fine-tune folders])."""

    def build(arch: str = "llama", count: int = 2) -> tuple[torch.nn.Module, Path, list[Path]]:
        base = build_tiny_model(arch)
        base_dir = tmp_path / f"{arch}-base"
        base.save_pretrained(base_dir)
        folders = []
        for index in range(count):
            folder = tmp_path / f"{arch}-ft{index}"
            perturbed_copy(base, seed=100 + index).save_pretrained(folder)
            folders.append(folder)
        return base, base_dir, folders

    return build
