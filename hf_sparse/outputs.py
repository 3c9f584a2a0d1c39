"""One output schema: every output folder holds ``hf_sparse_results.json`` and ``recipe.yaml``.

The results file has the same top-level keys whatever made the folder::

    {"kind": "pruning", "base_model": "...", "config": {...}, "metrics": {...},
     "timings": {"prune_seconds": ...}, "versions": {"hf_sparse": ..., "torch": ...}, ...}

Every output folder also holds its card, ``README.md`` (see ``hf_sparse.cards``).
``kind`` is the recipe kind (``pruning``, ``merging``, ``masks``, ``finetune``, ``analysis``,
``basis_sharing``, ``spd``) or the callback that wrote it; ``config`` the settings that made
it; method-specific extras sit beside these keys. ``recipe.yaml`` is the recipe that made the
folder (for Python or callback outputs: the configs they were given, in recipe form).
"""

from __future__ import annotations

import importlib.metadata
import os
import platform
from pathlib import Path
from typing import Any

import yaml

from .io import write_json_atomic

RESULTS_FILE = "hf_sparse_results.json"
RECIPE_FILE = "recipe.yaml"
SCHEMA_KEYS = ("kind", "base_model", "config", "metrics", "timings", "versions")
_PACKAGES = ("hf-sparse", "torch", "transformers", "peft", "accelerate", "safetensors")


def package_versions() -> dict[str, str | None]:
    """Versions of Python and of the packages an output depends on (None if not installed)."""
    versions: dict[str, str | None] = {"python": platform.python_version()}
    for name in _PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def results_record(
    kind: str,
    config: dict[str, Any] | None,
    metrics: dict[str, Any] | None = None,
    timings: dict[str, float] | None = None,
    base_model: str | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """The results mapping in the shared schema; ``extra`` keys may not shadow schema keys."""
    clash = sorted(set(extra) & set(SCHEMA_KEYS))
    if clash:
        raise ValueError(f"results extras {clash} would shadow schema keys {list(SCHEMA_KEYS)}")
    return {
        "kind": kind,
        "base_model": base_model,
        "config": config or {},
        "metrics": metrics or {},
        "timings": {k: round(float(v), 3) for k, v in (timings or {}).items()},
        "versions": package_versions(),
        **extra,
    }


def write_results(folder: str | os.PathLike, record: dict[str, Any]) -> Path:
    """Write a :func:`results_record` as ``hf_sparse_results.json`` in ``folder``."""
    missing = [k for k in SCHEMA_KEYS if k not in record]
    if missing:
        raise ValueError(f"results record lacks {missing}; build it with results_record()")
    return write_json_atomic(record, Path(folder) / RESULTS_FILE)


def write_recipe(folder: str | os.PathLike, recipe: dict[str, Any] | None) -> Path | None:
    """Write the recipe mapping that made an output as ``recipe.yaml`` (nothing if None)."""
    if recipe is None:
        return None
    path = Path(folder) / RECIPE_FILE
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def write_outputs(
    folder: str | os.PathLike,
    record: dict[str, Any],
    recipe: dict[str, Any] | None,
    card: bool = True,
    source: str | None = None,
) -> None:
    """The files every output folder holds: results, recipe and (``card``) its model card,
    ``README.md`` (``hf_sparse.cards``; write the weights first, the card reads the folder).
    ``source``: where the base model was loaded from, when the recipe does not say."""
    write_results(folder, record)
    write_recipe(folder, recipe)
    if card:
        from .cards import write_card

        write_card(folder, record, recipe, source=source)


def read_results(folder: str | os.PathLike) -> dict[str, Any] | None:
    """The results mapping of an output folder, or None when it has none."""
    import json

    path = Path(folder) / RESULTS_FILE
    return json.loads(path.read_text()) if path.is_file() else None
