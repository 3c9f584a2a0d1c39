"""The layering rule of DESIGN.md: callbacks import the library, the library never imports
callbacks (a library flow that needs a Trainer hook writes its own small one)."""

from __future__ import annotations

import ast
from pathlib import Path

import hf_sparse

PACKAGE = Path(hf_sparse.__file__).parent


def _imported_modules(path: Path) -> list[tuple[int, str]]:
    """Every module ``path`` imports, relative imports resolved against ``hf_sparse``."""
    package = ["hf_sparse", *path.relative_to(PACKAGE).parent.parts]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            module = ".".join([*base, *([node.module] if node.module else [])])
            found.append((node.lineno, module))
            found += [(node.lineno, f"{module}.{alias.name}") for alias in node.names]
    return found


def test_the_library_never_imports_callbacks():
    offenders = [
        f"{path.relative_to(PACKAGE.parent)}:{line} imports {module}"
        for path in sorted(PACKAGE.rglob("*.py"))
        if "callbacks" not in path.relative_to(PACKAGE).parts
        for line, module in _imported_modules(path)
        if module == "hf_sparse.callbacks" or module.startswith("hf_sparse.callbacks.")
    ]
    assert not offenders, "\n".join(offenders)


def test_the_check_resolves_relative_imports():
    nested = PACKAGE / "pruning" / "recover.py"
    modules = dict((m, n) for n, m in _imported_modules(nested))
    assert "hf_sparse.pruning.apply.apply_masks_" in modules  # `from .apply import apply_masks_`
    assert "hf_sparse.evaluation.perplexity" in modules  # `from ..evaluation import perplexity`
