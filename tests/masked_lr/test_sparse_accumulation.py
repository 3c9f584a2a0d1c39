"""SparseGradientAccumulator: sums at mask positions equal the dense accumulated gradient
there, in a plain loop and inside a Trainer with gradient accumulation."""

from __future__ import annotations

import pytest
import torch
from conftest import build_tiny_model, make_token_windows, tiny_training_args
from hf_sparse.callbacks import SparseGradientAccumulationCallback

from hf_sparse.masked_lr import GoldenParamsTrainer, SparseGradientAccumulator
from hf_sparse.masks import ParameterMasks

NAMES = ("model.layers.0.self_attn.q_proj.weight", "model.layers.1.mlp.down_proj.weight")


def masks_for(model, density: float = 0.1, seed: int = 0) -> ParameterMasks:
    params = dict(model.named_parameters())
    generator = torch.Generator().manual_seed(seed)
    return ParameterMasks(
        {n: torch.rand(params[n].shape, generator=generator) < density for n in NAMES}
    )


def test_plain_loop_sums_equal_the_dense_gradient_at_the_mask():
    model = build_tiny_model("llama")
    masks = masks_for(model)
    batches = make_token_windows(n=3, length=10, seed=2)
    params = dict(model.named_parameters())
    for batch in batches:  # the dense reference
        model(input_ids=batch[None], labels=batch[None]).loss.backward()
    dense = {n: params[n].grad.clone() for n in NAMES}
    model.zero_grad(set_to_none=True)
    accumulator = SparseGradientAccumulator(model, masks)
    for batch in batches:
        model(input_ids=batch[None], labels=batch[None]).loss.backward()
        accumulator.accumulate_()
        assert all(params[n].grad is None for n in NAMES)  # dense gradients freed
    accumulator.write_grads_()
    for name in NAMES:
        mask = masks[name]
        torch.testing.assert_close(params[name].grad[mask], dense[name][mask], rtol=1e-6, atol=1e-7)
        assert not params[name].grad[~mask].any()
    kept = sum(int(m.sum()) for m in masks.values())
    assert accumulator.storage_bytes() == 8 * kept <= 0.25 * accumulator.dense_bytes()


def run(tmp_path, callbacks):
    model = build_tiny_model("llama")
    masks = masks_for(model)
    windows = make_token_windows(n=24, length=12, seed=1)
    data = [{"input_ids": w, "labels": w.clone()} for w in windows]
    args = tiny_training_args(
        tmp_path,
        max_steps=2,
        per_device_train_batch_size=2,
        gradient_accumulation_steps=3,
        max_grad_norm=0.0,
    )
    trainer = GoldenParamsTrainer(
        model=model, args=args, train_dataset=data, masks=masks, callbacks=callbacks
    )
    trainer.train()
    return model, masks


def test_trainer_with_gradient_accumulation_trains_as_the_dense_path(tmp_path):
    dense_model, masks = run(tmp_path / "dense", [])
    callback = SparseGradientAccumulationCallback()  # masks taken from the optimizer
    sparse_model, _ = run(tmp_path / "sparse", [callback])
    dense, sparse = dict(dense_model.named_parameters()), dict(sparse_model.named_parameters())
    for name in NAMES:
        torch.testing.assert_close(sparse[name], dense[name], rtol=1e-5, atol=1e-6)
    assert callback.accumulator is None  # detached at the end
    moved = build_tiny_model("llama")
    assert not torch.equal(dict(moved.named_parameters())[NAMES[0]], sparse[NAMES[0]])


def test_callback_refuses_an_optimizer_that_moves_unmasked_entries(tmp_path):
    model = build_tiny_model("llama")
    masks = masks_for(model)
    windows = make_token_windows(n=8, length=12, seed=1)
    trainer = GoldenParamsTrainer(
        model=model,
        args=tiny_training_args(tmp_path, max_steps=1),
        train_dataset=[{"input_ids": w, "labels": w.clone()} for w in windows],
        masks=masks,
        outside_lr_scale=0.5,
        callbacks=[SparseGradientAccumulationCallback()],
    )
    with pytest.raises(ValueError, match="outside_lr_scale 0"):
        trainer.train()
