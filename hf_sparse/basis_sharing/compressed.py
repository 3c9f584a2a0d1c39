"""A compressed Basis Sharing model people download and run: each basis stored once.

``save_compressed(peft_model, folder)`` writes a plain transformers model folder:
``model.safetensors`` holds every shared basis once (``bases.<key>.weight``, ``[k, d_in]``), each
compressed layer's coefficients (``...<layer>.coefficient.weight``, ``[d_out, k]``, with the
original bias) and the untouched weights (embeddings, norms, head); ``config.json`` holds the
original model's config as ``text_config`` plus the layout (``bases``, ``layers``) and an
``auto_map`` naming the modeling files shipped beside it (``remote/``: torch + transformers
only). So the folder loads

- where hf_sparse is not installed: ``AutoModelForCausalLM.from_pretrained(folder,
  trust_remote_code=True)``;
- without remote code once ``import hf_sparse`` has registered ``basis_shared`` with
  ``AutoConfig`` / ``AutoModelForCausalLM``: ``AutoModelForCausalLM.from_pretrained(folder)`` or
  ``load_compressed(folder)``.

The dense weights of compressed layers are gone (unlike the adapter, which needs its base model),
so the folder is smaller than the dense model. Its logits are the adapter's: the same tensors in
the same order of operations, ``(x B^T) C^T + bias``. Basis Sharing: Wang et al., ICLR 2025.
"""

from __future__ import annotations

import copy
import json
import logging
import os
from pathlib import Path
from typing import Any

import torch
from peft import PeftModel
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM

from .layer import BasisSharingLayer
from .model import BANK, BasisSharingModel
from .remote.configuration_basis_shared import BasisSharedConfig
from .remote.modeling_basis_shared import BasisSharedForCausalLM

logger = logging.getLogger(__name__)

MODEL_TYPE = BasisSharedConfig.model_type
REMOTE_FILES = ("configuration_basis_shared.py", "modeling_basis_shared.py")
AUTO_MAP = {
    "AutoConfig": "configuration_basis_shared.BasisSharedConfig",
    "AutoModelForCausalLM": "modeling_basis_shared.BasisSharedForCausalLM",
}


def register_auto_classes() -> None:
    """Make ``basis_shared`` folders load with the Auto classes without remote code."""
    AutoConfig.register(MODEL_TYPE, BasisSharedConfig, exist_ok=True)
    AutoModelForCausalLM.register(BasisSharedConfig, BasisSharedForCausalLM, exist_ok=True)


def _tuner(model: nn.Module) -> BasisSharingModel:
    tuner = model.base_model if isinstance(model, PeftModel) else model
    if not isinstance(tuner, BasisSharingModel):
        raise TypeError(
            f"expected a Basis Sharing PeftModel (get_basis_sharing_model or "
            f"PeftModel.from_pretrained on a basis_sharing adapter), got {type(model).__name__}"
        )
    return tuner


def _check_exportable(tuner: BasisSharingModel, adapter_name: str) -> dict[str, Any]:
    if adapter_name not in tuner.peft_config:
        raise ValueError(f"no adapter {adapter_name!r}; this model has {sorted(tuner.peft_config)}")
    config = tuner.peft_config[adapter_name]
    if config.modules_to_save:
        raise ValueError(
            f"adapter {adapter_name!r} trains modules_to_save={config.modules_to_save}; the "
            "compressed model stores only bases, coefficients and base weights. Merge those "
            "modules into the base first, or ship the adapter folder instead"
        )
    layers = tuner.layers(adapter_name)
    if not layers:
        raise ValueError(f"adapter {adapter_name!r} compresses no layer")
    problems = []
    for name, layer in layers.items():
        if layer.basis_sharing_pending[adapter_name]:
            problems.append(f"{name} is not compressed yet (fill_deferred_factors_ first)")
        elif layer.merged:
            problems.append(f"{name} is merged (unmerge first)")
        elif layer.basis_sharing_rank_policy is not None:
            problems.append(
                f"{name} runs a dynamic-rank policy, which the compressed model cannot express"
            )
    if problems:
        raise ValueError(f"cannot export adapter {adapter_name!r}: {problems[0]}")
    return layers


