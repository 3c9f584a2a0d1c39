"""Prune, then recover: the fine-tune keeps the mask (exact zeros), is deterministic, and the
recipe's ``recover:`` block runs it through Trainer and reports perplexity by step."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from conftest import ARCHS, build_tiny_model, build_word_tokenizer

from hf_sparse.models import find_linear, weight_matrix
from hf_sparse.pruning import (
    SparseGPTConfig,
    WandaConfig,
    oneshot,
    prune_,
    pruning_recipe_from_dict,
)
from hf_sparse.pruning.recover import RecoveryConfig, recover_, training_windows

WORDS = " ".join(f"w{i % 97} x{(i * 7) % 31}" for i in range(3000))


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: statistics on one thread


@pytest.fixture
def text(tmp_path) -> Path:
    path = tmp_path / "text.txt"
    path.write_text(WORDS)
    return path


def _recovered(arch: str, config, text: Path, steps: int = 6):
    tokenizer = build_word_tokenizer(WORDS)
    model = build_tiny_model(arch)
    windows = training_windows(tokenizer, str(text), RecoveryConfig(steps=2, sequence_length=16))
    result = prune_(model, config, windows, batch_size=2, show_progress=False)
    before = {n: weight_matrix(find_linear(model, n)).detach().clone() for n in result.masks}
    recovery = recover_(
        model, result.masks,
        RecoveryConfig(steps=steps, learning_rate=1e-2, sequence_length=16, eval_at=[steps]),
        tokenizer, str(text), eval_windows=windows[:2], show_progress=False,
    )  # fmt: skip
    return model, result, before, recovery


@pytest.mark.slow
@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize(
    "config",
    [SparseGPTConfig(mask="2:4", block_size=16), WandaConfig(sparsity=0.6, sparsity_profile="owl")],
    ids=["sparsegpt-2:4", "wanda-owl-60"],
)
def test_recovery_trains_the_kept_weights_and_keeps_exact_zeros(arch, config, text):
    model, result, before, recovery = _recovered(arch, config, text)
    changed = 0
    for name, keep in result.masks.items():
        weight = weight_matrix(find_linear(model, name)).detach()
        assert torch.all(weight[~keep] == 0), name  # the mask is kept, to the bit
        changed += int((weight[keep] != before[name][keep]).sum())
    assert changed > 0  # and the kept weights were trained
    fresh = build_tiny_model(arch)  # embeddings (never pruned) are frozen by default
    assert torch.equal(model.get_input_embeddings().weight, fresh.get_input_embeddings().weight)
    assert model.get_input_embeddings().weight.requires_grad  # and unfrozen afterwards
    assert recovery.sparsity_after == pytest.approx(result.sparsity, abs=1e-9)
    assert set(recovery.perplexity) == {6} and recovery.losses


@pytest.mark.slow
def test_recovery_is_deterministic(text):
    config = SparseGPTConfig(sparsity=0.5, block_size=16)
    first, _, _, rec1 = _recovered("llama", config, text)
    second, _, _, rec2 = _recovered("llama", config, text)
    for (n, a), (_, b) in zip(first.state_dict().items(), second.state_dict().items(), strict=True):
        assert torch.equal(a, b), n
    assert rec1.perplexity == rec2.perplexity


def test_training_windows_come_from_the_calibration_split_in_a_seeded_order(text):
    tokenizer = build_word_tokenizer(WORDS)
    config = RecoveryConfig(steps=5, batch_size=3, sequence_length=16)
    windows = training_windows(tokenizer, str(text), config)
    assert windows.shape == (15, 16)
    assert torch.equal(windows, training_windows(tokenizer, str(text), config))
    other = training_windows(tokenizer, str(text), RecoveryConfig(steps=5, batch_size=3,
                             sequence_length=16, seed=1))  # fmt: skip
    assert not torch.equal(windows, other)


def test_recover_block_errors_name_the_key():
    with pytest.raises(ValueError, match="recover.steps must be a positive integer"):
        RecoveryConfig(steps=0)
    with pytest.raises(ValueError, match="recover.eval_at"):
        RecoveryConfig(steps=10, eval_at=[20])
    with pytest.raises(ValueError, match="recover.*valid keys"):
        pruning_recipe_from_dict(
            {"model": "x", "pruning": {"wanda": {"sparsity": 0.5}}, "recover": {"stepz": 3}}
        )


@pytest.mark.slow
def test_recipe_with_a_recover_block_reports_perplexity_by_step(tmp_path, text):
    folder = tmp_path / "tiny"
    build_tiny_model("llama").save_pretrained(folder)
    build_word_tokenizer(WORDS).save_pretrained(folder)
    recipe = pruning_recipe_from_dict({
        "model": str(folder),
        "calibration": {"dataset": str(text), "num_samples": 4, "sequence_length": 16},
        "pruning": {"sparsegpt": {"mask": "2:4", "block_size": 16}},
        "evaluation": {"dataset": str(text), "sequence_length": 16, "num_windows": 4},
        "recover": {"steps": 4, "learning_rate": 0.01, "sequence_length": 16, "eval_at": [2, 4]},
        "output_dir": str(tmp_path / "out"),
    })  # fmt: skip
    result = oneshot(None, recipe, show_progress=False)
    by_step = result.metrics["recovery"]["perplexity_by_step"]
    assert list(by_step) == ["0", "2", "4"]
    assert by_step["0"] == result.metrics["pruned"]["perplexity"]
    assert result.metrics["sparsity"] == pytest.approx(0.5, abs=1e-9)
    saved = yaml.safe_load((tmp_path / "out" / "recipe.yaml").read_text())
    assert pruning_recipe_from_dict(saved).recover.steps == 4
