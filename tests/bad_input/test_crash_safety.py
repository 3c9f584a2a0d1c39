"""Crash safety of outputs (``hf_sparse.io``): killed and interrupted saves, unwritable or full
output locations, and the previous output surviving a failed ``--overwrite``.

The signal tests run a real process that stops inside a save of a tiny model (it prints
``in-save`` and waits), then signal it: SIGTERM and Ctrl-C remove the temporary folder on the
way out; ``kill -9`` cannot be caught, so the next run into the same parent removes the
leftover (a live process's temporary folder is named, not touched).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from collections import namedtuple
from pathlib import Path

import pytest

from hf_sparse import io
from hf_sparse.cli import main
from tests.bad_input.common import make_workspace

ROOT = Path(__file__).resolve().parents[2]

SAVE_THEN_WAIT = """
import sys, time
from hf_sparse.io import atomic_output_dir
from tests.conftest import build_tiny_model

with atomic_output_dir(sys.argv[1]) as tmp:
    build_tiny_model("llama").save_pretrained(tmp)
    print("in-save", flush=True)
    time.sleep(120)
"""

CLI_STOPS_IN_SAVE = """
import sys, time
import hf_sparse.pruning.pipeline as pipeline
from hf_sparse.cli import main

write = pipeline.write_outputs

def slow_write(*args):
    write(*args)
    print("in-save", flush=True)
    time.sleep(120)

