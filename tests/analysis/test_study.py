"""run_study on a tiny model: every output file, consistency of report and JSON, bad input."""

from __future__ import annotations

import csv
import hashlib
import json

import pytest

from hf_sparse.analysis.config import AnalysisConfig
from hf_sparse.analysis.report import verify_study
from hf_sparse.analysis.study import run_study
from tests.conftest import build_tiny_model, build_word_tokenizer

TEXT = " ".join(f"w{i % 97} w{(i * 7) % 89}" for i in range(4000))


@pytest.fixture
def setup(tmp_path):
    (tmp_path / "text.txt").write_text(TEXT)
    return build_tiny_model("llama"), build_word_tokenizer(TEXT), tmp_path


def _config(tmp_path, **overrides) -> AnalysisConfig:
    text = str(tmp_path / "text.txt")
    values = dict(
        metric="gradient", top_k=40, dataset=text, eval_dataset=text, num_samples=4,
        sequence_length=16, eval_windows=2, eval_length=16, progressive_k=[10, 40],
        perturbations=[{"kind": "zero"}, {"kind": "noise", "strengths": [2.0]}],
        targets=["all", "layers:1-1"], control_seeds=2, stability_seeds=[0, 1],
        stability_subsets=2, n_clusters=2, single_weight_candidates=3,
    )  # fmt: skip
    values.update(overrides)
    return AnalysisConfig(**values)


@pytest.mark.slow  # a whole study and its report: ~12 s
def test_study_writes_every_file_and_the_report_matches_the_json(setup):
    model, tokenizer, tmp = setup
    out = tmp / "study"
    run_study(model, tokenizer, _config(tmp), out, show_progress=False)
    files = ["config.json", "sensitivity_stats.json", "top_weights.csv", "stability.json",
             "perturbation_results.json", "manifest.json", "report.html"]  # fmt: skip
    for name in files:
        assert (out / name).exists(), name
    manifest = json.loads((out / "manifest.json").read_text())["files"]
    for name, digest in manifest.items():
        assert hashlib.sha256((out / name).read_bytes()).hexdigest() == digest
    assert any(name.startswith("plots/perturbation_") for name in manifest)
    results = json.loads((out / "perturbation_results.json").read_text())
    assert len(results["points"]) == 2 * 2 * 2  # k values x perturbations x targets
    report = (out / "report.html").read_text()
    assert f"{results['dense']['perplexity']:.3f}" in report
    worst = results["single_weights"]["worst"]
    assert f"{worst['perplexity']:.3f}" in report
    assert report.count("data:image/png;base64,") == sum(n.startswith("plots/") for n in manifest)
    rows = list(csv.DictReader((out / "top_weights.csv").open()))
    stats = json.loads((out / "sensitivity_stats.json").read_text())
    assert len(rows) == stats["top_k"] == 40
    scores = [float(r["score"]) for r in rows]
    assert scores == sorted(scores, reverse=True)
    assert sum(v["top"] for v in stats["breakdown"]["component"].values()) == 40
    stability = json.loads((out / "stability.json").read_text())
    assert len(stability["seeds"]["jaccard"]) == 2 and len(stability["subsets"]["spearman"]) == 2
    assert verify_study(out) == []
    # the check catches a figure or a number that no longer matches the JSON files
    results["points"][0]["top"]["perplexity"] *= 3.0
    (out / "perturbation_results.json").write_text(json.dumps(results))
    problems = verify_study(out)
    assert any("perturbation_results.json: sha256" in p for p in problems)
    assert any(p.startswith("plots/perturbation_") for p in problems), problems
    assert any(p.startswith("report figure") for p in problems)
    assert any("key number" in p for p in problems)
    (out / "stability.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"missing \['stability.json'\]"):
        verify_study(out)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"metric": "snr"}, "unknown metric 'snr'"),
        ({"mode": "row"}, "unknown mode 'row'"),
        ({"perturbations": [{"kind": "blur"}]}, "unknown perturbation 'blur'"),
        ({"downstream_tasks": ["mmlu"]}, "unknown downstream task"),
        ({"stability_subsets": 5}, "stability_subsets \\(5\\) exceeds num_samples \\(4\\)"),
    ],
)
def test_config_errors(setup, overrides, message):
    _, _, tmp = setup
    with pytest.raises(ValueError, match=message):
        _config(tmp, **overrides)


def test_run_errors_come_before_work(setup):
    model, tokenizer, tmp = setup
    with pytest.raises(ValueError, match="selected parameters hold"):
        run_study(model, tokenizer, _config(tmp, top_k=10**9), tmp / "a", show_progress=False)
    with pytest.raises(ValueError, match="components present in this architecture"):
        run_study(model, tokenizer, _config(tmp, targets=["fc1"]), tmp / "b", show_progress=False)
    (tmp / "c").mkdir()
    (tmp / "c" / "x").write_text("keep")
    with pytest.raises(FileExistsError, match="overwrite"):
        run_study(model, tokenizer, _config(tmp), tmp / "c", show_progress=False)
    assert not (tmp / "a").exists() and not (tmp / "b").exists()


def test_cli_analyze_builds_the_recipe_from_flags_and_checks_first(setup, capsys):
    """The shipped recipe runs in tests/test_recipes.py; here the alias's own flags."""
    from hf_sparse.cli import main

    model, tokenizer, tmp = setup
    model.save_pretrained(tmp / "tiny")
    tokenizer.save_pretrained(tmp / "tiny")
    argv = ["analyze", str(tmp / "tiny"), "--output-dir", str(tmp / "study")]
    assert main([*argv, "--top-k", "5", "--top-k-percent", "1"]) == 2
    assert "not both" in capsys.readouterr().err
    assert main([*argv, "--metric", "snr"]) == 2
    assert "unknown metric 'snr'" in capsys.readouterr().err
    (tmp / "study").mkdir()
    (tmp / "study" / "keep.txt").write_text("x")
    assert main(argv) == 2  # exists, no --overwrite: refused before any work
    assert "already exists" in capsys.readouterr().err
    assert (tmp / "study" / "keep.txt").read_text() == "x"
