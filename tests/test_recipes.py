"""Every shipped recipe dispatches through ``hf-sparse run`` (tiny stand-ins), and the registry.

Stand-ins: each recipe's model becomes a tiny 4-layer Llama saved with a word tokenizer, its
data small local files, its counts and steps a few; everything else (the keys, the method
settings, the kind) is the shipped file's. ``SHRINK`` holds one function per recipe kind.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml
from conftest import build_tiny_model, build_word_tokenizer

from hf_sparse.cli import main
from hf_sparse.outputs import RECIPE_FILE, RESULTS_FILE, SCHEMA_KEYS
from hf_sparse.recipes import RECIPE_KINDS, parse_recipe, recipe_kind_of
from tests.merging.family import perturbed_copy

RECIPES = sorted((Path(__file__).parents[1] / "recipes").glob("*.yaml"))
WORDS = " ".join(f"w{i % 97} x{(i * 7) % 31}" for i in range(3000))
RECORDS = [
    {"instruction": f"say w{i} x{i % 31}", "input": "", "output": f"w{(i * 3) % 97} x{i % 7}"}
    for i in range(60)
]


@pytest.fixture(scope="module")
def standins(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("standins")
    base = build_tiny_model("llama", num_hidden_layers=4)
    base.save_pretrained(root / "tiny")
    tokenizer = build_word_tokenizer(WORDS + " say")
    tokenizer.eos_token = "[UNK]"
    tokenizer.save_pretrained(root / "tiny")
    for index in range(3):
        perturbed_copy(base, seed=10 + index).save_pretrained(root / f"ft{index}")
    (root / "text.txt").write_text(WORDS)
    with (root / "records.jsonl").open("w") as handle:
        handle.writelines(json.dumps(r) + "\n" for r in RECORDS)
    return {"root": root, "model": root / "tiny", "text": root / "text.txt",
            "records": root / "records.jsonl"}  # fmt: skip


def _small_calibration(block: dict, s: dict) -> None:
    block.update(dataset=str(s["text"]), num_samples=4, sequence_length=16)


def _small_evaluation(data: dict, s: dict) -> None:
    if data.get("evaluation") is not None:
        data["evaluation"].update(dataset=str(s["text"]), sequence_length=16, num_windows=2)


def _pruning(data: dict, s: dict) -> None:
    data["model"] = str(s["model"])
    _small_calibration(data.setdefault("calibration", {}), s)
    _small_evaluation(data, s)


def _basis_sharing(data: dict, s: dict) -> None:
    _pruning(data, s)


def _masks(data: dict, s: dict) -> None:
    data["model"] = str(s["model"])
    data["data"].update(dataset=str(s["records"]), num_samples=3, eval_samples=2, max_length=16)
    for settings in data["mask"].values():
        if "rounds" in settings:
            settings["rounds"] = 2


def _finetune(data: dict, s: dict) -> None:
    _masks(data, s)
    data["finetune"].update(max_steps=2, train_samples=8, eval_samples=4, max_length=16)


def _merging(data: dict, s: dict) -> None:
    data["base_model"] = str(s["model"])
    for index, entry in enumerate(data["models"]):
        entry["model"] = str(s["root"] / f"ft{index}")
        if "calibration" in entry:
            _small_calibration(entry["calibration"], s)
    if data.get("calibration"):
        _small_calibration(data["calibration"], s)
    _small_evaluation(data, s)


def _analysis(data: dict, s: dict) -> None:
    data["model"] = str(s["model"])
    text = str(s["text"])
    data["analysis"].update(
        dataset=text, eval_dataset=text, num_samples=2, sequence_length=16, eval_windows=2,
        eval_length=16, top_k=20, progressive_k=[5, 20], stability_seeds=[0, 1],
        single_weight_candidates=2, control_seeds=1, n_clusters=2,
    )  # fmt: skip


def _spd(data: dict, s: dict) -> None:
    data.setdefault("train", {}).update(steps=3, batch_size=8)
    if "model" in data:  # a language model: a tiny one, its last MLP
        data["model"] = str(s["model"])
        data["spd"].update(C=4, target_modules=["model.layers.3.mlp.up_proj"])
        data["loss"]["faithfulness_warmup_steps"] = 2
        data["data"].update(source=str(s["text"]), count=4, length=16, eval_count=2)
    else:
        data["plots"] = False
        data.setdefault("target_training", {}).update(steps=10, batch_size=16)
        data["loss"] = {**data.get("loss", {}), "faithfulness_warmup_steps": 2}


SHRINK: dict[str, Callable[[dict, dict], None]] = {
    "pruning": _pruning,
    "basis_sharing": _basis_sharing,
    "masks": _masks,
    "finetune": _finetune,
    "merging": _merging,
    "analysis": _analysis,
    "spd": _spd,
}


def test_every_registered_kind_has_a_shipped_recipe_and_a_shrink():
    shipped = {recipe_kind_of(yaml.safe_load(p.read_text()), p.name).name for p in RECIPES}
    assert shipped == set(RECIPE_KINDS) == set(SHRINK)


@pytest.mark.slow  # every shipped recipe end to end on tiny stand-ins: ~40 s in all
@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_every_shipped_recipe_runs_through_hf_sparse_run(path, standins, tmp_path, capsys):
    data = yaml.safe_load(path.read_text())
    kind = recipe_kind_of(data, path.name)
    SHRINK[kind.name](data, standins)
    out = tmp_path / "out"
    data["output_dir"] = str(out)
    small = tmp_path / path.name
    small.write_text(yaml.safe_dump(data))
    assert main(["run", str(small)]) == 0, capsys.readouterr().err
    assert capsys.readouterr().out.strip()  # the kind's summary
    results = json.loads((out / RESULTS_FILE).read_text())
    assert set(SCHEMA_KEYS) <= set(results) and results["versions"]["torch"]
    saved = yaml.safe_load((out / RECIPE_FILE).read_text())
    assert recipe_kind_of(saved).name == kind.name  # the saved recipe is a recipe of its kind
    assert not list(tmp_path.glob(".out.tmp-*"))  # no temporary folder left behind


def test_registry_refuses_unknown_and_mixed_recipes(tmp_path):
    with pytest.raises(ValueError, match="no known recipe kind.*pruning \\(pruning\\)"):
        recipe_kind_of({"model": "x", "prunning": {}})
    mixed = {"model": "x", "pruning": {"magnitude": {"sparsity": 0.5}}, "analysis": {}}
    with pytest.raises(ValueError, match="mixes the keys of several recipe kinds"):
        recipe_kind_of(mixed)
    quick = Path(__file__).parents[1] / "recipes" / "quickstart.yaml"
    with pytest.raises(ValueError, match="is a pruning recipe, not merging"):
        parse_recipe(quick, kind="merging")
    kind, recipe = parse_recipe(quick, model="other", output_dir=tmp_path / "o")
    assert kind.name == "pruning" and recipe.model == "other"
    assert recipe.output_dir == str(tmp_path / "o")


def test_run_on_a_folder_or_a_missing_file_is_one_line(tmp_path, capsys):
    assert main(["run", str(tmp_path)]) == 2
    assert "is a folder" in capsys.readouterr().err
    assert main(["run", str(tmp_path / "none.yaml")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["merge", str(Path(__file__).parents[1] / "recipes" / "quickstart.yaml")]) == 2
    assert "pruning recipe, not merging" in capsys.readouterr().err