def _build_config(
    tuner: BasisSharingModel, layers: dict[str, BasisSharingLayer], adapter_name: str
) -> BasisSharedConfig:
    base = tuner.model
    bank = tuner._bank(BANK)[adapter_name]
    text_config = copy.deepcopy(base.config)
    text_config.architectures = [type(base).__name__]
    dtype = next(iter(bank.values())).dtype
    text_config.dtype = dtype
    bases = {
        key: {"rank": int(basis.shape[0]), "in_features": int(basis.shape[1])}
        for key, basis in bank.items()
    }
    used = {layer.basis_sharing_key[adapter_name] for layer in layers.values()}
    config = BasisSharedConfig(
        text_config=text_config,
        bases={k: v for k, v in bases.items() if k in used},
        layers={name: layer.basis_sharing_key[adapter_name] for name, layer in layers.items()},
        architectures=[BasisSharedForCausalLM.__name__],
    )
    config.dtype = dtype
    config.auto_map = dict(AUTO_MAP)
    # the same attention kernel as the adapter model, so the logits are the adapter's
    config._attn_implementation = base.config._attn_implementation
    return config


def _state_dict(
    tuner: BasisSharingModel, layers: dict[str, BasisSharingLayer], adapter_name: str
) -> dict[str, torch.Tensor]:
    """Keys of ``BasisSharedForCausalLM``: ``lm.<original>``, ``lm.<layer>.coefficient.*``,
    ``bases.<key>.weight``; values are the adapter model's own tensors (not copies)."""
    prefixes = tuple(f"{name}." for name in layers)
    state: dict[str, torch.Tensor] = {}
    for key, value in tuner.model.state_dict(keep_vars=True).items():
        if not key.startswith(prefixes):
            state[f"lm.{key}"] = value
    for name, layer in layers.items():
        state[f"lm.{name}.coefficient.weight"] = layer.basis_sharing_coefficient[adapter_name]
        bias = layer.get_base_layer().bias
        if bias is not None:
            state[f"lm.{name}.coefficient.bias"] = bias
    bank = tuner._bank(BANK)[adapter_name]
    for key in {layer.basis_sharing_key[adapter_name] for layer in layers.values()}:
        state[f"bases.{key}.weight"] = bank[key]
    return state


@torch.no_grad()
def to_compressed(model: nn.Module, adapter_name: str = "default") -> BasisSharedForCausalLM:
    """The compressed model of a Basis Sharing adapter, in memory.

    It holds the adapter model's own tensors (nothing is copied), so it costs no memory and
    gives the adapter's logits; changing one changes the other. Raises before any work if the
    adapter cannot be expressed (not compressed yet, merged, dynamic rank, modules_to_save).
    """
    tuner = _tuner(model)
    layers = _check_exportable(tuner, adapter_name)
    config = _build_config(tuner, layers, adapter_name)
    with torch.device("meta"):
        compressed = BasisSharedForCausalLM(config)
    if type(compressed.lm) is not type(tuner.model):
        raise TypeError(
            f"the base model is a {type(tuner.model).__name__} but its config builds a "
            f"{type(compressed.lm).__name__} through AutoModelForCausalLM; only models that "
            "transformers builds from their config can be exported"
        )
    state = _state_dict(tuner, layers, adapter_name)
    result = compressed.load_state_dict(state, strict=False, assign=True)
    missing = [k for k in result.missing_keys if k not in compressed.all_tied_weights_keys]
    if missing or result.unexpected_keys:
        raise RuntimeError(
            f"the compressed structure does not fit the adapter model: missing {missing[:3]}, "
            f"unexpected {result.unexpected_keys[:3]}"
        )
    _copy_buffers(compressed.lm, tuner.model)
    compressed.tie_weights()
    compressed.generation_config = copy.deepcopy(tuner.model.generation_config)
    compressed.name_or_path = getattr(tuner.model, "name_or_path", "")
    compressed.train(tuner.model.training)
    return compressed


