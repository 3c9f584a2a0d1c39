"""Dataclass configs that YAML recipes and Python users share.

Every field carries its help text in ``metadata["help"]``; ``from_dict`` rejects unknown keys
with the list of valid ones, so a typo in a recipe fails before any work starts.
"""

from __future__ import annotations

import dataclasses
from typing import Any, TypeVar

T = TypeVar("T")


def help_field(help: str, default: Any = dataclasses.MISSING, **kwargs) -> Any:
    """A dataclass field with help text (mutable defaults go through ``default_factory``)."""
    if isinstance(default, list | dict):
        value = default
        return dataclasses.field(
            default_factory=lambda: type(value)(value), metadata={"help": help}, **kwargs
        )
    return dataclasses.field(default=default, metadata={"help": help}, **kwargs)


def from_dict(cls: type[T], values: dict[str, Any] | None, where: str = "") -> T:
    """Build ``cls`` from a mapping, refusing keys that are not fields of ``cls``."""
    if values is not None and not isinstance(values, dict):
        raise ValueError(f"{where or cls.__name__} must be a mapping, got {type(values).__name__}")
    values = dict(values or {})
    valid = tuple(f.name for f in dataclasses.fields(cls) if f.init)
    check_keys(values, valid, where or cls.__name__)
    return cls(**values)


def to_dict(config: Any) -> dict[str, Any]:
    return dataclasses.asdict(config)


def check_positive_ints(config: Any, names: tuple[str, ...], prefix: str) -> None:
    """Raise naming ``prefix.name`` when one of ``names`` is not a positive integer."""
    for name in names:
        value = getattr(config, name)
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{prefix}.{name} must be a positive integer, got {value!r}")


def check_keys(values: Any, valid: tuple[str, ...], where: str, kind: str | None = None) -> None:
    """The one unknown-key check of every config and recipe: refuse a non-mapping or keys
    outside ``valid``, naming the closest valid key and listing all of them."""
    import difflib

    label = f"a {kind}" if kind else where
    if not isinstance(values, dict):
        raise ValueError(
            f"{where} must be a mapping with keys {list(valid)}, got {type(values).__name__}"
        )
    unknown = sorted(set(values) - set(valid), key=str)
    if unknown:
        hints = [
            f"{key!r} -> {close[0]!r}"
            for key in unknown
            if (close := difflib.get_close_matches(str(key), valid, n=1, cutoff=0.7))
        ]
        hint = f" (did you mean {', '.join(hints)}?)" if hints else ""
        raise ValueError(
            f"unknown key(s) {unknown} in {where}{hint}; valid keys of {label}: {list(valid)}"
        )
