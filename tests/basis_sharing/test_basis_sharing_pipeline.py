"""Basis Sharing recipes and ``hf-sparse compress`` (the command line's own parser)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
import yaml
from conftest import build_tiny_model, build_word_tokenizer
from peft import PeftModel
from transformers import AutoModelForCausalLM

from hf_sparse.basis_sharing import basis_sharing_recipe_from_dict
from hf_sparse.cli import build_parser
from hf_sparse.recipes import CalibrationConfig

ROOT = Path(__file__).resolve().parents[2]
TEXT = " ".join(f"w{i % 97} w{(i * 7) % 89} w{(i * 13) % 31}" for i in range(3000))


def parse(argv: list[str]) -> argparse.Namespace:
    return build_parser().parse_args(argv)


@pytest.fixture
def tiny_folder(tmp_path) -> Path:
    folder = tmp_path / "tiny-llama"
    build_tiny_model("llama", num_hidden_layers=4).save_pretrained(folder)
    build_word_tokenizer(TEXT).save_pretrained(folder)
    (tmp_path / "text.txt").write_text(TEXT)
    return folder


def test_compress_from_flags_saves_a_loadable_adapter(tiny_folder, tmp_path, capsys):
    out = tmp_path / "out"
    argv = ["compress", "--model", str(tiny_folder), "--ratio", "0.3", "--group-size", "2",
            "--dataset", str(tmp_path / "text.txt"), "--num-samples", "4",
            "--sequence-length", "32", "--eval-windows", "2", "--eval-sequence-length", "32",
            "--output-dir", str(out)]  # fmt: skip
    args = parse(argv)
    assert args.func(args) == 0
    assert "removed" in capsys.readouterr().out
    files = {p.name for p in out.iterdir()}
    assert {"adapter_model.safetensors", "adapter_config.json", "hf_sparse_results.json",
            "recipe.yaml"} <= files  # fmt: skip
    assert not any(name.endswith((".bin", ".pt", ".pkl")) for name in files)
    results = json.loads((out / "hf_sparse_results.json").read_text())
    assert results["kind"] == "basis_sharing" and results["config"]["group_size"] == 2
    assert results["metrics"]["parameters"]["removed"] > 0
    assert results["metrics"]["compressed"]["perplexity"] > 0
    base = AutoModelForCausalLM.from_pretrained(tiny_folder)
    loaded = PeftModel.from_pretrained(base, out)
    assert loaded.peft_config["default"].group_size == 2
    # a second run refuses the non-empty folder before any work
    with pytest.raises(FileExistsError):
        args.func(parse(argv))


def test_recipe_files_parse_and_flags_override(tmp_path):
    for name in ("basis-sharing-20.yaml", "basis-sharing-40-update.yaml", "basis-sharing-40.yaml"):
        recipe = basis_sharing_recipe_from_dict(
            yaml.safe_load((ROOT / "recipes" / name).read_text())
        )
        config = recipe.config()
        assert config.ratio in (0.2, 0.4) and config.group_size in (2, 4)
        assert config.update_coefficients == ("update" in name)
        # the measured best settings share MLP roles only, with a per-layer refit; the update
        # recipe keeps the paper's default sharing
        mlp_only = set(config.shared_roles) <= {"gate", "up", "down"}
        assert (mlp_only and config.layer_refit) == ("update" not in name)
        assert recipe.calibration.num_samples == 64 and recipe.calibration.seed == 0


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"basis_sharing": {"ratio": 1.5}}, "ratio must be in"),
        ({"basis_sharing": {"ratio": 0.2, "rank": 4}}, r"unknown key\(s\) \['rank'\]"),
        ({"basis_sharing": {"ratio": 0.2}, "pruning": {}}, r"unknown key\(s\) \['pruning'\]"),
        ({"basis_sharing": {"ratio": 0.2, "group_size": 0}}, "group_size must be"),
    ],
)
def test_bad_recipes_fail_naming_the_key(data, message):
    with pytest.raises(ValueError, match=message):
        basis_sharing_recipe_from_dict(data)


def test_cli_errors_before_loading_anything(tmp_path):
    args = parse(["compress", "--model", str(tmp_path / "nowhere"), "--output-dir", "x"])
    with pytest.raises(ValueError, match="no ratio"):
        args.func(args)
    args = parse(["compress", "--model", "m", "--ratio", "2", "--output-dir", "x"])
    with pytest.raises(ValueError, match="ratio must be in"):
        args.func(args)


def test_a_group_larger_than_the_model_fails_before_calibration(tiny_folder, tmp_path, monkeypatch):
    args = parse(["compress", "--model", str(tiny_folder), "--ratio", "0.2", "--group-size",
                  "8", "--dataset", str(tmp_path / "text.txt"), "--sequence-length", "16",
                  "--no-eval", "--output-dir", str(tmp_path / "o")])  # fmt: skip

    def no_data(*args, **kwargs):
        raise AssertionError("calibration data was read before the plan was checked")

    # the plan check fires before the calibration file is read
    monkeypatch.setattr(CalibrationConfig, "windows", no_data)
    with pytest.raises(ValueError, match="larger than the number of layers"):
        args.func(args)
    assert not (tmp_path / "o").exists()
