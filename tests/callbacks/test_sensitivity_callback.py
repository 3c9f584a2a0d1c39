"""SensitivityCallback: top-k snapshots during Trainer.train() and their drift."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import build_tiny_model, make_token_windows
from hf_sparse.callbacks import SensitivityCallback
from transformers import Trainer, TrainingArguments

from hf_sparse.analysis import SensitivityConfig


def _args(tmp_path, lr: float) -> TrainingArguments:
    return TrainingArguments(
        output_dir=str(tmp_path), max_steps=6, per_device_train_batch_size=4, learning_rate=lr,
        save_strategy="no", report_to=[], use_cpu=True, disable_tqdm=True, seed=0,
    )  # fmt: skip


def _data():
    return [{"input_ids": w, "labels": w.clone()} for w in make_token_windows(n=16, length=12)]


@pytest.mark.parametrize("metric", ["magnitude", "fisher"])
def test_drift_is_recorded_and_grows_with_training(tmp_path, metric):
    callback = SensitivityCallback(
        SensitivityConfig(metric=metric, top_k=2.0, steps=[0, 3, 6], num_samples=4)
    )
    Trainer(
        model=build_tiny_model("llama"), args=_args(tmp_path, 5e-2), train_dataset=_data(),
        callbacks=[callback],
    ).train()  # fmt: skip
    drift = json.loads((tmp_path / "sensitivity_drift.json").read_text())
    assert drift["steps"] == [0, 3, 6]
    jaccard = torch.tensor(drift["jaccard"])
    assert torch.allclose(jaccard.diag(), torch.ones(3, dtype=jaccard.dtype))
    assert 0 <= float(jaccard[0, 2]) < 1  # the set moved
    assert drift["jaccard_to_first"][2] <= drift["jaccard_to_first"][1] + 0.05
    assert -1 <= drift["spearman"][0][2] <= 1


def test_no_training_means_no_drift(tmp_path):
    callback = SensitivityCallback(SensitivityConfig(metric="magnitude", top_k=50, every=3))
    Trainer(
        model=build_tiny_model("llama"), args=_args(tmp_path, 0.0), train_dataset=_data(),
        callbacks=[callback],
    ).train()  # fmt: skip
    assert callback.drift["steps"] == [0, 3, 6]
    assert all(v == pytest.approx(1.0) for v in callback.drift["jaccard_to_first"])


def test_bad_settings():
    with pytest.raises(ValueError, match="unknown metric 'snr'"):
        SensitivityConfig(metric="snr", every=1)
    with pytest.raises(ValueError, match="choose when to snapshot"):
        SensitivityConfig()
    with pytest.raises(ValueError, match="every must be a positive integer"):
        SensitivityConfig(every=0)
    with pytest.raises(TypeError, match="SensitivityConfig"):
        SensitivityCallback({"every": 1})


@pytest.mark.slow  # two short training runs: ~6 s on a loaded 2-core machine
def test_drift_alarm_logs_and_records_only_when_the_set_moves_more_than_asked(tmp_path, caplog):
    def train(lr: float, **alarm) -> SensitivityCallback:
        config = SensitivityConfig(metric="magnitude", top_k=2.0, steps=[0, 3, 6], **alarm)
        callback = SensitivityCallback(config)
        Trainer(
            model=build_tiny_model("llama"), args=_args(tmp_path / str(lr), lr),
            train_dataset=_data(), callbacks=[callback],
        ).train()  # fmt: skip
        return callback

    with caplog.at_level("WARNING"):
        moved = train(5e-2, max_jaccard_drift=0.0, min_spearman=1.0)
    assert [e["step"] for e in moved.drift_events] == [3, 6]
    assert moved.drift_events[0]["previous_step"] == 0
    assert any(r.startswith("1 - Jaccard") for r in moved.drift_events[0]["reasons"])
    assert moved.drift_events[0]["jaccard"] == pytest.approx(moved.drift["jaccard"][0][1])
    assert "critical set drifted between steps 0 and 3" in caplog.text
    saved = json.loads((tmp_path / "0.05" / "sensitivity_drift.json").read_text())
    assert saved["drift_events"] == moved.drift_events
    still = train(0.0, max_jaccard_drift=0.0, min_spearman=0.999)
    assert still.drift_events == [] and still.drift["drift_events"] == []
    with pytest.raises(ValueError, match=r"max_jaccard_drift must be in \[0.0, 1\]"):
        SensitivityConfig(every=1, max_jaccard_drift=1.5)
