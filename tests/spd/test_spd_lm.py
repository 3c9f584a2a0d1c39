"""Language-model metrics and the save / reload / ablate round trip on a tiny llama."""

from __future__ import annotations

import pytest
import torch

from hf_sparse.spd import SPDConfig, SPDLossConfig, get_spd_model
from hf_sparse.spd.lm import lm_metrics, round_trip

TARGETS = ["model.layers.1.mlp.up_proj", "model.layers.1.mlp.down_proj"]


def test_lm_metrics_and_round_trip(tiny_model, token_windows, tmp_path):
    torch.manual_seed(0)
    model = get_spd_model(tiny_model("llama"), SPDConfig(C=6, target_modules=TARGETS)).eval()
    windows = token_windows(n=3, length=8)
    metrics = lm_metrics(model, windows, SPDLossConfig(output_loss="kl"))
    kl = metrics["kl"]
    assert kl["all_components_plus_delta"] == pytest.approx(0.0, abs=1e-5)
    assert kl["all_components"] > 1e-4  # random components are not the weights
    assert set(metrics["layers"]) == set(TARGETS)
    per_layer = [entry["mean_active_per_token"] for entry in metrics["layers"].values()]
    assert metrics["mean_active_per_token"] == pytest.approx(sum(per_layer))
    assert all(0 <= value <= 6 for value in per_layer)
    trip = round_trip(model, lambda: tiny_model("llama"), tmp_path / "adapter", windows, 0.1)
    assert trip["reload_max_abs_logit_diff"] == 0.0
    assert trip["kl_all_components_plus_delta"] == pytest.approx(0.0, abs=1e-5)
    assert trip["kl_reloaded_all_components"] == pytest.approx(kl["all_components"], rel=1e-4)
    assert (tmp_path / "adapter" / "adapter_model.safetensors").exists()
