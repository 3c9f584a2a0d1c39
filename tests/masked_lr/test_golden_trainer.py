"""GoldenParamsTrainer and GoldenMaskCallback in real Trainer runs on a tiny Llama (CPU)."""

from __future__ import annotations

import pytest
import torch
from conftest import build_tiny_model, build_word_tokenizer, make_token_windows, tiny_training_args
from hf_sparse.callbacks import GoldenMaskCallback
from hf_sparse.callbacks.masked_lr import GOLDEN_MASKS_FILE
from transformers import Trainer

from hf_sparse.masked_lr import GoldenConfig, GoldenParamsTrainer
from hf_sparse.masks import ParameterMasks

MAX_STEPS = 4
TARGET = "model.layers.1.mlp.up_proj.weight"


def examples(n: int = 16, length: int = 12, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    windows = make_token_windows(n=n, length=length, seed=seed)
    return [{"input_ids": w, "labels": w.clone()} for w in windows]


def one_mask(model, name: str = TARGET, seed: int = 0) -> ParameterMasks:
    weight = dict(model.named_parameters())[name]
    generator = torch.Generator().manual_seed(seed)
    return ParameterMasks({name: torch.rand(weight.shape, generator=generator) < 0.2})


def snapshot(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def test_masked_lr_trains_only_the_masked_entries(tmp_path):
    model = build_tiny_model("llama")
    masks = one_mask(model)
    before = snapshot(model)
    trainer = GoldenParamsTrainer(
        model=model, args=tiny_training_args(tmp_path), train_dataset=examples(), masks=masks
    )
    trainer.train()
    after = snapshot(model)
    mask = masks[TARGET]
    assert torch.equal(after[TARGET][~mask], before[TARGET][~mask])
    assert (after[TARGET][mask] != before[TARGET][mask]).float().mean() > 0.9
    for name in before:
        if name != TARGET:
            assert torch.equal(after[name], before[name]), name  # no mask: frozen


def test_outside_scale_and_unfrozen_tensors(tmp_path):
    model = build_tiny_model("llama")
    masks = one_mask(model)
    before = snapshot(model)
    trainer = GoldenParamsTrainer(
        model=model,
        args=tiny_training_args(tmp_path, max_steps=1, lr_scheduler_type="constant"),
        train_dataset=examples(),
        masks=masks,
        outside_lr_scale=0.1,
        freeze_unmasked=False,
    )
    trainer.train()
    after = snapshot(model)
    mask = masks[TARGET]
    step = (after[TARGET] - before[TARGET]).abs()
    moved_in, moved_out = step[mask].median(), step[~mask].median()
    # Adam's first step moves every entry by about lr * scale.
    assert moved_in == pytest.approx(1e-2, rel=0.05)
    assert moved_out == pytest.approx(1e-3, rel=0.05)
    other = "model.layers.0.mlp.down_proj.weight"
    assert not torch.equal(after[other], before[other])


def test_golden_params_and_generation_comparison(tmp_path):
    model = build_tiny_model("llama")
    trainer = GoldenParamsTrainer(
        model=model,
        args=tiny_training_args(tmp_path),
        train_dataset=examples(),
        processing_class=build_word_tokenizer("a b c d e f g h"),
    )
    golden = trainer.get_golden_params(
        GoldenConfig(top_k_percent=30, num_samples=4, params=["up", "down"]), show_progress=False
    )
    assert 0 < golden.masks.density() <= 0.3 + 1e-6
    assert all(n.endswith(("up_proj.weight", "down_proj.weight")) for n in golden.masks)
    before = snapshot(model)
    rows = trainer.compare_generations_with_mask(["a b c", "d e"], golden.masks, 5)
    assert [r["prompt"] for r in rows] == ["a b c", "d e"]
    assert all(isinstance(r["original"], str) and isinstance(r["masked"], str) for r in rows)
    after = snapshot(model)
    assert all(torch.equal(before[n], after[n]) for n in before)  # weights restored


def test_callback_computes_masks_saves_and_resumes(tmp_path):
    model = build_tiny_model("llama")
    callback = GoldenMaskCallback(
        GoldenConfig(top_k_percent=40, num_samples=4, params=["gate", "up"])
    )
    args = tiny_training_args(tmp_path, save_strategy="steps", save_steps=2)
    before = snapshot(model)
    trainer = GoldenParamsTrainer(
        model=model, args=args, train_dataset=examples(), callbacks=[callback]
    )
    trainer.train()
    masks = callback.masks
    assert masks is not None and set(masks) and masks.density() <= 0.4 + 1e-6
    after = snapshot(model)
    for name, mask in masks.items():
        assert torch.equal(after[name][~mask], before[name][~mask]), name
    saved = ParameterMasks.load(tmp_path / "checkpoint-2" / GOLDEN_MASKS_FILE)
    assert saved == masks

    resumed_model = build_tiny_model("llama")
    resumed = GoldenMaskCallback(
        GoldenConfig(top_k_percent=40, num_samples=4, params=["gate", "up"])
    )
    trainer = GoldenParamsTrainer(
        model=resumed_model, args=args, train_dataset=examples(seed=1), callbacks=[resumed]
    )
    trainer.train(resume_from_checkpoint=str(tmp_path / "checkpoint-2"))
    assert resumed.masks == masks  # loaded from the checkpoint, not recomputed on new data


def test_callback_with_a_plain_optimizer_names_the_fix(tmp_path):
    model = build_tiny_model("llama")
    masks_file = one_mask(model).save(tmp_path / "m.safetensors")
    trainer = Trainer(
        model=model,
        args=tiny_training_args(tmp_path),
        train_dataset=examples(),
        callbacks=[GoldenMaskCallback(masks_file=masks_file)],
    )
    with pytest.raises(TypeError, match="MaskedAdamW.*GoldenParamsTrainer"):
        trainer.train()


def test_masks_for_another_model_are_refused(tmp_path):
    model = build_tiny_model("llama")
    bad = ParameterMasks({"model.layers.9.mlp.up_proj.weight": torch.ones(2, 2, dtype=bool)})
    with pytest.raises(ValueError, match="does not have"):
        GoldenParamsTrainer(
            model=model, args=tiny_training_args(tmp_path), train_dataset=examples(), masks=bad
        )
    with pytest.raises(FileNotFoundError, match="does not exist"):
        GoldenMaskCallback(masks_file=tmp_path / "missing.safetensors")
    with pytest.raises(ValueError, match=r"\(0, 100\]"):
        GoldenMaskCallback(GoldenConfig(top_k_percent=0))
    with pytest.raises(TypeError, match="GoldenConfig"):
        GoldenMaskCallback({"top_k_percent": 5})


def test_golden_params_on_raw_examples_name_the_fix(tmp_path):
    trainer = GoldenParamsTrainer(
        model=build_tiny_model("llama"), args=tiny_training_args(tmp_path), train_dataset=examples()
    )
    with pytest.raises(ValueError, match="no 'input_ids'.*prompt_fn="):
        trainer.get_golden_params(GoldenConfig(num_samples=1), dataset=[{"text": "raw"}])


def test_reverse_golden_params_through_the_trainer(tmp_path):
    """The mixin's reverse path: held-out samples default to the trainer's eval dataset and
    equal a direct call on the same sets; the result trains like any mask."""
    from hf_sparse.masked_lr import ReverseGoldenConfig, reverse_golden_masks

    model = build_tiny_model("llama")
    train, held_out = examples(8, seed=0), examples(3, seed=5)
    trainer = GoldenParamsTrainer(
        model=model,
        args=tiny_training_args(tmp_path, max_steps=2),
        train_dataset=train,
        eval_dataset=held_out,
    )
    config = ReverseGoldenConfig(
        target_percent=2.0, num_samples=4, eval_samples=3, rounds=4, strategy="chaos"
    )
    result = trainer.get_reverse_golden_params(config, show_progress=False)
    direct = reverse_golden_masks(model, config, train, None, held_out, show_progress=False)
    assert result.masks == direct.masks and result.kl == pytest.approx(direct.kl)
    assert result.settings["eval_samples"] == 3 and result.settings["strategy"] == "chaos_driven"
    total = sum(p.numel() for n, p in model.named_parameters() if n in result.masks)
    assert result.masks.count() == round(0.02 * total) and result.kl > 0
    other = trainer.get_reverse_golden_params(
        config, eval_dataset=examples(3, seed=9), show_progress=False
    )
    assert other.kl != pytest.approx(result.kl)  # another held-out set, another KL
    before = snapshot(model)
    trainer.set_masked_lr(result.masks)
    trainer.train()
    after = snapshot(model)
    for name, mask in result.masks.items():
        assert torch.equal(after[name][~mask], before[name][~mask])
    with pytest.raises(ValueError, match="no dataset"):
        GoldenParamsTrainer(
            model=model, args=tiny_training_args(tmp_path)
        ).get_reverse_golden_params(config)
