"""What every bad-input table shares: a workspace of tiny inputs, the case type, and the
checks every case makes (exit code or exception type, the first line of the message, no
traceback, nothing written, the inputs untouched).

A case names its entry point (``entry``), what it feeds it, and the message it must answer
with. Cases whose behaviour another branch builds carry ``owner``: they are strict xfails until
that branch lands (a pass then fails loudly, so the mark is removed).

``benchmarks/bad_input_report.py`` imports the tables from the test modules and prints each
case with the message it now produces (RESULTS.md, "Bad input").
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.conftest import build_tiny_model, build_word_tokenizer

WORDS = " ".join(f"w{i % 97} x{(i * 7) % 31}" for i in range(3000))
RECORDS = [
    {"instruction": f"say w{i} x{i % 31}", "input": "", "output": f"w{(i * 3) % 97} x{i % 7}"}
    for i in range(40)
]
OWNED_ELSEWHERE = "owned by branch artifacts"


@dataclass(frozen=True)
class Workspace:
    """Tiny inputs written once per test module (all paths inside ``root``)."""

    root: Path
    llama: Path  # tiny llama (max positions 128) + word tokenizer, safetensors
    gpt2: Path  # tiny gpt2 (learned positions: 128)
    text: Path
    records: Path
    finetuned: Path  # a perturbed copy of llama (a merge source)
    pickle_only: Path  # llama config + pytorch_model.bin only
    truncated: Path  # llama with its model.safetensors cut in half

    def fill(self, text: str, case_id: str = "case") -> str:
        """``{llama}``, ``{gpt2}``, ``{text}``, ``{out}`` (a fresh folder per case) ... replaced
        by paths."""
        values = {k: str(v) for k, v in vars(self).items()}
        values["out"] = str(self.root / f"out-{case_id}")
        return text.format(**values)


def make_workspace(root: Path) -> Workspace:
    tokenizer = build_word_tokenizer(WORDS)
    folders = {}
    for arch in ("llama", "gpt2"):
        folders[arch] = root / f"tiny-{arch}"
        build_tiny_model(arch).save_pretrained(folders[arch])
        tokenizer.save_pretrained(folders[arch])
    finetuned = root / "ft"
    model = build_tiny_model("llama")
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.01 * torch.randn_like(param))
    model.save_pretrained(finetuned)
    pickle_only = root / "pickle-only"  # the weights as a torch pickle only (never loaded here)
    model = build_tiny_model("llama")
    model.save_pretrained(pickle_only)
    tokenizer.save_pretrained(pickle_only)
    (pickle_only / "model.safetensors").unlink()
    torch.save(model.state_dict(), pickle_only / "pytorch_model.bin")
    truncated = root / "truncated"
    build_tiny_model("llama").save_pretrained(truncated)
    tokenizer.save_pretrained(truncated)
    weights = truncated / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    text = root / "text.txt"
    text.write_text(WORDS)
    records = root / "records.jsonl"
    records.write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    ws = Workspace(root, folders["llama"], folders["gpt2"], text, records, finetuned,
                   pickle_only, truncated)  # fmt: skip
    (root / "recipes").mkdir()
    for name, body in RECIPES.items():
        (root / "recipes" / name).write_text(ws.fill(body))
    return ws


# Recipe files of the CLI table ({...}: workspace paths).
RECIPES = {
    "unsafe.yaml": "model: !!python/object/apply:os.system ['echo owned']\npruning: {{}}\n",
    "typo.yaml": "model: {llama}\npruning: {{sparsegpt: {{sparsity: 0.5}}}}\ncalibraton: {{}}\n",
    "per-layer.yaml": (
        "model: {llama}\npruning: {{wanda: {{sparsity: 0.5, sparsity_per_layer: "
        "{{down_prj: 0.7}}}}}}\ncalibration: {{dataset: {text}, num_samples: 2, "
        "sequence_length: 16}}\nevaluation: null\n"
    ),
    "merge-pickle.yaml": (
        "merge_method: ties\nbase_model: {llama}\nmodels: [{{model: {pickle_only}}}]\n"
        "parameters: {{density: 0.5}}\n"
    ),
    "merge-identical.yaml": (
        "merge_method: task_arithmetic\nbase_model: {llama}\nmodels: [{{model: {llama}}}]\n"
    ),
    "merge-long.yaml": (
        "merge_method: sparsegpt_tv\nbase_model: {llama}\nmodels: [{{model: {finetuned}}}]\n"
        "parameters: {{density: 0.5}}\ncalibration: {{dataset: {text}, num_samples: 2, "
        "sequence_length: 4096}}\n"
    ),
    "spd-long.yaml": (
        "model: {gpt2}\nspd: {{C: 2, target_modules: [transformer.h.0.mlp.c_fc]}}\n"
        "data: {{source: {text}, count: 2, length: 256, eval_count: 1}}\n"
    ),
    "spd-typo.yaml": (
        "model: {llama}\nspd: {{C: 2, target_modules: [model.layers.0.mlp.up_prj]}}\n"
        "data: {{source: {text}, count: 2, length: 16, eval_count: 1}}\n"
    ),
    "compress-roles.yaml": (
        "model: {llama}\nbasis_sharing: {{ratio: 0.2, role_ratios: {{fc1: 0.1}}}}\n"
        "calibration: {{dataset: {text}, num_samples: 2, sequence_length: 16}}\n"
        "evaluation: null\n"
    ),
}


def snapshot(root: Path) -> dict[str, tuple[int, int]]:
    """``{relative path: (size, mtime_ns)}`` of every file and folder under ``root``."""
    found = {}
    for path in sorted(root.rglob("*")):
        stat = path.stat()
        found[str(path.relative_to(root))] = (
            stat.st_size if path.is_file() else 0,
            stat.st_mtime_ns,
        )
    return found


def assert_nothing_written(before: dict, after: dict) -> None:
    added = sorted(set(after) - set(before))
    changed = sorted(k for k in set(before) & set(after) if before[k] != after[k])
    removed = sorted(set(before) - set(after))
    assert not (added or changed or removed), {"added": added, "changed": changed, "gone": removed}


@dataclass(frozen=True)
class Case:
    """One bad input of one entry point.

    ``run(ws)`` feeds it (a CLI case: ``argv``, filled from the workspace); the entry point must
    answer with ``error`` (an exception type, or the exit code for the CLI) and a first message
    line matching ``message`` (a regex, searched).
    """

    id: str
    entry: str
    message: str
    error: type[BaseException] | int = 2
    argv: tuple[str, ...] = ()
    run: Callable[[Workspace], Any] | None = None
    owner: str | None = None  # another branch builds this behaviour: strict xfail until then
    env: dict[str, str] = field(default_factory=dict)

    @property
    def marks(self) -> list:
        if self.owner is None:
            return []
        return [pytest.mark.xfail(strict=True, reason=self.owner)]

    def param(self):
        return pytest.param(self, id=self.id, marks=self.marks)


def first_line(text: str) -> str:
    lines = [line for line in text.splitlines() if line.strip()]
    return lines[0] if lines else ""
