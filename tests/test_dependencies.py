"""Every runtime dependency pyproject.toml declares is used: imported by the package, or (the
listed exceptions) needed by a library we call for a feature we use."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODULES = {"pyyaml": "yaml", "lm-eval": "lm_eval"}
# gguf: transformers reads the real model's GGUF file with it (hf_sparse.real_model);
# accelerate: transformers.Trainer (our trainers and callbacks) requires it.
USED_THROUGH_ANOTHER_LIBRARY = {"gguf", "accelerate"}


def test_every_declared_dependency_is_imported_somewhere():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    names = [re.split(r"[<>=!~ \[]", spec, maxsplit=1)[0] for spec in project["dependencies"]]
    source = "\n".join(
        p.read_text()
        for folder in ("hf_sparse", "callbacks")
        for p in (ROOT / folder).rglob("*.py")
    )
    unused = [
        name
        for name in names
        if name not in USED_THROUGH_ANOTHER_LIBRARY
        and not re.search(rf"^\s*(import|from) {MODULES.get(name, name)}\b", source, re.M)
    ]
    assert not unused, f"declared in pyproject.toml but imported nowhere: {unused}"
