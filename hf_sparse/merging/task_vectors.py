"""Task vectors (fine-tuned minus base) from full checkpoints and from adapters.

Lifecycle:
    inspect_source(path)                  -> what the folder holds (full model, LoRA, masked_lr),
                                             read from its config files and safetensors headers
    check_sources(base_model, infos)      -> every source checked against the base (architecture,
                                             vocabulary, parameter names and shapes, the base an
                                             adapter was trained on) before any tensor is read
    load_task_vector(base_model, info)    -> {parameter name: delta} in the base's stored layout,
                                             float32, only the tensors that changed

Deltas: full checkpoints ``W_ft - W_base``; LoRA ``B @ A * scaling`` (``lora_alpha / r``, or
``/ sqrt(r)`` with rsLoRA, per-module rank/alpha patterns honoured; transposed for GPT-2's
Conv1D); hf_sparse ``masked_lr`` adapters their scattered values. Only safetensors are read.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from ..masks.bitmask import decode_mask
from ..real_model import KNOWN_MODELS, cache_root

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."
# config.json fields that must agree for two checkpoints to share one architecture
ARCHITECTURE_FIELDS = (
    "model_type",
    "vocab_size",
    "hidden_size",
    "num_hidden_layers",
    "intermediate_size",
    "num_attention_heads",
    "num_key_value_heads",
    "n_embd",
    "n_layer",
    "n_head",
    "ffn_dim",
    "tie_word_embeddings",
)
SOURCE_KINDS = ("full", "lora", "masked_lr")


@dataclass
class SourceInfo:
    """A fine-tuned model or adapter folder, as read from its config and file headers."""

    path: Path
    kind: str  # one of SOURCE_KINDS
    config: dict  # config.json (full) or adapter_config.json (adapters)
    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)  # tensor name -> shape
    files: dict[str, Path] = field(default_factory=dict)  # tensor name -> safetensors file
    # Full checkpoints that transformers writes in a legacy layout and converts on load
    # (per-expert MoE weights, GPT-NeoX's embed_out): read through from_pretrained.
    converted: bool = False

    @property
    def name(self) -> str:
        return str(self.path)


def _safetensors_headers(files: list[Path]) -> tuple[dict[str, tuple], dict[str, Path]]:
    shapes, where = {}, {}
    for file in files:
        try:
            with safe_open(str(file), framework="pt") as handle:
                for key in handle.keys():  # noqa: SIM118 (safe_open is not a dict)
                    shapes[key] = tuple(handle.get_slice(key).get_shape())
                    where[key] = file
        except Exception as error:  # a truncated or non-safetensors file
            raise ValueError(f"could not read safetensors file {file}: {error}") from None
    return shapes, where


def _weight_files(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.exists():
        weight_map = json.loads(index.read_text()).get("weight_map", {})
        return sorted({path / f for f in weight_map.values()})
    files = sorted(path.glob("*.safetensors"))
    if not files:
        bins = sorted(p.name for p in path.glob("*.bin"))
        hint = (
            f" (found {bins}: convert them to safetensors; pickles are never loaded)"
            if bins
            else ""
        )
        raise ValueError(f"{path} holds no *.safetensors weights{hint}")
    return files


def inspect_source(path: str | os.PathLike) -> SourceInfo:
    """Read what a fine-tuned folder holds without loading any tensor."""
    path = Path(path).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(
            f"model source {path} is not a folder; give a save_pretrained folder of a "
            "fine-tuned model or of a PEFT adapter"
        )
    if (path / ADAPTER_CONFIG).exists():
        config = json.loads((path / ADAPTER_CONFIG).read_text())
        peft_type = str(config.get("peft_type", "")).upper()
        kinds = {"LORA": "lora", "MASKED_LR": "masked_lr"}
        if peft_type not in kinds:
            raise ValueError(
                f"{path}: adapters of type {peft_type or '?'} cannot be turned into task "
                f"vectors; supported: LORA, MASKED_LR (or merge them into a full model first "
                "with merge_and_unload and pass that folder)"
            )
        if config.get("use_dora"):
            raise ValueError(
                f"{path}: DoRA adapters rescale the base weight's columns, so their delta is not "
                "B @ A; merge_and_unload() it and pass the full model instead"
            )
        weights = path / ADAPTER_WEIGHTS
        if not weights.exists():
            raise ValueError(f"{path} has {ADAPTER_CONFIG} but no {ADAPTER_WEIGHTS}")
        shapes, files = _safetensors_headers([weights])
        return SourceInfo(path, kinds[peft_type], config, shapes, files)
    if not (path / "config.json").exists():
        raise ValueError(
            f"{path} has neither config.json (a full model) nor {ADAPTER_CONFIG} (an adapter)"
        )
    config = json.loads((path / "config.json").read_text())
    shapes, files = _safetensors_headers(_weight_files(path))
    return SourceInfo(path, "full", config, shapes, files)


def _same_base_name(adapter_base: str, base_name: str) -> bool:
    def canonical(name: str) -> str:
        if name in KNOWN_MODELS:
            return KNOWN_MODELS[name].hub_id.lower()
        expanded = Path(name).expanduser()
        if expanded.exists():
            resolved = str(expanded.resolve())
            for known, spec in KNOWN_MODELS.items():
                if resolved == str((cache_root() / "models" / known).resolve()):
                    return spec.hub_id.lower()
            return resolved
        return name.rstrip("/").lower()

    return canonical(adapter_base) == canonical(base_name)


def _check_architecture(base_model: nn.Module, info: SourceInfo) -> None:
    base_config = base_model.config.to_dict() if hasattr(base_model, "config") else {}
    differing = [
        f"{key}: base {base_config[key]!r} vs {info.config[key]!r}"
        for key in ARCHITECTURE_FIELDS
        if key in base_config and key in info.config and base_config[key] != info.config[key]
    ]
    if differing:
        raise ValueError(
            f"{info.name} is not a fine-tune of this base model ({'; '.join(differing)}); "
            "task vectors need the same architecture and vocabulary"
        )


def _saved_layout(base_model: nn.Module) -> dict[str, tuple[int, ...]]:
    """Names and shapes of the base's tensors as ``save_pretrained`` writes them: transformers
    converts some families back to their legacy checkpoint layout on save (MoE experts one
    tensor each, GPT-NeoX's ``embed_out``) and forward again on load."""
    from transformers.core_model_loading import revert_weight_conversion

    state = revert_weight_conversion(base_model, dict(base_model.state_dict()))
    return {n: tuple(t.shape) for n, t in state.items()}


def _full_checkpoint_names(base_model: nn.Module, info: SourceInfo) -> None:
    base_shapes = {n: tuple(t.shape) for n, t in base_model.state_dict().items()}
    unknown = sorted(set(info.shapes) - set(base_shapes))
    if unknown and hasattr(base_model, "config"):
        saved = _saved_layout(base_model)
        if not set(info.shapes) - set(saved):
            info.converted = True
            base_shapes = saved
            unknown = []
    if unknown:
        raise ValueError(
            f"{info.name} has {len(unknown)} tensor(s) the base model lacks, e.g. {unknown[:3]}; "
            "is it a fine-tune of another architecture?"
        )
    for name, shape in info.shapes.items():
        if shape != base_shapes[name]:
            raise ValueError(
                f"{info.name}: {name} has shape {shape}, the base model's is {base_shapes[name]} "
                "(different vocabulary or width?)"
            )


def _module_of(key: str, suffixes: tuple[str, ...]) -> tuple[str, str] | None:
    """``base_model.model.<module>.<suffix>`` -> (module, suffix)."""
    for suffix in suffixes:
        marker = f".{suffix}"
        if marker in key:
            module = key.removeprefix(PEFT_PREFIX).split(marker)[0]
            return module, suffix
    return None


LORA_SUFFIXES = ("lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B")
MASKED_LR_SUFFIXES = ("masked_lr_inside", "masked_lr_outside", "masked_lr_mask")


def _check_adapter_modules(base_model: nn.Module, info: SourceInfo) -> None:
    modules = dict(base_model.named_modules())
    params = dict(base_model.named_parameters(remove_duplicate=False))
    suffixes = LORA_SUFFIXES if info.kind == "lora" else MASKED_LR_SUFFIXES
    for key, shape in info.shapes.items():
        found = _module_of(key, suffixes)
        if found is None:  # modules_to_save: a full replacement of a base parameter
            name = key.removeprefix(PEFT_PREFIX)
            if name not in params:
                raise ValueError(
                    f"{info.name}: adapter tensor {key} matches no module or parameter of the "
                    "base model; was it trained on another base?"
                )
            if tuple(params[name].shape) != shape:
                raise ValueError(
                    f"{info.name}: {key} has shape {shape}, the base's {name} is "
                    f"{tuple(params[name].shape)}"
                )
            continue
        module_name, suffix = found
        module = modules.get(module_name)
        if module is None or not hasattr(module, "weight"):
            raise ValueError(
                f"{info.name}: adapter targets {module_name}, which this base model does not "
                "have; was it trained on another base?"
            )
        weight_shape = tuple(module.weight.shape)
        if suffix in ("lora_A", "lora_B"):
            out_f, in_f = _out_in(module)
            expected = in_f if suffix == "lora_A" else out_f
            side = shape[1] if suffix == "lora_A" else shape[0]
            if side != expected:
                raise ValueError(
                    f"{info.name}: {key} has shape {shape}, which does not fit "
                    f"{module_name} ({out_f} outputs x {in_f} inputs)"
                )
        elif suffix == "lora_embedding_A" and shape[1] != weight_shape[0]:
            raise ValueError(
                f"{info.name}: {key} has shape {shape}; {module_name} is {weight_shape}"
            )


def _out_in(module: nn.Module) -> tuple[int, int]:
    from transformers.pytorch_utils import Conv1D

    rows, cols = module.weight.shape
    return (cols, rows) if isinstance(module, Conv1D) else (rows, cols)


def check_sources(
    base_model: nn.Module,
    infos: list[SourceInfo],
    base_name: str | None = None,
    check_base: bool = True,
) -> None:
    """Check every source against ``base_model`` (nothing is loaded; fails on the first
    problem with the source named). ``base_name``: the name or path the base was loaded from,
    compared with an adapter's ``base_model_name_or_path`` when ``check_base``."""
    if not infos:
        raise ValueError("no models to merge: give at least one fine-tuned model or adapter")
    for info in infos:
        if info.kind == "full":
            _check_architecture(base_model, info)
            _full_checkpoint_names(base_model, info)
            continue
        adapter_base = info.config.get("base_model_name_or_path")
        if (
            check_base
            and adapter_base
            and base_name
            and not _same_base_name(adapter_base, base_name)
        ):
            raise ValueError(
                f"adapter {info.name} was trained on {adapter_base!r}, but the base model is "
                f"{base_name!r}; give the adapter's base model, or set check_base: false if "
                "both names are the same weights"
            )
        _check_adapter_modules(base_model, info)


def _pattern_value(patterns: dict, module_name: str, default):
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?{key}$", module_name):
            return value
    return default


def _lora_scaling(config: dict, module_name: str) -> float:
    rank = _pattern_value(config.get("rank_pattern"), module_name, config.get("r", 8))
    alpha = _pattern_value(config.get("alpha_pattern"), module_name, config.get("lora_alpha", 8))
    return alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank


def _read(info: SourceInfo, key: str) -> torch.Tensor:
    with safe_open(str(info.files[key]), framework="pt") as handle:
        return handle.get_tensor(key)


@torch.no_grad()
def load_task_vector(base_model: nn.Module, info: SourceInfo) -> dict[str, torch.Tensor]:
    """``{parameter name: delta}`` (float32, the base's stored layout) of the tensors that
    differ from the base. Call ``check_sources`` first."""
    params = dict(base_model.named_parameters())
    if info.kind == "full" and info.converted:
        return _converted_deltas(base_model, info, params)
    if info.kind == "full":
        deltas = {}
        for name in info.shapes:
            if name not in params:
                continue  # buffers, or a tied copy (lm_head.weight) of a parameter seen already
            delta = _read(info, name).float() - params[name].detach().float().cpu()
            if delta.any():
                deltas[name] = delta
        return deltas
    return (
        _lora_deltas(base_model, info)
        if info.kind == "lora"
        else _masked_lr_deltas(base_model, info)
    )


def _converted_deltas(
    base_model: nn.Module, info: SourceInfo, params: dict[str, nn.Parameter]
) -> dict[str, torch.Tensor]:
    """Deltas of a checkpoint in transformers' legacy layout: loaded whole by
    ``from_pretrained``, which converts it (one model's worth of extra memory, in the
    checkpoint's own dtype)."""
    fine = type(base_model).from_pretrained(info.path, dtype="auto")
    deltas = {}
    for name, param in fine.named_parameters():
        if name in params:
            delta = param.detach().float().cpu() - params[name].detach().float().cpu()
            if delta.any():
                deltas[name] = delta
    return deltas


def _lora_deltas(base_model: nn.Module, info: SourceInfo) -> dict[str, torch.Tensor]:
    from transformers.pytorch_utils import Conv1D

    modules = dict(base_model.named_modules())
    params = dict(base_model.named_parameters())
    factors: dict[str, dict[str, torch.Tensor]] = {}
    deltas: dict[str, torch.Tensor] = {}
    for key in info.shapes:
        found = _module_of(key, LORA_SUFFIXES)
        if found is None:
            name = key.removeprefix(PEFT_PREFIX)
            deltas[name] = _read(info, key).float() - params[name].detach().float().cpu()
            continue
        factors.setdefault(found[0], {})[found[1]] = _read(info, key).float()
    for module_name, pair in sorted(factors.items()):
        module = modules[module_name]
        scaling = _lora_scaling(info.config, module_name)
        if "lora_A" in pair and "lora_B" in pair:
            delta = pair["lora_B"] @ pair["lora_A"] * scaling  # [out, in]
            if isinstance(module, Conv1D) or info.config.get("fan_in_fan_out"):
                delta = delta.t()
        elif "lora_embedding_A" in pair and "lora_embedding_B" in pair:
            delta = (pair["lora_embedding_B"] @ pair["lora_embedding_A"]).t() * scaling
        else:
            raise ValueError(f"{info.name}: {module_name} has only {sorted(pair)} of a LoRA pair")
        name = f"{module_name}.weight"
        if tuple(delta.shape) != tuple(params[name].shape):
            raise ValueError(
                f"{info.name}: the LoRA delta of {module_name} has shape {tuple(delta.shape)}, "
                f"the weight is {tuple(params[name].shape)}"
            )
        deltas[name] = deltas.get(name, 0) + delta
    return {n: d for n, d in deltas.items() if d.any()}


def _masked_lr_deltas(base_model: nn.Module, info: SourceInfo) -> dict[str, torch.Tensor]:
    params = dict(base_model.named_parameters())
    inside_scale = float(info.config.get("inside_lr_scale", 1.0))
    outside_scale = float(info.config.get("outside_lr_scale", 0.0))
    parts: dict[str, dict[str, torch.Tensor]] = {}
    deltas: dict[str, torch.Tensor] = {}
    for key in info.shapes:
        found = _module_of(key, MASKED_LR_SUFFIXES)
        if found is None:
            name = key.removeprefix(PEFT_PREFIX)
            deltas[name] = _read(info, key).float() - params[name].detach().float().cpu()
            continue
        parts.setdefault(found[0], {})[found[1]] = _read(info, key)
    for module_name, part in sorted(parts.items()):
        name = f"{module_name}.weight"
        shape = tuple(params[name].shape)
        if "masked_lr_mask" not in part or "masked_lr_inside" not in part:
            raise ValueError(f"{info.name}: {module_name} lacks its mask or values")
        mask = decode_mask(part["masked_lr_mask"], shape, module_name)
        inside = part["masked_lr_inside"].float()
        if inside.numel() != int(mask.sum()):
            raise ValueError(
                f"{info.name}: {module_name} has {inside.numel()} values for a mask of "
                f"{int(mask.sum())} entries"
            )
        delta = torch.zeros(shape).masked_scatter(mask, inside * inside_scale)
        if "masked_lr_outside" in part:
            delta = delta.masked_scatter(~mask, part["masked_lr_outside"].float() * outside_scale)
        deltas[name] = delta
    return {n: d for n, d in deltas.items() if d.any()}
