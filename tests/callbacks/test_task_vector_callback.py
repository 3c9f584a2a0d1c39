"""TaskVectorPruneCallback in real Trainer runs on tiny models (CPU)."""

from __future__ import annotations

import pytest
import torch
from conftest import build_tiny_model, make_token_windows, tiny_training_args
from hf_sparse.callbacks import TaskVectorPruneCallback
from peft import PeftModel
from transformers import Trainer

from hf_sparse.merging import TaskVectorPruneConfig
from hf_sparse.outputs import read_results


def examples(n: int = 16, length: int = 12) -> list[dict[str, torch.Tensor]]:
    return [{"input_ids": w, "labels": w.clone()} for w in make_token_windows(n=n, length=length)]


@pytest.mark.parametrize(
    ("arch", "method"),
    [("llama", "sparsegpt_tv"), ("gpt2", "sparsegpt_tv"), ("llama", "magnitude_prune")],
)
def test_pruned_delta_adapter_loads_on_the_base(tmp_path, arch, method):
    base = build_tiny_model(arch)
    model = build_tiny_model(arch)
    config = TaskVectorPruneConfig(density=0.25, method=method, calibration_samples=8)
    callback = TaskVectorPruneCallback(config)
    Trainer(
        model=model,
        args=tiny_training_args(tmp_path),
        train_dataset=examples(),
        callbacks=[callback],
    ).train()
    folder = tmp_path / "pruned_task_vector"
    assert (folder / "adapter_model.safetensors").exists()
    loaded = PeftModel.from_pretrained(build_tiny_model(arch), folder).merge_and_unload()
    trained = dict(model.named_parameters())
    base_params = dict(base.named_parameters())
    checked = 0
    for name, param in loaded.named_parameters():
        delta = param.detach() - base_params[name]
        full = trained[name].detach() - base_params[name]
        if name.removesuffix(".weight") in callback.base_weights:
            kept = (delta != 0).float().mean().item()
            assert kept == pytest.approx(0.25, abs=0.03), name
            if method == "magnitude_prune":  # the kept entries are the trained ones, unchanged
                torch.testing.assert_close(delta[delta != 0], full[delta != 0])
            checked += 1
        else:
            assert torch.equal(param, base_params[name]), name
    assert checked == len(callback.base_weights) > 0
    summary = read_results(folder)
    assert summary["kind"] == "TaskVectorPruneCallback"
    assert summary["config"]["method"] == method and summary["config"]["density"] == 0.25
    if method == "sparsegpt_tv":
        assert 0 < summary["metrics"]["mean_relative_output_error"] < 1


def test_apply_to_model_writes_base_plus_pruned_delta(tmp_path):
    base = build_tiny_model("llama")
    model = build_tiny_model("llama")
    config = TaskVectorPruneConfig(density=0.5, targets=["down"], calibration_samples=4)
    callback = TaskVectorPruneCallback(config, apply_to_model=True)
    Trainer(
        model=model,
        args=tiny_training_args(tmp_path),
        train_dataset=examples(),
        callbacks=[callback],
    ).train()
    base_params = dict(base.named_parameters())
    for name, param in model.named_parameters():
        if "down_proj" in name:
            share = ((param - base_params[name]) != 0).float().mean().item()
            assert share == pytest.approx(0.5, abs=0.02)


def test_bad_settings_and_resume_without_base_are_refused(tmp_path):
    with pytest.raises(ValueError, match=r"density must be in \(0, 1\]"):
        TaskVectorPruneConfig(density=1.5)
    with pytest.raises(ValueError, match="must be one of"):
        TaskVectorPruneConfig(method="dare_ties")
    model = build_tiny_model("llama")
    args = tiny_training_args(tmp_path, save_strategy="steps", save_steps=2, max_steps=2)
    Trainer(model=model, args=args, train_dataset=examples()).train()
    callback = TaskVectorPruneCallback(TaskVectorPruneConfig(density=0.5, method="magnitude_prune"))
    trainer = Trainer(
        model=build_tiny_model("llama"),
        args=tiny_training_args(tmp_path, max_steps=4),
        train_dataset=examples(),
        callbacks=[callback],
    )
    with pytest.raises(ValueError, match="resumes from a checkpoint"):
        trainer.train(resume_from_checkpoint=True)
