"""Architecture knowledge: where the decoder blocks are and what each linear layer does.

This is the only module that knows attribute paths of specific model families. Method code
asks it for "the decoder blocks" and "the target linears of this block" and works on weight
matrices in ``[out_features, in_features]`` layout, whatever the layer type (GPT-2's ``Conv1D``
stores the transpose).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from .masks.ranking import TensorLayout

# Leaf module name -> role. Parent-dependent names (GPT-2's ``c_proj`` is "o" under ``attn``
# and "fc2" under ``mlp``) are resolved in ``linear_role``.
_LEAF_ROLES = {
    "q_proj": "q",
    "k_proj": "k",
    "v_proj": "v",
    "o_proj": "o",
    "out_proj": "o",
    "gate_proj": "gate",
    "up_proj": "up",
    "down_proj": "down",
    "fc1": "fc1",
    "fc2": "fc2",
    "c_attn": "qkv",
    "c_fc": "fc1",
    "query_key_value": "qkv",
    "dense_h_to_4h": "fc1",
    "dense_4h_to_h": "fc2",
}
_PARENT_ROLES = {("attn", "c_proj"): "o", ("mlp", "c_proj"): "fc2", ("attention", "dense"): "o"}

# PEFT tuner layers keep the original layer as ``<name>.base_layer``; the adapter's own
# linears (``lora_A``...) live beside it and are never pruning targets.
ADAPTER_BASE_SUFFIX = ".base_layer"

ROLES = ("q", "k", "v", "qkv", "o", "gate", "up", "down", "fc1", "fc2")


@dataclass(frozen=True)
class ArchitectureSpec:
    """Where one model family keeps its decoder blocks."""

    blocks_path: str  # dotted path of the ModuleList holding the decoder blocks


ARCHITECTURES: dict[str, ArchitectureSpec] = {
    "llama": ArchitectureSpec("model.layers"),
    "mistral": ArchitectureSpec("model.layers"),
    "qwen2": ArchitectureSpec("model.layers"),
    "opt": ArchitectureSpec("model.decoder.layers"),
    "gpt2": ArchitectureSpec("transformer.h"),
    "gpt_neox": ArchitectureSpec("gpt_neox.layers"),
}


class UnsupportedArchitectureError(ValueError):
    """The model's decoder blocks cannot be found."""


def is_linear(module: nn.Module) -> bool:
    """True for layers whose weight we treat as a matrix: ``nn.Linear`` and GPT-2 ``Conv1D``."""
    return isinstance(module, nn.Linear | Conv1D)


def weight_matrix(module: nn.Module) -> torch.Tensor:
    """The weight as ``[out_features, in_features]`` (a view; ``Conv1D`` is transposed)."""
    if isinstance(module, Conv1D):
        return module.weight.t()
    if isinstance(module, nn.Linear):
        return module.weight
    raise TypeError(f"expected nn.Linear or Conv1D, got {type(module).__name__}")


def set_weight_matrix(module: nn.Module, matrix: torch.Tensor) -> None:
    """Write a ``[out_features, in_features]`` matrix into the layer, keeping dtype and device."""
    target = module.weight
    value = matrix.t() if isinstance(module, Conv1D) else matrix
    if value.shape != target.shape:
        raise ValueError(
            f"shape mismatch: layer weight is {tuple(weight_matrix(module).shape)} "
            f"(out, in), got {tuple(matrix.shape)}"
        )
    with torch.no_grad():
        target.copy_(value.to(dtype=target.dtype, device=target.device))


def in_features(module: nn.Module) -> int:
    return weight_matrix(module).shape[1]


def linear_role(name: str) -> str | None:
    """Role of a linear layer from its qualified name (``q``, ``down``, ``qkv``, ...), or None."""
    parts = name.removesuffix(ADAPTER_BASE_SUFFIX).split(".")
    leaf = parts[-1]
    parent = parts[-2] if len(parts) > 1 else ""
    return _PARENT_ROLES.get((parent, leaf)) or _LEAF_ROLES.get(leaf)


