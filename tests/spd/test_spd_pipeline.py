"""``hf-sparse decompose``: names, recipes, overrides and errors (run with tiny step counts)."""

from __future__ import annotations

import json

import pytest
import yaml
from peft import PeftModel
from safetensors.torch import load_file

from hf_sparse.cli import main
from hf_sparse.spd.experiments import EXPERIMENTS, get_experiment
from hf_sparse.spd.pipeline import experiment_from_dict, load_experiment
from hf_sparse.spd.toy_models import TMSConfig, build_toy_model


def test_unknown_experiment_lists_the_known_ones():
    with pytest.raises(ValueError, match="tms_5-2.*resid_mlp1"):
        get_experiment("tms_3-1")
    assert {"tms_5-2", "tms_5-2-id", "tms_40-10", "tms_40-10-id", "resid_mlp1"} <= set(EXPERIMENTS)


def test_registry_returns_independent_copies():
    first = get_experiment("tms_5-2")
    first.train.steps = 1
    assert get_experiment("tms_5-2").train.steps != 1


@pytest.mark.parametrize(
    "data, match",
    [
        ({"experiment": "tms_5-2", "spd": {"C": 0}}, "C must be"),
        ({"experiment": "tms_5-2", "loss": {"pnorm": 0}}, "pnorm"),
        ({"experiment": "tms_5-2", "toy": {"d_mlp": 3}}, "unknown key.*d_mlp"),
        ({"experiment": "tms_5-2-id", "toy": {"n_hidden_layers": 0}}, "does not have"),
        ({"experiment": "tms_5-2", "spd": {"target_modules": ["linear1"]}}, "does not decompose"),
        (
            {"experiment": "tms_5-2", "spd": {"tied_modules": {"linear2": "linear9"}}},
            "matches 0 decomposed",
        ),
        (
            {"experiment": "tms_5-2", "spd": {"target_modules": ["hidden_layers"]}},
            "no module|linear",
        ),
        ({"experiment": "tms_5-2", "trian": {}}, "unknown key"),
        ({"experiment": "tms_5-2", "model": "x"}, "keep one"),
        ({"spd": {}}, "needs 'experiment"),
        ({"model": "smollm2-135m", "spd": {"C": 4}}, "target_modules is required"),
        (
            {
                "model": "smollm2-135m",
                "spd": {"target_modules": ["q"]},
                "loss": {"output_loss": "mse"},
            },
            "kl",
        ),
    ],
)
def test_bad_recipes_fail_before_any_work(data, match):
    with pytest.raises(ValueError, match=match):
        experiment_from_dict(data)


def test_a_tiny_toy_run_writes_safetensors_and_reloads(tmp_path, capsys):
    out = tmp_path / "run"
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(yaml.safe_dump({"experiment": "tms_5-2", "target_training": {"steps": 200}}))
    argv = ["decompose", str(recipe), "--output-dir", str(out), "--steps", "20",
            "--batch-size", "64", "--no-plots"]  # fmt: skip
    assert main(argv) == 0
    out_text = capsys.readouterr().out  # Trainer's log lines, then the summary as JSON
    printed = json.loads(out_text[out_text.index("\n{\n") :])
    assert printed["summary"]["n_features"] == 5
    assert printed["published"] == {"mmcs": 1.0, "ml2r": 0.993}
    files = {p.name for p in out.rglob("*") if p.is_file()}
    assert {"adapter_model.safetensors", "target_model.safetensors", "hf_sparse_results.json",
            "recipe.yaml"} <= files  # fmt: skip
    saved = json.loads((out / "hf_sparse_results.json").read_text())
    assert saved["kind"] == "spd" and saved["metrics"] and saved["config"]["name"] == "tms_5-2"
    rerun = yaml.safe_load((out / "recipe.yaml").read_text())
    assert load_experiment(out / "recipe.yaml").experiment.train.steps == 20
    assert rerun["experiment"] == "tms_5-2"
    assert not any(name.endswith((".bin", ".pt", ".pkl")) for name in files)
    target = build_toy_model(TMSConfig())
    target.load_state_dict(load_file(out / "target_model.safetensors"))
    import hf_sparse.spd  # noqa: F401  (registers SPD)

    reloaded = PeftModel.from_pretrained(target, out / "adapter")
    assert reloaded.peft_config["default"].C == 20
    assert main(argv) == 2
    assert "overwrite" in capsys.readouterr().err


def test_recipe_files_parse_and_main_reports_errors(tmp_path, capsys):
    for name in ("spd-tms-5-2.yaml", "spd-resid-mlp1.yaml", "spd-smollm2.yaml"):
        recipe = load_experiment(f"recipes/{name}")
        assert recipe.output_dir and recipe.experiment.train.steps > 0
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"experiment": "tms_5-2", "loss": {"pnorm": -1}}))
    assert main(["decompose", str(bad)]) == 2
    assert "pnorm" in capsys.readouterr().err
    assert main(["decompose", "nope"]) == 2
    assert "known experiments" in capsys.readouterr().err
