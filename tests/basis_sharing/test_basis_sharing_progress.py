"""Basis Sharing's long steps (X^T X collection, one whitened SVD per group) show progress."""

from __future__ import annotations

from hf_sparse.basis_sharing import BasisSharingConfig, get_basis_sharing_model
from tests.conftest import build_tiny_model, make_token_windows


def test_compression_shows_progress_bars(capsys):
    model = build_tiny_model("llama")
    get_basis_sharing_model(model, BasisSharingConfig(ratio=0.2), make_token_windows(n=4))
    err = capsys.readouterr().err
    assert "basis sharing: X^T X" in err and "basis sharing: SVD" in err
