"""Where the decoder blocks of a model are.

Found from the model itself: transformers models name their decoder-layer class in
``_no_split_modules`` (what accelerate uses to place layers), and the ``ModuleList`` holding
instances of it is the block list, under any wrapper (``base_model.model.`` of PEFT).
``ARCHITECTURES`` only holds per-family overrides; ``blocks=`` overrides everything.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

from torch import nn


class UnsupportedArchitectureError(ValueError):
    """The model's decoder blocks or layers cannot be understood; the message says what to pass."""


def _falcon_qkv_rows(config, head: int) -> int:
    if getattr(config, "new_decoder_architecture", False):
        return (config.num_attention_heads // config.num_kv_heads + 2) * head
    return head if getattr(config, "multi_query", False) else 3 * head


@dataclass(frozen=True)
class ArchitectureSpec:
    """Per-family overrides of what is found from the model itself."""

    blocks_path: str | None = None  # dotted path of the decoder-block ModuleList
    # Rows of the fused qkv matrix that belong to one head (or one KV group), from the config
    # and the head size; None = q, k and v side by side (one head = ``head`` rows).
    qkv_head_rows: Callable[[object, int], int] | None = None


ARCHITECTURES: dict[str, ArchitectureSpec] = {
    # q, k and v interleaved per head: [heads, 3, head_dim] rows.
    "gpt_neox": ArchitectureSpec(qkv_head_rows=lambda _config, head: 3 * head),
    "bloom": ArchitectureSpec(qkv_head_rows=lambda _config, head: 3 * head),
    "falcon": ArchitectureSpec(qkv_head_rows=_falcon_qkv_rows),
}


def register_architecture(model_type: str, spec: ArchitectureSpec) -> None:
    """Add or replace the overrides of ``model_type`` (e.g. a remote-code family)."""
    ARCHITECTURES[model_type] = spec


def model_type(model: nn.Module) -> str:
    config = getattr(model, "config", None)
    return getattr(config, "model_type", type(model).__name__)


def find_decoder_blocks(model: nn.Module, blocks: str | None = None) -> list[tuple[str, nn.Module]]:
    """The decoder blocks as ``(qualified name, module)`` in execution order.

    ``blocks`` overrides the lookup with the dotted path (or ``re:`` pattern) of the
    ``ModuleList`` that holds them. Otherwise a family override in ``ARCHITECTURES`` is used,
    and otherwise the ``ModuleList`` of the model's ``_no_split_modules`` layers.
    """
    modules = dict(model.named_modules())
    if blocks is not None:
        path = _resolve_blocks_pattern(modules, blocks)
    else:
        spec = ARCHITECTURES.get(model_type(model))
        if spec is not None and spec.blocks_path is not None:
            path = _resolve_override(modules, model, spec.blocks_path)
        else:
            path = _discover_blocks(model, modules)
    container = modules[path]
    if not isinstance(container, nn.ModuleList) or len(container) == 0:
        raise UnsupportedArchitectureError(
            f"{path!r} is a {type(container).__name__}, not a non-empty ModuleList of blocks"
        )
    return [(f"{path}.{i}", block) for i, block in enumerate(container)]


def _module_lists(modules: dict[str, nn.Module]) -> list[str]:
    return [n for n, m in modules.items() if isinstance(m, nn.ModuleList)]


def _resolve_override(modules: dict[str, nn.Module], model: nn.Module, path: str) -> str:
    if path in modules:
        return path
    # PEFT and other wrappers add prefixes such as ``base_model.model.``.
    matches = [n for n in modules if n.endswith("." + path)]
    if not matches:
        raise UnsupportedArchitectureError(
            f"{model_type(model)} model has no module {path!r} (ARCHITECTURES override); pass "
            f"`blocks=` with the dotted path of its decoder-block ModuleList, one of "
            f"{_module_lists(modules) or 'none'}"
        )
    return matches[0]


def _no_split_classes(model: nn.Module) -> set[str]:
    """Class names listed in ``_no_split_modules`` by the model and the models it wraps."""
    names: set[str] = set()
    for module in model.modules():
        value = getattr(module, "_no_split_modules", None)
        if value:
            names.update(value)
    return names


def _is_block_class(module: nn.Module, classes: set[str]) -> bool:
    return any(cls.__name__ in classes for cls in type(module).__mro__)


def _discover_blocks(model: nn.Module, modules: dict[str, nn.Module]) -> str:
    classes = _no_split_classes(model)
    lists = _module_lists(modules)
    hint = (
        f"pass blocks='<dotted path>' (or 're:<regex>'; on the command line --blocks) naming "
        f"the ModuleList of its decoder blocks; ModuleLists in this model: {lists or 'none'}"
    )
    if not classes:
        raise UnsupportedArchitectureError(
            f"cannot find the decoder blocks of this {model_type(model)!r} model: it lists no "
            f"decoder-layer class in `_no_split_modules` (what accelerate uses to place layers); "
            + hint
        )
    found = [
        name
        for name in lists
        if len(modules[name]) and all(_is_block_class(m, classes) for m in modules[name])
    ]
    if len(found) > 1:
        # Multimodal models also list vision layers: keep the lists of the text decoder.
        decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
        prefix = next((n for n, m in modules.items() if m is decoder), None)
        if prefix:
            found = [n for n in found if n.startswith(prefix + ".")] or found
    if len(found) != 1:
        why = "no ModuleList holds" if not found else f"several ModuleLists ({found}) hold"
        raise UnsupportedArchitectureError(
            f"cannot find the decoder blocks of this {model_type(model)!r} model: {why} its "
            f"`_no_split_modules` layers {sorted(classes)}; " + hint
        )
    return found[0]


def _resolve_blocks_pattern(modules: dict[str, nn.Module], blocks: str) -> str:
    if blocks.startswith("re:"):
        regex = re.compile(blocks[3:])
        found = [n for n, m in modules.items() if isinstance(m, nn.ModuleList) and regex.search(n)]
    elif blocks in modules:
        found = [blocks]
    else:  # the same path under a wrapper (PEFT's ``base_model.model.``)
        found = [
            n
            for n, m in modules.items()
            if isinstance(m, nn.ModuleList) and n.endswith("." + blocks)
        ]
        if len(found) > 1:
            raise UnsupportedArchitectureError(
                f"blocks={blocks!r} ends several ModuleList paths {found}; give the whole path"
            )
    if not found:
        raise UnsupportedArchitectureError(
            f"blocks={blocks!r} matches no ModuleList; the model has "
            f"{_module_lists(modules) or 'none'}"
        )
    return found[0]
