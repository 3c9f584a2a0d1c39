"""Loading models and tokenizers by known name, local folder or Hub id (shared by every method)."""

from __future__ import annotations

import torch
from torch import nn

from .real_model import resolve_model_path


def load_model_and_tokenizer(
    name_or_path: str, dtype: torch.dtype = torch.float32
) -> tuple[nn.Module, object]:
    """``AutoModelForCausalLM`` and ``AutoTokenizer`` of a known name, folder or Hub id.

    The model keeps the name it was asked by in ``model.name_or_path`` (so outputs can record
    the known name's Hub id as their base).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve_model_path(name_or_path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    tokenizer = AutoTokenizer.from_pretrained(path)
    model.name_or_path = name_or_path
    return model, tokenizer


def load_checked(
    name_or_path: str,
    output_dir: str | None = None,
    overwrite: bool = False,
    dtype: torch.dtype = torch.float32,
) -> tuple[nn.Module, object]:
    """Check the output folder first (before any work), then load model and tokenizer."""
    from .io import check_output_dir

    if not name_or_path:
        raise ValueError("no model: set `model:` in the recipe or pass --model")
    if output_dir is not None:
        check_output_dir(output_dir, overwrite)
    return load_model_and_tokenizer(name_or_path, dtype)


def base_model_id(model_or_name: nn.Module | str | None) -> str | None:
    """The name an output records as its base: a known name's Hub id, else the name given."""
    from .real_model import KNOWN_MODELS

    name = (
        model_or_name
        if model_or_name is None or isinstance(model_or_name, str)
        else getattr(model_or_name, "name_or_path", None)
    )
    return KNOWN_MODELS[name].hub_id if name in KNOWN_MODELS else name
