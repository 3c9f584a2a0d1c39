"""The command line's bad-input table: every case exits 2 with one line on stderr that names
the problem, prints no traceback, and writes nothing (no output, no temporary folder, inputs
untouched). Most are refused before any model work starts, so the table runs in seconds.

Run in process (``hf_sparse.cli.main``); ``tests/bad_input/test_crash_safety.py`` covers
Ctrl-C, SIGTERM and kill -9 in real processes.
"""

from __future__ import annotations

import re

import pytest

from hf_sparse.cli import main
from tests.bad_input.common import (
    Case,
    assert_nothing_written,
    make_workspace,
    snapshot,
)

SMALL = ("--dataset", "{text}", "--num-samples", "2", "--sequence-length", "16")
PRUNE = ("prune", "{llama}", "--sparsity", "0.5", *SMALL, "--no-eval", "--output-dir", "{out}")
MASK = ("--dataset", "{text}", "--num-samples", "2", "--max-length", "16", "--output-dir", "{out}")
COMPRESS = ("compress", "--model", "{llama}", "--ratio", "0.2", *SMALL, "--no-eval")
EVAL = ("eval", "{llama}", "--dataset", "{text}", "--sequence-length", "16", "--num-windows", "2")


def cli(id: str, argv: tuple[str, ...], message: str, **kw) -> Case:
    command = next(a for a in argv if not a.startswith("-") and not a.isdigit())
    return Case(id=id, entry=f"hf-sparse {command}", message=message, argv=argv, **kw)


