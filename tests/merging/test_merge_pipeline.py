"""Merge recipes end to end on tiny models: full-model and adapter outputs, CLI, bad input."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM

import hf_sparse  # noqa: F401  (registers MASKED_LR)
from hf_sparse.cli import main
from hf_sparse.merging.pipeline import merge_recipe_from_dict, run_merge_recipe
from tests.conftest import build_tiny_model, build_word_tokenizer

TEXT = " ".join(f"w{i % 97} w{(i * 7) % 89}" for i in range(3000))


@pytest.fixture
def family(saved_family, tmp_path):
    base, base_dir, folders = saved_family("llama", 2)
    build_word_tokenizer(TEXT).save_pretrained(base_dir)
    (tmp_path / "calib.txt").write_text(TEXT)
    return base, base_dir, folders, tmp_path


def _recipe(base_dir, folders, method="ties", **extra):
    return {
        "merge_method": method,
        "base_model": str(base_dir),
        "models": [
            {"model": str(f), "parameters": {"weight": w}}
            for f, w in zip(folders, [1.0, 0.5], strict=True)
        ],
        "parameters": {"density": 0.4},
        **extra,
    }


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_full_output_reloads_with_from_pretrained(family):
    base, base_dir, folders, tmp = family
    calibration = {"dataset": str(tmp / "calib.txt"), "num_samples": 4, "sequence_length": 16}
    recipe = merge_recipe_from_dict(
        _recipe(base_dir, folders, "sparsegpt_tv", calibration=calibration)
    )
    run = run_merge_recipe(recipe, output_dir=tmp / "merged", show_progress=False)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp / "merged")
    ids = torch.randint(0, 100, (2, 12))
    torch.testing.assert_close(_logits(reloaded, ids), _logits(run.result.model, ids))
    config = json.loads((tmp / "merged" / "config.json").read_text())
    assert config["merging"]["method"] == "sparsegpt_tv"
    assert config["merging"]["models"][1]["weight"] == 0.5
    results = json.loads((tmp / "merged" / "hf_sparse_results.json").read_text())
    assert results["kind"] == "merging" and results["config"]["method"] == "sparsegpt_tv"
    assert results["metrics"]["mean_relative_reconstruction_error"] < 1
    card = (tmp / "merged" / "README.md").read_text()
    assert "sparsegpt_tv" in card and str(folders[1]) in card
    saved = yaml.safe_load((tmp / "merged" / "recipe.yaml").read_text())
    assert merge_recipe_from_dict(saved).to_dict() == recipe.to_dict()  # round trip


def test_adapter_output_of_lora_sources_reproduces_the_merged_model(family):
    base, base_dir, _, tmp = family
    adapters = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        lora = LoraConfig(r=4, target_modules=["q_proj", "up_proj"], init_lora_weights=False)
        peft_model = get_peft_model(build_tiny_model("llama"), lora)
        peft_model.peft_config["default"].base_model_name_or_path = str(base_dir)
        peft_model.save_pretrained(tmp / f"lora{seed}")
        adapters.append(tmp / f"lora{seed}")
    full = run_merge_recipe(
        merge_recipe_from_dict(_recipe(base_dir, adapters, "ties")),
        output_dir=tmp / "full",
        show_progress=False,
    )
    run_merge_recipe(
        merge_recipe_from_dict(_recipe(base_dir, adapters, "ties", output="adapter")),
        output_dir=tmp / "adapter",
        show_progress=False,
    )
    assert (tmp / "adapter" / "adapter_model.safetensors").exists()
    assert not (tmp / "adapter" / "model.safetensors").exists()
    loaded = PeftModel.from_pretrained(build_tiny_model("llama"), tmp / "adapter")
    ids = torch.randint(0, 100, (2, 12))
    torch.testing.assert_close(_logits(loaded, ids), _logits(full.result.model, ids))
    assert "PeftModel.from_pretrained" in (tmp / "adapter" / "README.md").read_text()


def test_cli_merge_and_run_dispatch(family, capsys):
    _, base_dir, folders, tmp = family
    path = tmp / "merge.yaml"
    path.write_text(yaml.safe_dump(_recipe(base_dir, folders, "dare_ties", output_dir=None)))
    assert main(["merge", str(path), "--output-dir", str(tmp / "out")]) == 0
    assert "merged task vector" in capsys.readouterr().out
    assert (tmp / "out" / "model.safetensors").exists()
    # an existing output folder is refused without --overwrite, and left as it was
    before = (tmp / "out" / "model.safetensors").stat().st_mtime_ns
    assert main(["run", str(path), "--output-dir", str(tmp / "out")]) == 2
    assert "already exists" in capsys.readouterr().err
    assert (tmp / "out" / "model.safetensors").stat().st_mtime_ns == before
    assert main(["run", str(path), "--output-dir", str(tmp / "out"), "--overwrite"]) == 0


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"merge_method": "slerp"}, "unknown merge method 'slerp'"),
        ({"parameters": {"density": 0}}, r"density must be in \(0, 1\]"),
        ({"parameters": {"densty": 0.5}}, r"unknown key\(s\) \['densty'\]"),
        ({"output": "gguf"}, "output must be one of"),
        ({"merge_method": "sparsegpt_tv"}, "needs calibration data"),
        ({"models": []}, "needs `models:`"),
        ({"lambda": 1.0}, r"unknown key\(s\) \['lambda'\]"),
    ],
)
def test_recipe_errors_name_the_problem(family, change, message):
    _, base_dir, folders, _ = family
    with pytest.raises(ValueError, match=message):
        merge_recipe_from_dict({**_recipe(base_dir, folders), **change})


def test_mismatched_model_is_refused_before_any_output(family):
    _, base_dir, folders, tmp = family
    build_tiny_model("llama", vocab_size=96).save_pretrained(tmp / "other")
    recipe = merge_recipe_from_dict(_recipe(base_dir, [folders[0], tmp / "other"]))
    with pytest.raises(ValueError, match="vocab_size"):
        run_merge_recipe(recipe, output_dir=tmp / "never", show_progress=False)
    assert not (tmp / "never").exists()


def test_adapter_output_refuses_non_linear_deltas_and_writes_nothing(family):
    _, base_dir, folders, tmp = family
    changed = build_tiny_model("llama")
    with torch.no_grad():
        changed.model.norm.weight.add_(0.5)
    changed.save_pretrained(tmp / "norm-changed")
    recipe = merge_recipe_from_dict(
        _recipe(base_dir, [folders[0], tmp / "norm-changed"], output="adapter")
    )
    with pytest.raises(ValueError, match="deltas of linear weights only.*model.norm"):
        run_merge_recipe(recipe, output_dir=tmp / "never", show_progress=False)
    assert not (tmp / "never").exists()
