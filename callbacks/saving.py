"""What a weight-changing callback adds to every folder the Trainer saves the model into.

``Trainer`` gives callbacks ``on_save`` for checkpoints only; ``trainer.save_model()`` (the
final folder) has no event. Both go through the model's ``save_pretrained``, so a callback
registers a writer on the model at ``on_train_begin`` (:func:`add_save_writer`) and it runs
after every ``save_pretrained`` of that model on the main process: checkpoints,
``trainer.save_model(any_dir)`` and the user's own ``model.save_pretrained(dir)``. The writer
adds the callback's masks, its results and recipe and the card (``hf_sparse.outputs``).
"""

from __future__ import annotations

import types
from collections.abc import Callable
from pathlib import Path
from typing import Any

from hf_sparse.outputs import results_record, write_outputs

_WRITERS = "_hf_sparse_save_writers"


def _save_pretrained_then_write(self, save_directory, *args, **kwargs):
    result = type(self).save_pretrained(self, save_directory, *args, **kwargs)
    if kwargs.get("is_main_process", True):
        for writer in list(getattr(self, _WRITERS, {}).values()):
            writer(Path(save_directory), self)
    return result


def add_save_writer(
    model, key: str, writer: Callable[[Path, Any], None], tags: tuple[str, ...] = ()
) -> None:
    """Run ``writer(folder, model)`` after every ``model.save_pretrained(folder)``; ``key`` (one
    per callback kind) replaces an earlier writer, so a second ``train()`` does not add another.
    ``tags`` (after ``hf-sparse``) go to ``model.add_model_tags``, for the card
    ``Trainer.push_to_hub`` writes."""
    if model is None or not hasattr(model, "save_pretrained"):
        return
    if hasattr(model, "add_model_tags"):
        model.add_model_tags(["hf-sparse", *tags])
    writers = model.__dict__.setdefault(_WRITERS, {})
    writers[key] = writer
    # A bound method on the instance: a deepcopy of the model gets one bound to the copy.
    model.save_pretrained = types.MethodType(_save_pretrained_then_write, model)


def remove_save_writers(model) -> None:
    """Undo :func:`add_save_writer` (a library flow that trains inside and saves its own way)."""
    if model is not None and _WRITERS in model.__dict__:
        del model.__dict__[_WRITERS]
        model.__dict__.pop("save_pretrained", None)


def write_callback_outputs(
    folder: Path,
    callback: str,
    model,
    config: dict[str, Any],
    recipe: dict[str, Any],
    metrics: dict[str, Any] | None = None,
    **extra: Any,
) -> None:
    """Results (kind = the callback's name, ``config`` its settings), ``recipe`` (the
    callback's settings in recipe form) and the card."""
    from hf_sparse.cards import describe_base
    from hf_sparse.loading import base_model_id

    source = _source(model)
    record = results_record(
        callback, config, metrics or {}, base_model=base_model_id(source), **extra
    )
    model_name = describe_base(source).hub_id or source
    recipe = {"callback": callback, "model": model_name, **recipe}
    write_outputs(folder, record, recipe, source=source)


def _source(model) -> str | None:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return getattr(base, "name_or_path", None) or None