CASES = [
    # ---- prune: selections that leave nothing to do, patterns that match nothing (issue 15)
    cli("prune-ignore-everything", (*PRUNE, "--ignore", "q", "k", "v", "o", "gate", "up", "down"),
        r"leave no layer to work on"),
    cli("prune-ignore-typo", (*PRUNE, "--ignore", "q_prj"),
        r"ignore pattern 'q_prj' matches no module.*did you mean 'q_proj'"),
    cli("prune-target-typo", (*PRUNE, "--targets", "q_prj"),
        r"target pattern 'q_prj' matches no linear.*did you mean 'q_proj'"),
    cli("prune-sequence-length-over-positions",
        ("prune", "{gpt2}", "--sparsity", "0.5", "--dataset", "{text}", "--num-samples", "2",
         "--sequence-length", "256", "--no-eval", "--output-dir", "{out}"),
        r"calibration.sequence_length 256 exceeds the model's maximum positions 128"),
    cli("prune-eval-length-over-positions",
        ("prune", "{llama}", "--sparsity", "0.5", *SMALL, "--eval-dataset", "{text}",
         "--output-dir", "{out}"),
        r"evaluation.sequence_length 512 exceeds the model's maximum positions 128 "
        r"\(config.max_position_embeddings\)"),
    cli("prune-unknown-dataset",
        ("prune", "{llama}", "--sparsity", "0.5", "--dataset", "wikitxt2", "--no-eval",
         "--output-dir", "{out}"),
        r"unknown dataset 'wikitxt2' \(did you mean 'wikitext2'\?\).*local file path"),
    cli("prune-missing-data-file", (*PRUNE[:-2], "--dataset", "./no/such.txt", "--output-dir",
                                    "{out}"), r"data file ./no/such.txt does not exist"),
    cli("prune-zero-samples", (*PRUNE, "--num-samples", "0"),
        r"calibration.num_samples must be a positive integer, got 0"),
    cli("prune-sparsity-out-of-range", ("prune", "{llama}", "--sparsity", "1.5", "--no-eval",
                                        "--output-dir", "{out}"), r"sparsity.*\[0, 1\)"),
    cli("prune-nm-contradiction", (*PRUNE, "--mask", "2:4", "--sparsity", "0.7"),
        r"contradicts mask '2:4'"),
    cli("prune-missing-model", ("prune", "./no/such/model", "--sparsity", "0.5",
                                "--output-dir", "{out}"), r"model path.*does not exist"),
    cli("prune-output-is-a-file", (*PRUNE[:-1], "{text}"), r"exists and is not a folder"),
    cli("prune-output-not-empty", (*PRUNE[:-1], "{root}/recipes"), r"already exists and is not "
        r"empty.*--overwrite"),
    cli("prune-output-is-the-input", (*PRUNE[:-1], "{llama}", "--overwrite"),
        r"overlaps the input.*never modified"),
    cli("prune-output-unwritable", (*PRUNE[:-1], "/sys/hf-sparse-out"), r"not writable"),
    cli("prune-bad-flag-value", ("prune", "{llama}", "--sparsity", "half", "--output-dir", "{out}"),
        r"argument --sparsity: invalid float value: 'half' \(see hf-sparse prune --help\)"),
    # ---- run: recipes
    cli("run-on-a-folder", ("run", "{root}"), r"is a folder; pass a .yaml file"),
    cli("run-missing-file", ("run", "{root}/none.yaml"), r"recipe .*none.yaml does not exist"),
    cli("run-unsafe-yaml-tag", ("run", "{root}/recipes/unsafe.yaml"), r"not valid YAML"),
    cli("run-unknown-key", ("run", "{root}/recipes/typo.yaml"),
        r"unknown key\(s\) \['calibraton'\].*did you mean 'calibraton' -> 'calibration'"),
    cli("run-per-layer-key-typo", ("run", "{root}/recipes/per-layer.yaml", "--output-dir", "{out}"),
        r"sparsity_per_layer key 'down_prj' matches none.*did you mean 'down_proj'"),
    cli("run-threads-zero", ("--threads", "0", "run", "{root}/recipes/typo.yaml"),
        r"--threads must be a positive integer"),
    # ---- mask
    cli("mask-params-typo", ("mask", "score", "{llama}", "--params", "q_prj", *MASK),
        r"parameter pattern 'q_prj' matches no parameter.*did you mean 'q_proj'"),
    cli("mask-length-over-positions",
        ("mask", "golden", "{gpt2}", "--dataset", "{text}", "--num-samples", "2",
         "--max-length", "256", "--output-dir", "{out}"),
        r"data.max_length 256 exceeds the model's maximum positions 128"),
    cli("mask-unknown-metric", ("mask", "score", "{llama}", "--metric", "fishr", *MASK),
        r"metric.*fishr"),
    # ---- compress
    cli("compress-role-absent", (*COMPRESS, "--target-roles", "fc1", "--output-dir", "{out}"),
        r"target_roles has \['fc1'\], which this llama model lacks"),
    cli("compress-role-ratio-unused", ("run", "{root}/recipes/compress-roles.yaml",
                                       "--output-dir", "{out}"),
        r"role_ratios has \['fc1'\], which are not compressed here"),
    cli("compress-ratio-out-of-range", ("compress", "--model", "{llama}", "--ratio", "1.5",
                                        "--output-dir", "{out}"), r"ratio must be in \(0, 1\)"),
    cli("compress-length-over-positions",
        ("compress", "--model", "{gpt2}", "--ratio", "0.2", "--dataset", "{text}",
         "--num-samples", "2", "--sequence-length", "256", "--no-eval", "--output-dir", "{out}"),
        r"calibration.sequence_length 256 exceeds the model's maximum positions 128"),
    cli("compress-no-output", (*COMPRESS,), r"no output folder"),
    # ---- decompose
    cli("decompose-unknown-experiment", ("decompose", "tms_9-9", "--output-dir", "{out}"),
        r"tms_9-9"),
    cli("decompose-length-over-positions", ("decompose", "{root}/recipes/spd-long.yaml",
                                            "--output-dir", "{out}"),
        r"data.length 256 exceeds the model's maximum positions 128"),
    cli("decompose-target-typo", ("decompose", "{root}/recipes/spd-typo.yaml",
                                  "--output-dir", "{out}"),
        r"target_modules.*up_prj.*matches no module"),
    # ---- merge
    cli("merge-pickle-only-source", ("merge", "{root}/recipes/merge-pickle.yaml",
                                     "--output-dir", "{out}"),
        r"holds no \*.safetensors weights \(found \['pytorch_model.bin'\]: convert them to "
        r"safetensors; pickles are never loaded\)"),
    cli("merge-identical-source", ("merge", "{root}/recipes/merge-identical.yaml",
                                   "--output-dir", "{out}"), r"nothing to merge"),
    cli("merge-length-over-positions", ("merge", "{root}/recipes/merge-long.yaml",
                                        "--output-dir", "{out}"),
        r"calibration.sequence_length 4096 exceeds the model's maximum positions 128"),
    # ---- analyze
    cli("analyze-unknown-metric", ("analyze", "{llama}", "--metric", "fishr", "--output-dir",
                                   "{out}"), r"unknown metric 'fishr'"),
    cli("analyze-top-k-twice", ("analyze", "{llama}", "--top-k", "5", "--top-k-percent", "1",
                                "--output-dir", "{out}"), r"not both"),
    # ---- fetch-model
    cli("fetch-model-unknown", ("fetch-model", "smollm9"), r"unknown model 'smollm9'"),
    cli("fetch-model-read-only-cache", ("fetch-model", "smollm2-135m", "--cache-dir",
                                        "/sys/hf-sparse-cache"), r"cache location.*not writable"),
    # ---- loading (safetensors only, checked first; offline Hub ids), eval, push
    cli("prune-truncated-safetensors", ("prune", "{truncated}", "--sparsity", "0.5",
                                        "--no-eval", "--output-dir", "{out}"),
        r"truncated|corrupt"),
    cli("prune-pickle-only-folder", ("prune", "{pickle_only}", "--sparsity", "0.5", "--no-eval",
                                     "--method", "magnitude", "--output-dir", "{out}"),
        r"pytorch_model.bin.*safetensors"),
    cli("prune-hub-id-offline", ("prune", "some-org/some-model", "--sparsity", "0.5",
                                 "--no-eval", "--output-dir", "{out}"),
        r"HF_HUB_OFFLINE", env={"HF_HUB_OFFLINE": "1"}),
    cli("eval-batch-size-zero", (*EVAL, "--batch-size", "0"),
        r"batch.size must be a positive integer"),
    cli("eval-truncated-safetensors", ("eval", "{truncated}", "--dataset", "{text}",
                                       "--sequence-length", "16", "--num-windows", "2"),
        r"truncated|corrupt"),
    cli("eval-pickle-only-folder", ("eval", "{pickle_only}", "--dataset", "{text}",
                                    "--sequence-length", "16", "--num-windows", "2"),
        r"pytorch_model.bin.*safetensors"),
    cli("eval-length-over-positions", ("eval", "{gpt2}", "--dataset", "{text}",
                                       "--sequence-length", "256", "--num-windows", "2"),
        r"sequence.length 256 exceeds the model's maximum positions 128"),
    cli("eval-not-an-output", ("eval", "{root}/recipes", "--num-windows", "2"),
        r"is not a model or adapter folder \(no config.json or adapter_config.json\)"),
    cli("eval-unknown-task", (*EVAL, "--tasks", "lambada,mmlu"),
        r"unknown downstream task 'mmlu'; valid: \['lambada', 'hellaswag'\]"),
    cli("push-not-an-output", ("push", "{root}/recipes", "--repo-id", "me/x", "--dry-run"),
        r"is not an output folder"),
    cli("push-bad-repo-id", ("push", "{root}/saved", "--repo-id", "tiny", "--dry-run"),
        r"repo_id must look like 'namespace/name', got 'tiny'"),
    cli("push-offline", ("push", "{root}/saved", "--repo-id", "me/tiny"),
        r"HF_HUB_OFFLINE|offline", env={"HF_HUB_OFFLINE": "1"}),
]  # fmt: skip


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    workspace = make_workspace(tmp_path_factory.mktemp("bad-cli"))
    saved = workspace.root / "saved"  # a real output folder (for push)
    assert main([*(workspace.fill(a) for a in PRUNE[:-1]), str(saved)]) == 0
    return workspace


