"""Recipes, the hf-sparse command line and oneshot, end to end on a tiny local model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from conftest import build_tiny_model, build_word_tokenizer
from transformers import AutoModelForCausalLM

from hf_sparse.cli import main
from hf_sparse.masks.bitmask import MASKS_FILE, load_masks
from hf_sparse.models import weight_matrix
from hf_sparse.outputs import read_results
from hf_sparse.pruning import load_pruning_recipe, oneshot, pruning_recipe_from_dict

ALL_RECIPES = sorted((Path(__file__).parents[2] / "recipes").glob("*.yaml"))
RECIPES = [p for p in ALL_RECIPES if "pruning" in yaml.safe_load(p.read_text())]
WORDS = " ".join(f"w{i % 97} x{(i * 7) % 31}" for i in range(3000))


@pytest.fixture
def tiny_dir(tmp_path) -> Path:
    """A tiny llama + word tokenizer saved like a Hub model, and a local text file."""
    folder = tmp_path / "tiny-llama"
    build_tiny_model("llama").save_pretrained(folder)
    build_word_tokenizer(WORDS).save_pretrained(folder)
    (tmp_path / "text.txt").write_text(WORDS)
    return folder


def _small(recipe_dict: dict, model: Path, text: Path, out: Path) -> dict:
    recipe_dict.update(model=str(model), output_dir=str(out))
    recipe_dict["calibration"].update(dataset=str(text), num_samples=4, sequence_length=16)
    recipe_dict["evaluation"].update(dataset=str(text), sequence_length=16, num_windows=4)
    return recipe_dict


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_shipped_recipes_load_and_apply_to_a_tiny_model(path, tiny_dir, tmp_path):
    recipe = load_pruning_recipe(path)
    data = _small(recipe.to_dict(), tiny_dir, tmp_path / "text.txt", tmp_path / "out")
    result = oneshot(None, pruning_recipe_from_dict(data), show_progress=False)
    assert result.metrics["sparsity"] == pytest.approx(recipe.pruning.sparsity, abs=0.01)
    assert result.metrics["pruned"]["perplexity"] > 0
    saved = tmp_path / "out"
    reloaded = AutoModelForCausalLM.from_pretrained(saved).eval()
    ids = torch.randint(0, 128, (2, 12))
    with torch.no_grad():
        assert torch.allclose(reloaded(ids).logits, result.model(ids).logits, atol=1e-6)
    masks = load_masks(saved / MASKS_FILE)
    modules = dict(reloaded.named_modules())
    for name, keep in masks.items():
        assert torch.equal(weight_matrix(modules[name]) != 0, keep), name
    config = json.loads((saved / "config.json").read_text())
    assert config["sparsity"]["method"] == recipe.pruning.method
    assert pruning_recipe_from_dict(yaml.safe_load((saved / "recipe.yaml").read_text()))
    results = read_results(saved)
    assert results["kind"] == "pruning" and results["config"]["method"] == recipe.pruning.method
    assert results["metrics"]["pruned"] == result.metrics["pruned"]
    assert results["timings"]["prune_seconds"] > 0 and results["versions"]["torch"]
    assert "perplexity" in (saved / "README.md").read_text()


def test_unknown_recipe_keys_are_rejected_with_the_valid_list(tmp_path):
    bad = {"model": "x", "pruning": {"sparsegpt": {"sparsity": 0.5}}, "calibraton": {}}
    with pytest.raises(ValueError, match="calibraton.*valid keys"):
        pruning_recipe_from_dict(bad)
    bad = {
        "model": "x",
        "pruning": {"sparsegpt": {"sparsity": 0.5}},
        "calibration": {"num_sample": 3},
    }
    with pytest.raises(ValueError, match="num_sample.*valid keys.*num_samples"):
        pruning_recipe_from_dict(bad)
    with pytest.raises(ValueError, match="exactly one method"):
        pruning_recipe_from_dict({"model": "x", "pruning": {}})
    (tmp_path / "bad.yaml").write_text("model: [unclosed")
    with pytest.raises(ValueError, match="not valid YAML"):
        load_pruning_recipe(tmp_path / "bad.yaml")


def test_cli_prune_then_eval(tiny_dir, tmp_path, capsys):
    out = tmp_path / "pruned"
    text = str(tmp_path / "text.txt")
    code = main(
        [
            "prune",
            str(tiny_dir),
            "--method",
            "wanda",
            "--mask",
            "2:4",
            "--dataset",
            text,
            "--num-samples",
            "4",
            "--sequence-length",
            "16",
            "--eval-dataset",
            text,
            "--num-windows",
            "4",
            "--eval-sequence-length",
            "16",
            "--output-dir",
            str(out),
        ]
    )
    assert code == 0
    printed = capsys.readouterr().out
    assert "pruned perplexity" in printed and "sparsity:           50.00%" in printed
    code = main(
        ["eval", str(out), "--dataset", text, "--sequence-length", "16", "--num-windows", "4"]
    )
    assert code == 0
    report = json.loads(capsys.readouterr().out)
    assert report["windows"] == 4 and report["linear_sparsity"] > 0.4


def test_cli_errors_are_clear_and_leave_no_output(tiny_dir, tmp_path, capsys):
    text = str(tmp_path / "text.txt")
    out = tmp_path / "never"
    assert main(["prune", str(tiny_dir), "--sparsity", "1.5", "--output-dir", str(out)]) == 2
    assert "sparsity must be in [0, 1), got 1.5" in capsys.readouterr().err
    assert (
        main(["prune", str(tmp_path / "missing"), "--sparsity", "0.5", "--output-dir", str(out)])
        == 2
    )
    assert "does not exist" in capsys.readouterr().err
    short = tmp_path / "short.txt"
    short.write_text("w1 w2 w3")
    assert (
        main(
            [
                "prune",
                str(tiny_dir),
                "--sparsity",
                "0.5",
                "--dataset",
                str(short),
                "--sequence-length",
                "16",
                "--num-samples",
                "2",
                "--no-eval",
                "--output-dir",
                str(out),
            ]
        )
        == 2
    )
    assert "shorter than one window" in capsys.readouterr().err
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".never")]
    existing = tmp_path / "existing"
    existing.mkdir()
    (existing / "keep.txt").write_text("x")
    assert (
        main(
            [
                "prune",
                str(tiny_dir),
                "--sparsity",
                "0.5",
                "--dataset",
                text,
                "--num-samples",
                "2",
                "--sequence-length",
                "16",
                "--no-eval",
                "--output-dir",
                str(existing),
            ]
        )
        == 2
    )
    assert "already exists" in capsys.readouterr().err
    assert (existing / "keep.txt").exists()


def test_failed_save_leaves_no_half_written_folder(tiny_dir, tmp_path, monkeypatch):
    import hf_sparse.pruning.pipeline as pipeline_module

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(pipeline_module, "save_masks", broken)
    recipe = {
        "model": str(tiny_dir),
        "pruning": {"magnitude": {"sparsity": 0.5}},
        "output_dir": str(tmp_path / "out"),
    }
    with pytest.raises(OSError, match="disk full"):
        oneshot(None, recipe, show_progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["text.txt", "tiny-llama"]


def test_cli_run_recipe_file(tiny_dir, tmp_path, capsys):
    data = _small(
        load_pruning_recipe(RECIPES[0]).to_dict(),
        tiny_dir,
        tmp_path / "text.txt",
        tmp_path / "run-out",
    )
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(data))
    assert main(["run", str(path)]) == 0
    assert "saved to" in capsys.readouterr().out
    assert main(["run", str(path)]) == 2  # exists now
    assert main(["run", str(path), "--overwrite"]) == 0