def _copy_buffers(target: nn.Module, source: nn.Module) -> None:
    """Non-persistent buffers (rotary tables, masks) are not in a state dict: take them from
    the adapter model, where every untouched module has the same name."""
    for name, buffer in list(target.named_buffers()):
        if buffer.device.type != "meta":
            continue
        owner_name, _, leaf = name.rpartition(".")
        owner = target.get_submodule(owner_name)
        value = source.get_buffer(name)
        owner._buffers[leaf] = value
    for name, module in target.named_modules():
        # rotary embeddings keep an unregistered copy of their table
        if hasattr(module, "original_inv_freq") and hasattr(module, "inv_freq"):
            original = getattr(source.get_submodule(name), "original_inv_freq", None)
            if original is not None:
                module.original_inv_freq = original


def write_compressed(
    model: nn.Module, folder: str | os.PathLike, adapter_name: str = "default"
) -> int:
    """Write the compressed model's files into an existing ``folder`` (the atomic writer's
    temporary folder): ``config.json`` (with ``auto_map``), ``model.safetensors``,
    ``generation_config.json`` and the two modeling files. Returns the weight bytes."""
    folder = Path(folder)
    compressed = to_compressed(model, adapter_name)
    compressed.save_pretrained(folder, safe_serialization=True)  # ships REMOTE_FILES too
    missing = [name for name in REMOTE_FILES if not (folder / name).is_file()]
    if missing:
        raise RuntimeError(f"save_pretrained did not copy the modeling files {missing}")
    return compressed_bytes(folder)


def save_compressed(
    model: nn.Module,
    output_dir: str | os.PathLike,
    adapter_name: str = "default",
    tokenizer: Any = None,
    overwrite: bool = False,
    record: dict[str, Any] | None = None,
    recipe: dict[str, Any] | None = None,
) -> Path:
    """Save a Basis Sharing ``PeftModel`` as a standalone compressed model folder, atomically
    (nothing is left behind on failure; an existing folder needs ``overwrite``).

    Beside the files of ``write_compressed``: the tokenizer when given, and
    ``hf_sparse_results.json`` / ``recipe.yaml`` when ``record`` is given. Returns the folder.
    """
    from ..io import atomic_output_dir, check_output_dir, model_bytes
    from ..outputs import write_outputs

    _check_exportable(_tuner(model), adapter_name)
    check_output_dir(output_dir, overwrite)
    expected = model_bytes(to_compressed(model, adapter_name))
    with atomic_output_dir(output_dir, overwrite, expected) as tmp:
        size = write_compressed(model, tmp, adapter_name)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if record is not None:
            write_outputs(tmp, record, recipe)
    logger.info("saved the compressed model (%s of weights) to %s", _human(size), output_dir)
    return Path(output_dir)


def _human(n: float) -> str:
    return f"{n / 2**20:.1f} MiB"


def _read_config(folder: Path) -> dict[str, Any] | None:
    path = folder / "config.json"
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def is_compressed_basis_sharing(folder: str | os.PathLike) -> bool:
    """Whether ``folder`` holds a compressed Basis Sharing model (``model_type: basis_shared``)."""
    folder = Path(folder)
    data = _read_config(folder) if folder.is_dir() else None
    return data is not None and data.get("model_type") == MODEL_TYPE


def load_compressed(
    folder: str | os.PathLike, dtype: torch.dtype | str = torch.float32, **kwargs: Any
) -> BasisSharedForCausalLM:
    """Load a compressed Basis Sharing folder with hf_sparse's own copy of the modeling code
    (no remote code runs); ``kwargs`` go to ``from_pretrained`` (``device_map``, ...)."""
    folder = Path(folder)
    if not is_compressed_basis_sharing(folder):
        raise ValueError(
            f"{folder} is not a compressed Basis Sharing model (its config.json must say "
            f"model_type: {MODEL_TYPE}); save one with save_compressed or a recipe with "
            "`output: compressed`"
        )
    register_auto_classes()
    return BasisSharedForCausalLM.from_pretrained(folder, dtype=dtype, **kwargs)


def compressed_bytes(folder: str | os.PathLike) -> int:
    """Bytes of the weight files (``*.safetensors``) in a model folder."""
    return sum(p.stat().st_size for p in Path(folder).glob("*.safetensors"))
