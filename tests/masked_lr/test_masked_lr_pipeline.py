"""`hf-sparse mask ...`, mask recipes and the golden-mask SFT recipe on a tiny local model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from conftest import build_tiny_model, build_word_tokenizer

from hf_sparse.cli import main
from hf_sparse.masked_lr import (
    finetune_recipe_from_dict,
    mask_recipe_from_dict,
    run_finetune_recipe,
)
from hf_sparse.masks import ParameterMasks
from hf_sparse.outputs import RESULTS_FILE, read_results

RECIPES_DIR = Path(__file__).parents[2] / "recipes"
WORDS = " ".join(f"w{i % 97} x{(i * 7) % 31}" for i in range(3000))
RECORDS = [
    {"instruction": f"say w{i} x{i % 31}", "input": "", "output": f"w{(i * 3) % 97} x{i % 7}"}
    for i in range(60)
]


@pytest.fixture
def tiny(tmp_path) -> dict[str, Path]:
    folder = tmp_path / "tiny-llama"
    build_tiny_model("llama").save_pretrained(folder)
    tokenizer = build_word_tokenizer(WORDS + " say")
    tokenizer.eos_token = "[UNK]"
    tokenizer.save_pretrained(folder)
    (tmp_path / "text.txt").write_text(WORDS)
    with (tmp_path / "records.jsonl").open("w") as handle:
        handle.writelines(json.dumps(r) + "\n" for r in RECORDS)
    return {"model": folder, "text": tmp_path / "text.txt", "records": tmp_path / "records.jsonl"}


@pytest.mark.parametrize("job", ["score", "golden", "reverse"])
def test_mask_cli_writes_masks_and_summary(tiny, tmp_path, job, capsys):
    out = tmp_path / f"out-{job}"
    argv = ["mask", job, str(tiny["model"]), "--dataset", str(tiny["text"]), "--format", "text"]
    argv += ["--num-samples", "4", "--eval-samples", "2", "--max-length", "12"]
    argv += ["--output-dir", str(out)]
    argv += ["--target-percent", "5", "--rounds", "3"] if job == "reverse" else []
    argv += ["--top-k-percent", "5"] if job != "reverse" else []
    assert main(argv) == 0
    masks = ParameterMasks.load(out / "masks.safetensors")
    summary = read_results(out)
    assert summary["kind"] == "masks" and summary["job"] == job
    assert summary["metrics"]["kept"] == masks.count() > 0
    assert yaml.safe_load((out / "recipe.yaml").read_text())["mask"][job]
    assert "kept:" in capsys.readouterr().out
    assert main(argv) == 2  # existing folder refused without --overwrite
    assert main([*argv, "--overwrite"]) == 0


def test_mask_cli_bad_input_is_a_clear_error(tiny, tmp_path, capsys):
    argv = ["mask", "golden", str(tiny["model"]), "--dataset", str(tiny["text"])]
    argv += ["--format", "text", "--output-dir", str(tmp_path / "x")]
    assert main([*argv, "--top-k-percent", "150"]) == 2
    assert "(0, 100]" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
    assert main([*argv, "--params", "no_such_layer"]) == 2
    assert not (tmp_path / "x").exists()


def test_mask_recipes_refuse_bad_keys_and_jobs():
    with pytest.raises(ValueError, match="valid keys"):
        mask_recipe_from_dict({"model": "x", "mask": {"golden": {}}, "dta": {}})
    with pytest.raises(ValueError, match="unknown mask job"):
        mask_recipe_from_dict({"model": "x", "mask": {"silver": {}}})
    with pytest.raises(ValueError, match="per-sample metric"):
        mask_recipe_from_dict({"model": "x", "mask": {"golden": {"metric": "magnitude"}}})


def test_golden_sft_recipe_trains_a_sparse_adapter(tiny, tmp_path):
    data = yaml.safe_load((RECIPES_DIR / "golden-mask-sft.yaml").read_text())
    out = tmp_path / "sft"
    data.update(model=str(tiny["model"]), output_dir=str(out))
    data["data"].update(dataset=str(tiny["records"]), num_samples=3, max_length=16)
    data["finetune"].update(max_steps=3, train_samples=12, eval_samples=4, max_length=16)
    data["finetune"].update(learning_rate=1e-2)
    results = run_finetune_recipe(finetune_recipe_from_dict(data))
    masks = ParameterMasks.load(out / "masks.safetensors")
    assert results["trainable_parameters"] == masks.count()
    assert results["eval_loss_after"] != results["eval_loss_before"]
    assert (out / "adapter_model.safetensors").is_file()
    saved = json.loads((out / RESULTS_FILE).read_text())
    assert saved["kind"] == "finetune" and saved["trainable_parameters"] > 0
    assert saved["metrics"]["eval_loss_after"] == results["eval_loss_after"]
    with pytest.raises(ValueError, match="exactly one of"):
        finetune_recipe_from_dict({**data, "masks_file": str(out / "masks.safetensors")})
