"""PruningCallback inside a real ``transformers.Trainer`` run on a tiny Llama (CPU).

Checked: pruning at train begin (calibration from the train dataloader or given windows),
the mask kept through optimizer steps while the kept weights train, the packed mask saved
next to each checkpoint, and resuming from a checkpoint without pruning again.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import hf_sparse.callbacks.pruning as callback_module
import pytest
import torch
from conftest import VOCAB, build_tiny_model, make_token_windows
from hf_sparse.callbacks import PruningCallback
from safetensors.torch import load_file
from transformers import Trainer, TrainerCallback, TrainingArguments

from hf_sparse.masks import load_masks
from hf_sparse.models import weight_matrix
from hf_sparse.pruning import SparseGPTConfig, WandaConfig, prune_

MASKS_FILE = "sparsity_masks.safetensors"
N_TARGETS = 2 * 7  # 2 Llama blocks x (q, k, v, o, gate, up, down)
SEQ_LEN = 16
TRAIN_WINDOWS = 16
BATCH = 4
MAX_STEPS = 6
SAVE_STEPS = 3


class WindowDataset(torch.utils.data.Dataset):
    """Random token windows as causal-LM examples (labels = inputs)."""

    def __init__(self, windows: torch.Tensor) -> None:
        self.windows = windows

    def __len__(self) -> int:
        return self.windows.shape[0]

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.windows[i], "labels": self.windows[i].clone()}


class SnapshotCallback(TrainerCallback):
    """Copies the target weights at train begin, i.e. right after PruningCallback pruned them."""

    def __init__(self, names) -> None:
        self.names = names
        self.weights: dict[str, torch.Tensor] = {}

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.weights = target_weights(model, self.names())


def target_weights(model, names) -> dict[str, torch.Tensor]:
    modules = dict(model.named_modules())
    return {n: weight_matrix(modules[n]).detach().clone() for n in names}


def train_windows() -> torch.Tensor:
    return make_token_windows(VOCAB, TRAIN_WINDOWS, SEQ_LEN, seed=1)


def make_trainer(model, output_dir: Path, callbacks, max_steps: int = MAX_STEPS) -> Trainer:
    args = TrainingArguments(
        output_dir=str(output_dir),
        use_cpu=True,
        max_steps=max_steps,
        per_device_train_batch_size=BATCH,
        learning_rate=1e-2,
        lr_scheduler_type="constant",
        save_strategy="steps",
        save_steps=SAVE_STEPS,
        logging_strategy="no",
        report_to=[],
        disable_tqdm=True,
        dataloader_num_workers=0,
        seed=0,
    )
    return Trainer(
        model=model, args=args, train_dataset=WindowDataset(train_windows()), callbacks=callbacks
    )


def assert_masked(model, masks: dict[str, torch.Tensor]) -> None:
    modules = dict(model.named_modules())
    for name, keep in masks.items():
        weight = weight_matrix(modules[name]).detach()
        assert keep.dtype == torch.bool and keep.shape == weight.shape, name
        assert torch.count_nonzero(weight[~keep]) == 0, f"{name}: pruned weights came back"


def assert_masks_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name].cpu(), b[name].cpu()), name


def assert_trained(before: dict[str, torch.Tensor], model, masks: dict[str, torch.Tensor]) -> None:
    """Every target's kept weights moved away from ``before`` (so training reached them)."""
    after = target_weights(model, masks)
    for name, keep in masks.items():
        moved = (after[name][keep] - before[name][keep]).abs()
        assert moved.max() > 1e-3, f"{name}: kept weights did not train"
        assert (moved > 0).float().mean() > 0.9, f"{name}: most kept weights did not change"


@pytest.fixture(scope="module")
def wanda_run(tmp_path_factory):
    """One Wanda run, calibrated on the train dataloader's first batches (6 steps, 2 saves)."""
    output_dir = tmp_path_factory.mktemp("wanda_run")
    calls = []

    def recording_prune(model, config, calibration, **kwargs):
        calls.append(calibration.clone())
        return prune_(model, config, calibration, **kwargs)

    callback = PruningCallback(WandaConfig(sparsity=0.5), num_calibration_batches=2)
    snapshot = SnapshotCallback(lambda: callback.masks)
    trainer = make_trainer(build_tiny_model("llama"), output_dir, [callback, snapshot])
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(callback_module, "prune_", recording_prune)
        trainer.train()
    return {
        "dir": output_dir,
        "trainer": trainer,
        "callback": callback,
        "pruned": snapshot.weights,
        "calibration": calls,
    }


def test_wanda_calibrates_on_train_batches(wanda_run):
    calls = wanda_run["calibration"]
    assert len(calls) == 1, "pruned more than once"
    calibration = calls[0]
    # num_calibration_batches=2 batches of BATCH windows, each one a row of the train set
    assert calibration.shape == (2 * BATCH, SEQ_LEN)
    rows = {tuple(r) for r in train_windows().tolist()}
    assert all(tuple(r) in rows for r in calibration.tolist())