pipeline.write_outputs = slow_write
sys.exit(main(sys.argv[1:]))
"""


def _start(script: str, *args: str) -> subprocess.Popen:
    process = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(script), *args],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        # a shell's background job inherits SIGINT ignored, and Python then never raises
        # KeyboardInterrupt: give the child the disposition a terminal user's process has
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    for line in process.stdout:
        if line.strip() == "in-save":
            return process
    process.wait(timeout=60)
    raise AssertionError(f"the child never reached the save: {process.stderr.read()[-3000:]}")


def _leftovers(parent: Path) -> list[Path]:
    return sorted(p for p in parent.iterdir() if ".tmp-" in p.name)


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    return make_workspace(tmp_path_factory.mktemp("crash"))


@pytest.mark.slow
def test_kill_9_leaves_a_marked_folder_that_the_next_run_removes(tmp_path, caplog):
    out = tmp_path / "out"
    child = _start(SAVE_THEN_WAIT, str(out))
    (leftover,) = _leftovers(tmp_path)
    assert json.loads((leftover / io.TMP_MARKER).read_text())["pid"] == child.pid
    # while the owner lives, a run into the same parent names the folder and leaves it
    with caplog.at_level(logging.WARNING, logger="hf_sparse.io"):
        io.check_output_dir(tmp_path / "other")
    assert leftover.exists() and "still running" in caplog.text
    child.send_signal(signal.SIGKILL)
    child.wait(timeout=30)
    assert child.returncode == -signal.SIGKILL
    assert not out.exists() and _leftovers(tmp_path) == [leftover]  # kill -9: nothing ran
    with caplog.at_level(logging.WARNING, logger="hf_sparse.io"):
        io.check_output_dir(tmp_path / "other")  # the next run into the same parent
    assert _leftovers(tmp_path) == []
    assert f"left by killed process {child.pid}" in caplog.text


@pytest.mark.slow
def test_sigterm_during_a_save_removes_the_temporary_folder(tmp_path):
    out = tmp_path / "out"
    child = _start(SAVE_THEN_WAIT, str(out))
    child.send_signal(signal.SIGTERM)
    child.wait(timeout=60)
    assert child.returncode == 128 + signal.SIGTERM
    assert "Traceback" not in child.stderr.read()
    assert not out.exists() and _leftovers(tmp_path) == []


@pytest.mark.slow
@pytest.mark.parametrize(
    ("signum", "code", "said"),
    [
        (signal.SIGTERM, 143, "terminated by SIGTERM; the temporary output was removed"),
        (signal.SIGINT, 130, "interrupted; no half-written output is left"),
    ],
    ids=["SIGTERM", "Ctrl-C"],
)
def test_cli_signal_during_a_save_is_one_line_and_leaves_nothing(ws, tmp_path, signum, code, said):
    out = tmp_path / "pruned"
    argv = ["prune", str(ws.llama), "--method", "magnitude", "--sparsity", "0.5", "--no-eval",
            "--output-dir", str(out)]  # fmt: skip
    child = _start(CLI_STOPS_IN_SAVE, *argv)
    child.send_signal(signum)
    child.wait(timeout=60)
    err = child.stderr.read()
    assert child.returncode == code, err
    assert "Traceback" not in err
    assert [line for line in err.splitlines() if line.startswith("hf-sparse")] == [
        f"hf-sparse prune: {said}"
    ]
    assert not out.exists() and _leftovers(tmp_path) == []


def _dead_pid() -> int:
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)  # fmt: skip
    return int(done.stdout)


def test_a_previous_output_moved_aside_by_a_killed_run_is_restored(tmp_path):
    """Killed between moving the old output aside and renaming the new one into place: the
    next run puts the old one back (and removes the half-finished new one)."""
    target = tmp_path / "model"
    aside = io.make_temp_dir(target, "tmp-old", restore=target.name)
    (aside / io.CONTENT).mkdir()
    (aside / io.CONTENT / "weights.txt").write_text("previous output")
    new = io.make_temp_dir(target, "tmp")
    (new / io.CONTENT).mkdir()
    owner = {"pid": _dead_pid(), "host": os.uname().nodename, "start": None}
    for folder, restore in ((aside, target.name), (new, None)):
        marker = json.loads((folder / io.TMP_MARKER).read_text())
        (folder / io.TMP_MARKER).write_text(json.dumps({**marker, **owner, "restore": restore}))
    io.check_output_dir(tmp_path / "elsewhere")
    assert sorted(p.name for p in target.iterdir()) == ["weights.txt"]
    assert (target / "weights.txt").read_text() == "previous output"
    assert _leftovers(tmp_path) == []


def test_failed_overwrite_keeps_the_previous_output(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "weights.txt").write_text("previous output")
    with pytest.raises(RuntimeError, match="boom"), io.atomic_output_dir(out, True) as tmp:
        (tmp / "weights.txt").write_text("half")
        raise RuntimeError("boom")
    assert (out / "weights.txt").read_text() == "previous output"
    assert _leftovers(tmp_path) == []
    with io.atomic_output_dir(out, overwrite=True) as tmp:  # a successful one replaces it
        (tmp / "weights.txt").write_text("new output")
    assert sorted(p.name for p in out.iterdir()) == ["weights.txt"]
    assert (out / "weights.txt").read_text() == "new output"
    assert _leftovers(tmp_path) == []


def test_signal_handlers_are_restored_after_a_save(tmp_path):
    before = signal.getsignal(signal.SIGTERM)
    with io.atomic_output_dir(tmp_path / "out"):
        assert signal.getsignal(signal.SIGTERM) is not before
    assert signal.getsignal(signal.SIGTERM) is before


def _no_work(monkeypatch) -> None:
    """Any model loading or pruning fails the test: the refusal must come first."""

    def forbidden(*args, **kwargs):
        raise AssertionError("work started before the output location was checked")

    import hf_sparse.pruning.pipeline as pipeline

    monkeypatch.setattr(pipeline, "load_model_and_tokenizer", forbidden)
    monkeypatch.setattr(pipeline, "prune_", forbidden)


def _read_only_dir(tmp_path: Path) -> Path:
    """A folder this process cannot write into (root ignores permission bits: use sysfs)."""
    if os.geteuid() == 0:
        return Path("/sys/hf-sparse-test")
    folder = tmp_path / "read-only"
    folder.mkdir()
    folder.chmod(0o555)
    return folder / "out"


def test_read_only_output_location_is_refused_before_work(ws, tmp_path, monkeypatch, capsys):
    _no_work(monkeypatch)
    out = _read_only_dir(tmp_path)
    argv = ["prune", str(ws.llama), "--sparsity", "0.5", "--no-eval", "--output-dir", str(out)]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"hf-sparse prune: error: output location {out} is not writable")
    assert not out.exists()


def test_a_full_disk_is_refused_before_work(ws, tmp_path, monkeypatch, capsys):
    """Fake a disk with 1 MiB free: the output (the model, ~0.1 MiB, plus the margin for
    tokenizer and cards) does not fit, and the run stops after loading, before pruning."""
    import hf_sparse.pruning.pipeline as pipeline

    def forbidden(*args, **kwargs):
        raise AssertionError("pruning started although the output cannot be written")

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(2**40, 2**40 - 2**20, 2**20))
    monkeypatch.setattr(pipeline, "prune_", forbidden)
    out = tmp_path / "out"
    argv = ["prune", str(ws.llama), "--sparsity", "0.5", "--dataset", str(ws.text),
            "--num-samples", "2", "--sequence-length", "16", "--no-eval", "--output-dir",
            str(out)]  # fmt: skip
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith(f"hf-sparse prune: error: not enough free space for the output in "
                              f"{tmp_path}: about 64 MiB needed, 1 MiB free")  # fmt: skip
    assert not out.exists() and _leftovers(tmp_path) == []


def test_stale_folders_of_other_hosts_or_without_marker_are_left_alone(tmp_path, caplog):
    foreign = io.make_temp_dir(tmp_path / "a")
    marker = json.loads((foreign / io.TMP_MARKER).read_text())
    (foreign / io.TMP_MARKER).write_text(json.dumps({**marker, "host": "another-host"}))
    unmarked = tmp_path / ".b.tmp-x"
    unmarked.mkdir()
    with caplog.at_level(logging.WARNING, logger="hf_sparse.io"):
        assert io.clean_stale_outputs(tmp_path) == []
    assert foreign.exists() and unmarked.exists()
    assert "on another host" in caplog.text


def test_written_files_follow_the_umask_not_the_private_temporary_modes(tmp_path):
    """safetensors writes 0600 and mkdtemp makes 0700; the finished output reads like a plain
    ``save_pretrained`` folder (here umask 022: files 0644, folders 0755)."""
    import torch
    from safetensors.torch import save_file

    previous = os.umask(0o022)
    try:
        with io.atomic_output_dir(tmp_path / "out") as folder:
            save_file({"w": torch.zeros(2)}, str(folder / "model.safetensors"))
            (folder / "sub").mkdir()
            (folder / "sub" / "card.md").write_text("x")
    finally:
        os.umask(previous)
    out = tmp_path / "out"
    assert oct(out.stat().st_mode & 0o777) == oct(0o755)
    assert oct((out / "model.safetensors").stat().st_mode & 0o777) == oct(0o644)
    assert oct((out / "sub").stat().st_mode & 0o777) == oct(0o755)
    assert oct((out / "sub" / "card.md").stat().st_mode & 0o777) == oct(0o644)