def model_type(model: nn.Module) -> str:
    config = getattr(model, "config", None)
    return getattr(config, "model_type", type(model).__name__)


def find_decoder_blocks(model: nn.Module, blocks: str | None = None) -> list[tuple[str, nn.Module]]:
    """The decoder blocks as ``(qualified name, module)`` in execution order.

    ``blocks`` overrides the lookup with the dotted path (or ``re:`` pattern) of the
    ``ModuleList`` that holds them: the generic path for architectures we do not know.
    """
    modules = dict(model.named_modules())
    if blocks is not None:
        path = _resolve_blocks_pattern(modules, blocks)
    else:
        spec = ARCHITECTURES.get(model_type(model))
        if spec is None:
            raise UnsupportedArchitectureError(
                f"unsupported architecture {model_type(model)!r}: known ones are "
                f"{sorted(ARCHITECTURES)}. For another decoder-only model, name the ModuleList "
                "of its decoder blocks with `blocks` (e.g. blocks='model.layers' or "
                "blocks='re:.*layers$')."
            )
        path = spec.blocks_path
        # PEFT and other wrappers add prefixes such as ``base_model.model.``.
        if path not in modules:
            matches = [n for n in modules if n.endswith("." + path)]
            if not matches:
                raise UnsupportedArchitectureError(
                    f"{model_type(model)} model has no module {path!r}; pass `blocks=` with the "
                    "dotted path of its decoder-block ModuleList"
                )
            path = matches[0]
    container = modules[path]
    if not isinstance(container, nn.ModuleList) or len(container) == 0:
        raise UnsupportedArchitectureError(
            f"{path!r} is a {type(container).__name__}, not a non-empty ModuleList of blocks"
        )
    return [(f"{path}.{i}", block) for i, block in enumerate(container)]


def _resolve_blocks_pattern(modules: dict[str, nn.Module], blocks: str) -> str:
    if blocks.startswith("re:"):
        regex = re.compile(blocks[3:])
        found = [n for n, m in modules.items() if isinstance(m, nn.ModuleList) and regex.search(n)]
    else:
        found = [blocks] if blocks in modules else []
    if not found:
        lists = [n for n, m in modules.items() if isinstance(m, nn.ModuleList)]
        raise UnsupportedArchitectureError(
            f"blocks={blocks!r} matches no ModuleList; the model has {lists or 'none'}"
        )
    return found[0]


def matches_pattern(name: str, module: nn.Module, pattern: str) -> bool:
    """Whether a module matches one target/ignore pattern.

    A pattern is ``re:<regex>`` (searched in the qualified name), a role (``q``, ``down``, ...;
    see ``ROLES``), a class name (``Linear``, ``Conv1D``), or a name suffix (``mlp.down_proj``,
    ``lm_head``) matched at a dot boundary.
    """
    name = name.removesuffix(ADAPTER_BASE_SUFFIX)
    if pattern.startswith("re:"):
        return re.search(pattern[3:], name) is not None
    if pattern in ROLES:
        return linear_role(name) == pattern
    if pattern == type(module).__name__:
        return True
    return name == pattern or name.endswith("." + pattern)


def select_linears(
    named_modules: Iterable[tuple[str, nn.Module]],
    targets: list[str] | None,
    ignore: list[str],
) -> dict[str, nn.Module]:
    """Linear layers among ``named_modules`` matching any target and no ignore pattern.

    ``targets=None`` means every linear layer. Inside PEFT-wrapped layers only the
    ``base_layer`` is a candidate; patterns see it under its wrapper's name and role.
    """
    named_modules = list(named_modules)
    wrapped = [n for n, m in named_modules if hasattr(m, "base_layer") and not is_linear(m)]
    chosen = {}
    for name, module in named_modules:
        if not is_linear(module):
            continue
        owner = next((w for w in wrapped if name.startswith(w + ".")), None)
        if owner is not None and name != owner + ADAPTER_BASE_SUFFIX:
            continue  # an adapter's own weights (lora_A, lora_B, ...)
        if targets is not None and not any(matches_pattern(name, module, t) for t in targets):
            continue
        if any(matches_pattern(name, module, p) for p in ignore):
            continue
        chosen[name] = module
    return chosen