def test_wanda_mask_kept_while_training(wanda_run):
    callback, model = wanda_run["callback"], wanda_run["trainer"].model
    masks = callback.masks
    assert masks is not None and len(masks) == N_TARGETS
    for name, keep in masks.items():
        assert keep.float().mean().item() == pytest.approx(0.5), name
    assert wanda_run["trainer"].state.global_step == MAX_STEPS
    assert_masked(model, masks)
    assert_trained(wanda_run["pruned"], model, masks)
    assert model.config.sparsity["method"] == "wanda"


def test_wanda_checkpoints_hold_the_mask(wanda_run):
    masks = wanda_run["callback"].masks
    for step in (SAVE_STEPS, MAX_STEPS):
        checkpoint = wanda_run["dir"] / f"checkpoint-{step}"
        assert (checkpoint / MASKS_FILE).is_file(), f"no mask file in {checkpoint}"
        assert_masks_equal(load_masks(checkpoint / MASKS_FILE), masks)
        # the saved weights carry the zeros too
        state = load_file(str(checkpoint / "model.safetensors"))
        for name, keep in masks.items():
            assert torch.count_nonzero(state[f"{name}.weight"][~keep]) == 0, (step, name)


def test_resume_keeps_mask_without_repruning(wanda_run, monkeypatch):
    output_dir = wanda_run["dir"]
    checkpoint = output_dir / f"checkpoint-{SAVE_STEPS}"
    saved = load_masks(checkpoint / MASKS_FILE)
    at_checkpoint = load_file(str(checkpoint / "model.safetensors"))

    def no_prune(*args, **kwargs):
        raise AssertionError("PruningCallback pruned again when resuming")

    monkeypatch.setattr(callback_module, "prune_", no_prune)
    callback = PruningCallback(WandaConfig(sparsity=0.5))
    model = build_tiny_model("llama", seed=123)  # fresh (dense) weights, replaced by the checkpoint
    trainer = make_trainer(model, output_dir, [callback])
    trainer.train(resume_from_checkpoint=str(checkpoint))

    assert trainer.state.global_step == MAX_STEPS
    assert_masks_equal(callback.masks, saved)
    assert_masks_equal(callback.masks, wanda_run["callback"].masks)
    assert_masked(trainer.model, saved)
    resumed_from = {n: at_checkpoint[f"{n}.weight"] for n in saved}
    assert_trained(resumed_from, trainer.model, saved)
    # the run's own checkpoint after resuming holds the same mask
    assert_masks_equal(load_masks(output_dir / f"checkpoint-{MAX_STEPS}" / MASKS_FILE), saved)


def test_resume_without_mask_file_derives_mask_from_zeros(wanda_run, tmp_path, monkeypatch):
    """A checkpoint lacking the mask file: the zeros of the restored weights are the mask."""
    checkpoint = tmp_path / f"checkpoint-{SAVE_STEPS}"
    shutil.copytree(wanda_run["dir"] / checkpoint.name, checkpoint)
    (checkpoint / MASKS_FILE).unlink()

    def no_prune(*args, **kwargs):
        raise AssertionError("PruningCallback pruned again when resuming")

    monkeypatch.setattr(callback_module, "prune_", no_prune)
    callback = PruningCallback(WandaConfig(sparsity=0.5))
    trainer = make_trainer(build_tiny_model("llama", seed=123), tmp_path, [callback])
    trainer.train(resume_from_checkpoint=str(checkpoint))

    saved = load_masks(wanda_run["dir"] / checkpoint.name / MASKS_FILE)
    assert_masks_equal(callback.masks, saved)
    assert_masked(trainer.model, saved)


def test_sparsegpt_with_explicit_calibration(tmp_path):
    windows = make_token_windows(VOCAB, 8, SEQ_LEN, seed=3)
    config = SparseGPTConfig(sparsity=0.5)
    callback = PruningCallback(config, calibration=windows)
    snapshot = SnapshotCallback(lambda: callback.masks)
    trainer = make_trainer(build_tiny_model("llama"), tmp_path, [callback, snapshot], max_steps=4)
    trainer.train()

    # the same pruning outside the Trainer: the given windows were used, not the train data
    reference_model = build_tiny_model("llama")
    reference = prune_(reference_model, config, windows, show_progress=False)
    assert_masks_equal(callback.masks, reference.masks)
    expected = target_weights(reference_model, reference.masks)
    for name, weight in snapshot.weights.items():
        torch.testing.assert_close(weight, expected[name], rtol=1e-5, atol=1e-6)

    masks = callback.masks
    assert len(masks) == N_TARGETS
    assert_masked(trainer.model, masks)
    assert_trained(snapshot.weights, trainer.model, masks)
    assert_masks_equal(load_masks(tmp_path / f"checkpoint-{SAVE_STEPS}" / MASKS_FILE), masks)


def test_rejects_non_config():
    with pytest.raises(TypeError, match="PruningConfig"):
        PruningCallback({"method": "wanda", "sparsity": 0.5})
    with pytest.raises(TypeError, match="PruningConfig"):
        PruningCallback("wanda")


def test_rejects_zero_calibration_batches():
    with pytest.raises(ValueError, match="num_calibration_batches"):
        PruningCallback(WandaConfig(sparsity=0.5), num_calibration_batches=0)
