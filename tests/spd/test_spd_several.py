"""``hf-sparse decompose tms_5-2,tms_5-2-id``: several experiments in one call."""

from __future__ import annotations

import json
import re

import pytest

from hf_sparse.cli import main
from hf_sparse.spd import experiments
from hf_sparse.spd.pipeline import experiment_names


@pytest.fixture
def quick_targets(monkeypatch):
    """The registered TMS experiments with a short target training (the SPD steps come from
    the command's flags, as a user would pass them)."""
    for name in ("tms_5-2", "tms_5-2-id"):
        original = experiments.EXPERIMENTS[name]

        def quick(original=original):
            experiment = original()
            experiment.target_training.steps = 100
            experiment.loss.faithfulness_warmup_steps = 5
            return experiment

        monkeypatch.setitem(experiments.EXPERIMENTS, name, quick)


@pytest.mark.slow
def test_two_experiments_in_one_call(tmp_path, capsys, quick_targets):
    out = tmp_path / "runs"
    argv = ["decompose", "tms_5-2,tms_5-2-id", "--output-dir", str(out), "--steps", "5",
            "--batch-size", "32", "--no-plots"]  # fmt: skip
    assert main(argv) == 0
    for name, layers in (("tms_5-2", 2), ("tms_5-2-id", 3)):
        saved = json.loads((out / name / "hf_sparse_results.json").read_text())
        assert saved["kind"] == "spd" and saved["config"]["name"] == name
        assert saved["config"]["train"]["steps"] == 5  # the flags reach every experiment
        assert (out / name / "adapter" / "adapter_model.safetensors").exists()
        assert len(saved["metrics"]["layers"]) == layers
    printed = capsys.readouterr().out
    assert printed.count('"experiment": "tms_5-2"') == 1
    assert printed.count('"experiment": "tms_5-2-id"') == 1


@pytest.mark.parametrize(
    ("target", "match"),
    [
        ("tms_5-2,tms_9-9", r"unknown SPD experiment\(s\) \['tms_9-9'\]"),
        ("tms_5-2,,resid_mlp1", "empty name"),
        ("tms_5-2,tms_5-2", "twice"),
    ],
)
def test_bad_lists_fail_before_any_work(tmp_path, capsys, target, match):
    out = tmp_path / "runs"
    assert main(["decompose", target, "--output-dir", str(out)]) == 2
    assert re.search(match, capsys.readouterr().err)
    with pytest.raises(ValueError, match=match):
        experiment_names(target)
    assert not out.exists()


def test_an_occupied_output_folder_stops_the_list_before_the_first_trains(tmp_path, capsys):
    out = tmp_path / "runs"
    (out / "tms_5-2-id").mkdir(parents=True)
    (out / "tms_5-2-id" / "keep.txt").write_text("user data")
    assert main(["decompose", "tms_5-2,tms_5-2-id", "--output-dir", str(out)]) == 2
    assert "already exists" in capsys.readouterr().err
    assert not (out / "tms_5-2").exists()  # nothing ran
    assert (out / "tms_5-2-id" / "keep.txt").read_text() == "user data"


def test_single_names_and_recipes_are_not_lists(tmp_path):
    assert experiment_names("tms_5-2") is None
    recipe = tmp_path / "a,b.yaml"
    recipe.write_text("experiment: tms_5-2\n")
    assert experiment_names(str(recipe)) is None