def run_case(case: Case, ws, monkeypatch) -> int:
    """Run one CLI case in this process; returns the exit code (argparse's SystemExit too)."""
    import huggingface_hub.constants

    for key, value in case.env.items():
        monkeypatch.setenv(key, value)
    if case.env.get("HF_HUB_OFFLINE"):  # read at import time by the Hub client
        monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    try:
        return main([ws.fill(arg, case.id) for arg in case.argv])
    except SystemExit as stop:
        return int(stop.code)


def check_answer(case: Case, code: int, out: str, err: str) -> str:
    """The table's assertions on one answer; returns the error line."""
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.startswith("hf-sparse")]
    assert len(lines) == 1, err  # one line says what went wrong
    assert lines[0].startswith(f"{case.entry}: error: "), lines[0]
    assert re.search(case.message, lines[0]), lines[0]
    assert code == case.error, (code, lines[0])
    assert out == ""
    return lines[0]


@pytest.mark.parametrize("case", [c.param() for c in CASES])
def test_cli_bad_input(case: Case, ws, capsys, monkeypatch):
    before = snapshot(ws.root)
    code = run_case(case, ws, monkeypatch)
    out, err = capsys.readouterr()
    check_answer(case, code, out, err)
    assert_nothing_written(before, snapshot(ws.root))


def test_every_subcommand_has_cases():
    from hf_sparse.cli import build_parser

    commands = set(build_parser()._subparsers._group_actions[0].choices)
    assert commands <= {case.entry.split()[1] for case in CASES}
