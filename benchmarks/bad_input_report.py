"""The bad-input tables (``tests/bad_input/``), run once more to print what each case now says.

For every entry point: the cases tried, how many are handled (the answer the table asks for:
exit code 2 or the named exception, one line naming the problem, no traceback), and the first
line of each message. Cases another branch builds (``owner``) are listed as such.

    .venv/bin/python benchmarks/bad_input_report.py [--markdown benchmarks/out/bad_input.md]

Writes ``benchmarks/out/bad_input_report.json``.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import re
import shutil
import sys
import tempfile
import time
import warnings
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import pytest  # noqa: E402
import torch  # noqa: E402

from tests.bad_input import test_bad_input_adapters as adapters  # noqa: E402
from tests.bad_input import test_bad_input_callbacks as callbacks  # noqa: E402
from tests.bad_input import test_bad_input_cli as cli  # noqa: E402
from tests.bad_input import test_bad_input_verbs as verbs  # noqa: E402
from tests.bad_input.common import (  # noqa: E402
    assert_nothing_written,
    first_line,
    make_workspace,
    snapshot,
)


def _row(
    entry: str, case_id: str, handled: bool, message: str, owner: str | None, why: str | None = None
) -> dict:
    status = "handled" if handled else ("not yet: " + owner if owner else "NOT HANDLED")
    return {"entry": entry, "case": case_id, "status": status, "message": message, "why": why}


def _judge(check, *args) -> tuple[bool, str | None]:
    """(whether the table's assertions hold, the first failed one)."""
    try:
        check(*args)
    except AssertionError as failed:
        return False, first_line(str(failed))
    return True, None


def run_cli(root: Path) -> list[dict]:
    ws = make_workspace(root / "cli")
    saved = ws.root / "saved"
    with contextlib.redirect_stderr(io.StringIO()), contextlib.redirect_stdout(io.StringIO()):
        cli.main([*(ws.fill(a) for a in cli.PRUNE[:-1]), str(saved)])
    rows = []
    for case in cli.CASES:
        err, out = io.StringIO(), io.StringIO()
        before = snapshot(ws.root)
        with (
            pytest.MonkeyPatch.context() as mp,
            contextlib.redirect_stderr(err),
            contextlib.redirect_stdout(out),
        ):
            escaped = None
            try:
                code = cli.run_case(case, ws, mp)
            except Exception as error:  # an unhandled case: record what escaped
                code, escaped = None, f"traceback: {type(error).__name__}: {first_line(str(error))}"
                print("Traceback", file=err)
        text = err.getvalue()
        lines = [line for line in text.splitlines() if line.startswith("hf-sparse")]
        shown = escaped or (lines[0] if lines else f"exit {code}, no error line")
        handled, why = _judge(cli.check_answer, case, code, out.getvalue(), text)
        why = None if escaped or not lines or why == shown else why
        if handled:
            handled, why = _judge(assert_nothing_written, before, snapshot(ws.root))
        rows.append(_row(case.entry, case.id, handled, shown, case.owner, why))
    return rows


def run_verbs(root: Path) -> list[dict]:
    ws = make_workspace(root / "verbs")
    (ws.root / "fake.gguf").write_bytes(b"GGUF, but not the pinned file")
    rows = []
    for case in verbs.CASES:
        verbs._GIVEN.clear()
        before = snapshot(ws.root)
        with pytest.MonkeyPatch.context() as mp:
            error = verbs.run_case(case, ws, mp)
        message = first_line(str(error)) if error is not None else "(accepted)"
        handled, why = _judge(verbs.check_answer, case, error)
        if handled:
            handled, why = _judge(assert_nothing_written, before, snapshot(ws.root))
        shown = f"{type(error).__name__}: {message}"
        rows.append(_row(case.entry, case.id, handled, shown, case.owner, why))
    return rows


def run_adapters(root: Path) -> list[dict]:
    from peft import PeftModel

    saved = adapters.save_adapters(Path(tempfile.mkdtemp(prefix="adapters", dir=root)))
    rows = []
    for method in adapters.METHODS:
        for case in adapters.CASES:
            folder = adapters._prepared(saved, method, case, Path(tempfile.mkdtemp(dir=root)))
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                try:
                    PeftModel.from_pretrained(case.base(), folder)
                    error = None
                except Exception as caught:
                    error = caught
            message = first_line(str(error)) if error is not None else "(loaded)"
            handled = isinstance(error, adapters.AdapterIntegrityError) and bool(
                re.search(case.message, message)
            )
            entry = f"PeftModel.from_pretrained ({method.upper()})"
            rows.append(_row(entry, case.id, handled, message, None))
    return rows


def run_callbacks(root: Path) -> list[dict]:
    rows = []
    for case in callbacks.CASES:
        try:
            case.run()
            error = None
        except Exception as caught:
            error = caught
        message = first_line(str(error)) if error is not None else "(accepted)"
        handled = isinstance(error, case.error) and re.search(case.message, message) is not None
        rows.append(_row(case.entry, case.id, handled, f"{type(error).__name__}: {message}", None))
    return rows


CRASH_TESTS = [
    ("kill -9 during a save", "marked temporary folder; the next run into the parent removes it"),
    ("SIGTERM during a save", "temporary folder removed, exit 143"),
    ("hf-sparse prune + SIGTERM in the save", "'terminated by SIGTERM; the temporary output "
     "was removed', exit 143"),
    ("hf-sparse prune + Ctrl-C in the save", "'interrupted; no half-written output is left', "
     "exit 130"),
    ("killed between moving the old output aside and renaming", "next run restores the old one"),
    ("failed --overwrite", "previous output intact"),
    ("read-only output location", "refused before loading the model"),
    ("disk full (shutil.disk_usage faked)", "refused after loading, before pruning"),
]  # fmt: skip


def markdown(rows: list[dict], before: dict[tuple[str, str], str] | None = None) -> str:
    by_entry: dict[str, list[dict]] = defaultdict(list)
    for row in rows:
        by_entry[row["entry"]].append(row)

    def was_handled(row: dict) -> int:
        return int((before or {}).get((row["entry"], row["case"])) == "handled")

    extra = " handled before |" if before is not None else ""
    out = [f"| entry point | tried | handled | not yet (owned elsewhere) |{extra}",
           "|---|---|---|---|" + ("---|" if before is not None else "")]  # fmt: skip
    for entry, items in [*by_entry.items(), ("**all**", rows)]:
        handled = sum(r["status"] == "handled" for r in items)
        later = sum(r["status"].startswith("not yet") for r in items)
        name = entry if entry.startswith("**") else f"`{entry}`"
        line = f"| {name} | {len(items)} | {handled} | {later} |"
        if before is not None:
            line += f" {sum(was_handled(r) for r in items)} |"
        out.append(line)
    head = "| entry point | case | status | what it says (first line) |"
    rule = "|---|---|---|---|"
    if before is not None:
        head, rule = head + " before |", rule + "---|"
    out += ["", head, rule]
    for row in rows:
        message = row["message"] + (f" [{row['why']}]" if row["why"] else "")
        message = message.replace("|", "\\|")
        message = message if len(message) <= 200 else message[:197] + "..."
        line = f"| `{row['entry']}` | {row['case']} | {row['status']} | {message} |"
        if before is not None:
            line += f" {before.get((row['entry'], row['case']), 'new')} |"
        out.append(line)
    out += ["", "Crash safety (tests/bad_input/test_crash_safety.py, real processes):", ""]
    out += [f"- {what}: {result}" for what, result in CRASH_TESTS]
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--markdown", type=Path, default=None, help="also write the tables here")
    parser.add_argument(
        "--before",
        type=Path,
        default=None,
        help="the JSON of a run on older code (e.g. main before the fixes): adds its status",
    )
    parser.add_argument("--json", type=Path, default=None, help="where the JSON goes")
    args = parser.parse_args()
    torch.set_num_threads(1)
    start = time.perf_counter()
    root = Path(tempfile.mkdtemp(prefix="bad-input-report-"))
    try:
        rows = run_cli(root) + run_verbs(root) + run_adapters(root) + run_callbacks(root)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    for row in rows:  # the temporary workspace's paths say nothing
        row["message"] = row["message"].replace(str(root), "<tmp>")
        row["why"] = row["why"] and row["why"].replace(str(root), "<tmp>")
    before = None
    if args.before is not None:
        old = json.loads(args.before.read_text())
        before = {(r["entry"], r["case"]): r["status"] for r in old}
    text = markdown(rows, before)
    print(text)
    print(f"\n{len(rows)} cases in {time.perf_counter() - start:.0f} s")
    target = args.json or ROOT / "benchmarks" / "out" / "bad_input_report.json"
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(json.dumps(rows, indent=2) + "\n")
    if args.markdown is not None:
        args.markdown.write_text(text + "\n")


if __name__ == "__main__":
    main()
