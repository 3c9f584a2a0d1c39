"""SPDTrainer: warm-up, separate loss logs, importance schedule, learning on a toy model."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import TrainerCallback

from hf_sparse.spd import SPDConfig, SPDLossConfig, SPDTrainer, get_spd_model, spd_layers
from hf_sparse.spd.core import faithfulness_loss
from hf_sparse.spd.experiments import SPDTrainConfig
from hf_sparse.spd.toy_models import (
    TMSConfig,
    ToyBatches,
    ToyTrainingConfig,
    build_toy_model,
    train_toy_model,
)
from hf_sparse.spd.toy_run import training_arguments


class _Seen(TrainerCallback):
    def __init__(self) -> None:
        self.logs: list[dict] = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.logs.append(dict(logs or {}))


@pytest.fixture(scope="module")
def trained_tms():
    config = TMSConfig()
    model = build_toy_model(config, seed=0)
    train_toy_model(model, config, ToyTrainingConfig(steps=300, batch_size=512, lr=1e-2))
    return config, model


@pytest.fixture
def tms(trained_tms):
    config, model = trained_tms
    return config, copy.deepcopy(model)  # get_spd_model changes the model in place


def _faithfulness(model) -> float:
    layers = spd_layers(model).values()
    comps = [layer.components() for layer in layers]
    with torch.no_grad():
        return float(
            faithfulness_loss(
                [layer.target_weight() for layer in layers],
                [u for u, _ in comps],
                [v for _, v in comps],
            )
        )


@pytest.mark.slow  # a short SPD training per case: ~1 s
@pytest.mark.parametrize("tied", [None, {"linear2": "linear1"}], ids=["untied", "tied"])
def test_trainer_warms_up_logs_each_term_and_learns(tms, tmp_path, tied):
    config, target = tms
    torch.manual_seed(0)
    spd = SPDConfig(C=10, target_modules=["linear1", "linear2"], tied_modules=tied)
    model = get_spd_model(target, spd)
    before = _faithfulness(model)
    loss = SPDLossConfig(
        importance_minimality_coeff=1e-3,
        importance_minimality_final_coeff=3e-3,
        faithfulness_warmup_steps=100,
    )
    train = SPDTrainConfig(steps=90, batch_size=256, lr=3e-3, logging_steps=30)
    seen = _Seen()
    trainer = SPDTrainer(
        model=model,
        args=training_arguments(train, tmp_path),
        train_dataset=ToyBatches(config, 256, seed=1),
        spd_loss=loss,
        callbacks=[seen],
    )
    trainer.train()
    assert trainer.spd_warmup_loss < before / 10
    logs = [entry for entry in trainer.state.log_history if "spd/stochastic_recon" in entry]
    assert len(logs) == 3
    for key in ("stochastic_recon_layerwise", "importance_minimality", "ci_l0/linear1"):
        assert f"spd/{key}" in logs[0]
    assert any("spd/stochastic_recon" in entry for entry in seen.logs)  # callbacks see them
    coeffs = [entry["spd/importance_minimality_coeff"] for entry in logs]
    assert coeffs[0] < coeffs[1] < coeffs[2] <= 3e-3  # the schedule moves towards its final
    assert logs[-1]["spd/stochastic_recon"] < logs[0]["spd/stochastic_recon"]
    assert logs[-1]["spd/ci_l0/linear1"] < 10  # not every component active on every input


def test_trainer_changes_only_components_and_gates(tms, tmp_path):
    config, target = tms
    weight = target.linear1.weight.detach().clone()
    torch.manual_seed(0)
    model = get_spd_model(target, SPDConfig(C=4, target_modules=["linear1"]))
    train = SPDTrainConfig(steps=3, batch_size=32, logging_steps=1)
    loss = SPDLossConfig(faithfulness_warmup_steps=0)
    trainer = SPDTrainer(
        model=model,
        args=training_arguments(train, tmp_path),
        train_dataset=ToyBatches(config, 32),
        spd_loss=loss,
    )
    U0 = spd_layers(model)["linear1"].components()[0].detach().clone()
    trainer.train()
    assert torch.equal(spd_layers(model)["linear1"].target_weight(), weight)
    assert not torch.equal(spd_layers(model)["linear1"].components()[0], U0)
