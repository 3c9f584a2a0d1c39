"""Toy models: configs refuse bad values, targets train, data is sparse."""

from __future__ import annotations

import pytest
import torch

from hf_sparse.spd.experiments import get_experiment
from hf_sparse.spd.toy_models import (
    ResidMLPConfig,
    TMSConfig,
    ToyBatches,
    ToyTrainingConfig,
    build_toy_model,
    resid_mlp_labels,
    sparse_features,
    train_toy_model,
)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"n_features": 0}, "n_features"),
        ({"n_hidden": 6}, "fewer hidden"),
        ({"feature_probability": 0.0}, "feature_probability"),
        ({"n_hidden_layers": -1}, "n_hidden_layers"),
    ],
)
def test_tms_config_rejects_mismatched_settings(kwargs, match):
    with pytest.raises(ValueError, match=match):
        TMSConfig(**kwargs)


def test_resid_config_rejects_bad_sizes():
    with pytest.raises(ValueError, match="d_mlp"):
        ResidMLPConfig(d_mlp=0)


def test_sparse_features_have_the_asked_density_and_range():
    generator = torch.Generator().manual_seed(0)
    x = sparse_features(20000, 10, 0.05, (-1.0, 1.0), generator)
    assert float((x != 0).float().mean()) == pytest.approx(0.05, abs=0.005)
    assert float(x.min()) >= -1 and float(x.max()) <= 1 and float(x.min()) < 0


@pytest.mark.slow  # trains a toy model: ~1 s
def test_tms_trains_to_superposition_with_tied_weights():
    config = TMSConfig()
    model = build_toy_model(config, seed=0)
    loss = train_toy_model(model, config, ToyTrainingConfig(steps=600, batch_size=512, lr=1e-2))
    assert loss < 0.01  # the untrained model's loss is ~0.02
    assert torch.equal(model.linear2.weight, model.linear1.weight.t())
    assert not any(p.requires_grad for p in model.parameters())
    norms = model.linear1.weight.norm(dim=0)
    assert int((norms > 0.5).sum()) >= 4  # most of the 5 features represented in 2 dims


@pytest.mark.slow  # trains a toy model per seed: ~1 s each
@pytest.mark.parametrize("seed", [1, 3])
def test_zero_output_bias_lets_tms_represent_every_feature(seed):
    # From PyTorch's random bias init these seeds keep 2 of the 5 features.
    config = get_experiment("tms_5-2").toy
    assert config.bias_init_zero
    model = build_toy_model(config, seed=seed)
    training = ToyTrainingConfig(steps=2000, batch_size=1024, lr=5e-3)
    train_toy_model(model, config, training, seed=seed)
    assert int((model.linear1.weight.norm(dim=0) > 0.5).sum()) == 5


def test_identity_hidden_layer_is_fixed():
    config = TMSConfig(n_hidden_layers=1)
    model = build_toy_model(config)
    train_toy_model(model, config, ToyTrainingConfig(steps=5, batch_size=8))
    assert torch.equal(model.hidden_layers[0].weight, torch.eye(2))


def test_resid_mlp_embedding_is_unit_norm_and_labels_are_x_plus_relu():
    config = ResidMLPConfig(n_features=8, d_embed=16, d_mlp=4)
    model = build_toy_model(config)
    torch.testing.assert_close(model.W_E.norm(dim=1), torch.ones(8))
    x = torch.tensor([[-0.5, 0.5]])
    assert resid_mlp_labels(x).tolist() == [[-0.5, 1.0]]
    assert model(torch.zeros(2, 8)).shape == (2, 8)


def test_toy_batches_are_seeded_and_whole():
    config = TMSConfig()
    first = next(iter(ToyBatches(config, 32, seed=3)))["x"]
    again = next(iter(ToyBatches(config, 32, seed=3)))["x"]
    assert first.shape == (32, 5) and torch.equal(first, again)