def target_linears(
    model: nn.Module,
    targets: list[str] | None = None,
    ignore: Iterable[str] = ("lm_head",),
    blocks: str | None = None,
) -> dict[str, dict[str, nn.Module]]:
    """Target linears grouped by decoder block: ``{block_name: {linear_name: module}}``.

    Every explicit target pattern must match at least one linear layer, otherwise the
    call fails with the roles and a few names that do exist.
    """
    ignore = list(ignore)
    grouped = {}
    for block_name, block in find_decoder_blocks(model, blocks):
        named = ((f"{block_name}.{n}", m) for n, m in block.named_modules() if n)
        grouped[block_name] = select_linears(named, targets, ignore)
    if targets is not None:
        all_linears = [(n, m) for g in grouped.values() for n, m in g.items()]
        every = [
            (f"{b}.{n}", m)
            for b, block in find_decoder_blocks(model, blocks)
            for n, m in block.named_modules()
            if n and is_linear(m)
        ]
        for pattern in targets:
            if not any(matches_pattern(n, m, pattern) for n, m in every):
                roles = sorted({r for n, _ in every if (r := linear_role(n))})
                raise ValueError(
                    f"target pattern {pattern!r} matches no linear layer in the decoder blocks; "
                    f"roles here: {roles}; example names: {[n for n, _ in every[:4]]}"
                )
        if not all_linears:
            raise ValueError(f"targets {targets} with ignore {ignore} leave no layer to prune")
    return grouped


def _head_size(config) -> int | None:
    heads = getattr(config, "num_attention_heads", None) or getattr(config, "n_head", None)
    hidden = getattr(config, "hidden_size", None) or getattr(config, "n_embd", None)
    head_dim = getattr(config, "head_dim", None)
    if head_dim:
        return int(head_dim)
    return hidden // heads if heads and hidden else None


def parameter_layouts(model: nn.Module) -> dict[str, TensorLayout]:
    """Ranking layout of every parameter: its output-row axis and, for attention projections,
    the axis and width of one head (``hf_sparse.masks.top_k`` scopes ``row`` and ``head``).

    q/k/v rows are grouped by head; the output projection's columns are; GPT-2's fused
    ``c_attn`` holds q, k and v side by side (head groups along its output axis) and GPT-NeoX's
    ``query_key_value`` interleaves q, k, v per head (groups of three head widths).
    """
    head = _head_size(getattr(model, "config", None))
    layouts = {}
    modules = dict(model.named_modules())
    for name, param in model.named_parameters():
        owner_name, _, leaf = name.rpartition(".")
        owner = modules.get(owner_name)
        if param.ndim < 2:
            layouts[name] = TensorLayout(row_axis=None)
            continue
        conv1d = isinstance(owner, Conv1D)
        row_axis = 1 if conv1d else 0
        role = linear_role(owner_name) if owner is not None and is_linear(owner) else None
        if leaf != "weight" or role not in ("q", "k", "v", "qkv", "o") or head is None:
            layouts[name] = TensorLayout(row_axis=row_axis)
            continue
        out_axis, in_axis = (1, 0) if conv1d else (0, 1)
        size = 3 * head if role == "qkv" and model_type(model) == "gpt_neox" else head
        axis = in_axis if role == "o" else out_axis
        if param.shape[axis] % size:
            layouts[name] = TensorLayout(row_axis=row_axis)
            continue
        layouts[name] = TensorLayout(row_axis=row_axis, head_size=size, head_axis=axis)
    return layouts
