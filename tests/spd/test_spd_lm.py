"""Language-model metrics and the save / reload / ablate round trip on a tiny llama."""

from __future__ import annotations

import pytest
import torch

from hf_sparse.spd import SPDConfig, SPDLossConfig, get_spd_model, spd_layers
from hf_sparse.spd.lm import lm_metrics, relative_weight_error, round_trip

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


@pytest.mark.parametrize("family", ["llama", "gpt2"])  # nn.Linear and Conv1D targets
def test_relative_weight_error_is_the_share_of_the_weight_the_components_miss(tiny_model, family):
    base = tiny_model(family)
    pattern = (
        r"model\.layers\.1\.mlp\.up_proj" if family == "llama" else r"transformer\.h\.1\.mlp\.c_fc"
    )
    torch.manual_seed(0)
    model = get_spd_model(base, SPDConfig(C=64, target_modules=pattern))
    (layer,) = spd_layers(model).values()
    weight = layer.target_weight().detach()
    assert min(weight.shape) <= 64
    assert relative_weight_error(layer) > 0.5  # random components
    u, s, vh = torch.linalg.svd(weight, full_matrices=False)
    rank = s.numel()
    with torch.no_grad():
        U, V = layer.components()
        U.zero_()
        V.zero_()
        U[:, :rank] = u * s
        V[:rank] = vh
    assert relative_weight_error(layer) == pytest.approx(0.0, abs=1e-10)
    with torch.no_grad():  # drop the largest direction: the error is its share of ||W||^2
        U[:, 0] = 0.0
    expected = float(s[0] ** 2 / (s**2).sum())
    assert relative_weight_error(layer) == pytest.approx(expected, rel=1e-5)
