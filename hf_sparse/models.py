"""Architecture knowledge: where the decoder blocks are and what each linear layer does.

This is the only module that knows how model families lay out their modules. Method code asks
it for "the decoder blocks" and "the target linears of this block" and works on weight matrices
in ``[out_features, in_features]`` layout, whatever the layer type: GPT-2's ``Conv1D`` stores
the transpose, and the stacked 3-D experts of MoE models are seen one expert at a time
(``hf_sparse.moe.ExpertLinear``).

The decoder blocks are found in ``hf_sparse.blocks`` and the roles of linears in
``hf_sparse.roles``; both are re-exported here, the one import for method code.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from .blocks import (
    ARCHITECTURES,
    ArchitectureSpec,
    UnsupportedArchitectureError,
    find_decoder_blocks,
    model_type,
    register_architecture,
)
from .masks.ranking import TensorLayout
from .moe import ExpertLinear, expert_linears, experts_layout, is_router, stacked_parameters
from .roles import ADAPTER_BASE_SUFFIX, ATTENTION_ROLES, ROLES, linear_role

__all__ = [
    "ADAPTER_BASE_SUFFIX",
    "ARCHITECTURES",
    "ATTENTION_ROLES",
    "ROLES",
    "ArchitectureSpec",
    "ExpertLinear",
    "block_linears",
    "expert_linears",
    "experts_layout",
    "UnsupportedArchitectureError",
    "find_decoder_blocks",
    "find_linear",
    "in_features",
    "is_linear",
    "iter_linears",
    "linear_role",
    "matches_pattern",
    "model_type",
    "near_names",
    "parameter_layouts",
    "register_architecture",
    "reject_expert_views",
    "select_linears",
    "set_weight_matrix",
    "target_linears",
    "weight_matrix",
]


def is_linear(module: nn.Module) -> bool:
    """True for layers whose weight we treat as a matrix: ``nn.Linear``, GPT-2 ``Conv1D`` and
    one expert of stacked MoE experts (``ExpertLinear``)."""
    return isinstance(module, nn.Linear | Conv1D | ExpertLinear)


def weight_matrix(module: nn.Module) -> torch.Tensor:
    """The weight as ``[out_features, in_features]`` (a view; ``Conv1D`` is transposed)."""
    if isinstance(module, Conv1D):
        return module.weight.t()
    if isinstance(module, nn.Linear | ExpertLinear):
        return module.weight
    raise TypeError(f"expected nn.Linear, Conv1D or ExpertLinear, got {type(module).__name__}")


def set_weight_matrix(module: nn.Module, matrix: torch.Tensor) -> None:
    """Write a ``[out_features, in_features]`` matrix into the layer, keeping dtype and device."""
    target = weight_matrix(module)
    if matrix.shape != target.shape:
        raise ValueError(
            f"shape mismatch: layer weight is {tuple(target.shape)} (out, in), "
            f"got {tuple(matrix.shape)}"
        )
    with torch.no_grad():
        target.copy_(matrix.to(dtype=target.dtype, device=target.device))


def in_features(module: nn.Module) -> int:
    return weight_matrix(module).shape[1]


def matches_pattern(name: str, module: nn.Module, pattern: str) -> bool:
    """Whether a module matches one target/ignore pattern.

    A pattern is ``re:<regex>`` (searched in the qualified name), a role (``q``, ``down``, ...;
    see ``ROLES``), a class name (``Linear``, ``Conv1D``, ``ExpertLinear``), or a name suffix
    (``mlp.down_proj``, ``lm_head``) matched at a dot boundary.
    """
    name = name.removesuffix(ADAPTER_BASE_SUFFIX)
    if pattern.startswith("re:"):
        return re.search(pattern[3:], name) is not None
    if pattern in ROLES:
        return linear_role(name) == pattern
    if pattern == type(module).__name__:
        return True
    return name == pattern or name.endswith("." + pattern)


def block_linears(block_name: str, block: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """Every candidate linear of one decoder block, routers excluded: its modules (PEFT
    wrappers included, filtered by ``select_linears``) and a view per expert of stacked MoE
    experts. Stacked weights of any other layout raise, unless ``ignore`` covers them (checked
    in ``target_linears``)."""
    routers: list[str] = []
    for name, module in block.named_modules():
        if not name:
            continue
        full = f"{block_name}.{name}"
        if any(full.startswith(r + ".") for r in routers):
            continue
        if is_router(name, module):
            routers.append(full)
            continue
        if experts_layout(module) is not None:
            yield from expert_linears(full, module).items()
            continue
        yield full, module


def select_linears(
    named_modules: Iterable[tuple[str, nn.Module]],
    targets: list[str] | None,
    ignore: list[str],
) -> dict[str, nn.Module]:
    """Linear layers among ``named_modules`` matching any target and no ignore pattern.

    ``targets=None`` means every linear layer. Inside PEFT-wrapped layers only the
    ``base_layer`` is a candidate; patterns see it under its wrapper's name and role.
    Routers are never selected.
    """
    named_modules = list(named_modules)
    wrapped = [n for n, m in named_modules if hasattr(m, "base_layer") and not is_linear(m)]
    chosen = {}
    for name, module in named_modules:
        if not is_linear(module) or is_router(name.removesuffix(ADAPTER_BASE_SUFFIX)):
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


def _check_stacked_weights(
    blocks: list[tuple[str, nn.Module]], targets: list[str] | None, ignore: list[str]
) -> None:
    """Targeted stacked (3-D+) weights that are neither experts we can split nor routers must
    be ignored explicitly: silently leaving them dense would misreport the sparsity."""
    for block_name, block in blocks:
        for name, module in block.named_modules():
            full = f"{block_name}.{name}" if name else block_name
            if experts_layout(module) is not None or is_router(name, module):
                continue
            for param in stacked_parameters(module):
                qualified = f"{full}.{param}"
                if any(matches_pattern(qualified, module, p) for p in ignore):
                    continue
                if targets is not None and not any(
                    matches_pattern(qualified, module, t) for t in targets
                ):
                    continue
                shape = tuple(getattr(module, param).shape)
                raise UnsupportedArchitectureError(
                    f"{qualified} is a stacked {shape} weight of {type(module).__name__} that "
                    "hf_sparse cannot split into [out, in] matrices (it is not a transformers "
                    "experts module with the use_experts_implementation layout); leave it dense "
                    f"with ignore=[..., 're:{re.escape(full)}'] (or targets= that do not match it)"
                )


def target_linears(
    model: nn.Module,
    targets: list[str] | None = None,
    ignore: Iterable[str] = ("lm_head",),
    blocks: str | None = None,
) -> dict[str, dict[str, nn.Module]]:
    """Target linears grouped by decoder block: ``{block_name: {linear_name: module}}``.

    Stacked MoE experts appear as one ``ExpertLinear`` per expert and projection
    (``...experts.down_proj.3``); routers never appear. Every explicit target pattern must
    match at least one linear layer, otherwise the call fails with the roles and a few names
    that do exist.
    """
    ignore = list(ignore)
    decoder_blocks = find_decoder_blocks(model, blocks)
    _check_stacked_weights(decoder_blocks, targets, ignore)
    candidates = {name: list(block_linears(name, block)) for name, block in decoder_blocks}
    grouped = {name: select_linears(named, targets, ignore) for name, named in candidates.items()}
    every = [(n, m) for named in candidates.values() for n, m in named if is_linear(m)]
    for pattern in targets or ():
        if not any(matches_pattern(n, m, pattern) for n, m in every):
            routers = _router_names(decoder_blocks, pattern)
            why = (
                f"matches only MoE routers ({routers[:2]}), which are never pruned"
                if routers
                else "matches no linear layer in the decoder blocks"
            )
            raise ValueError(f"target pattern {pattern!r} {why}; {near_names(pattern, every)}")
    _check_ignore_patterns(model, ignore)
    if not any(grouped.values()):
        raise ValueError(
            f"targets {targets if targets is not None else 'all'} with ignore {ignore} leave no "
            "layer to work on; drop some ignore patterns"
        )
    return grouped


DEFAULT_IGNORE = ("lm_head",)
"""Ignored by default and outside the decoder blocks: never an error when a model lacks it."""


def near_names(pattern: str, named: list[tuple[str, nn.Module]]) -> str:
    """What a pattern could have meant: the closest roles and module-name suffixes (difflib),
    the roles present and a few names, for an error message."""
    import difflib

    roles = sorted({r for n, _ in named if (r := linear_role(n))})
    suffixes = sorted({n.split(".")[-1] for n, _ in named} | {type(m).__name__ for _, m in named})
    bare = pattern.removeprefix("re:")
    close = difflib.get_close_matches(bare, roles + suffixes, n=3, cutoff=0.6)
    hint = f"did you mean {' or '.join(repr(c) for c in close)}? " if close else ""
    return f"{hint}roles here: {roles}; example names: {[n for n, _ in named[:4]]}"


def _check_ignore_patterns(model: nn.Module, ignore: list[str]) -> None:
    """Every ignore pattern must match some module of the model (a typo would silently prune
    what the user meant to keep); the default ``lm_head`` is exempt."""
    named = [(n, m) for n, m in iter_linears(model)]
    modules = [(n, m) for n, m in model.named_modules() if n]
    for pattern in ignore:
        if pattern in DEFAULT_IGNORE:
            continue
        if any(matches_pattern(n, m, pattern) for n, m in named + modules):
            continue
        raise ValueError(
            f"ignore pattern {pattern!r} matches no module of this model; "
            f"{near_names(pattern, named)}"
        )


def _router_names(blocks: list[tuple[str, nn.Module]], pattern: str) -> list[str]:
    return [
        f"{b}.{n}"
        for b, block in blocks
        for n, m in block.named_modules()
        if n and is_linear(m) and is_router(n, m) and matches_pattern(f"{b}.{n}", m, pattern)
    ]


def find_linear(model: nn.Module, name: str) -> nn.Module:
    """The linear layer (or expert view, ``...experts.down_proj.3``) called ``name``."""
    modules = dict(model.named_modules())
    module = modules.get(name)
    if module is not None and is_linear(module):
        return module
    owner, _, index = name.rpartition(".")
    experts_name, _, param = owner.rpartition(".")
    experts = modules.get(experts_name)
    if experts is not None and index.isdigit() and param in (experts_layout(experts) or ()):
        return ExpertLinear(experts, param, int(index))
    kind = "no module" if module is None else f"a {type(module).__name__}, not a linear layer,"
    raise KeyError(f"the model has {kind} named {name!r}")


def iter_linears(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """Every linear layer of the model with its name, stacked experts one view per expert."""
    for name, module in model.named_modules():
        if is_linear(module):
            yield name, module
        elif experts_layout(module) is not None:
            yield from expert_linears(name, module).items()


def reject_expert_views(grouped: dict[str, dict[str, nn.Module]], method: str) -> None:
    """For methods that work on whole ``nn.Linear`` weights: stacked experts raise, naming them
    and how to leave them out."""
    views = [
        n for linears in grouped.values() for n, m in linears.items() if isinstance(m, ExpertLinear)
    ]
    if views:
        raise UnsupportedArchitectureError(
            f"{method} does not handle stacked MoE expert weights yet ({len(views)} expert "
            f"matrices, e.g. {views[:2]}); leave them out with ignore=[..., 're:experts']"
        )


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

    q/k/v rows are grouped by head; the output projection's columns are. A fused qkv matrix
    (``c_attn``, ``qkv_proj``, ``W_pack``) holds q, k and v side by side, so one head is
    ``head_dim`` rows; GPT-NeoX and BLOOM interleave q, k, v per head and Falcon per KV group
    (``ArchitectureSpec.qkv_head_rows``). Stacked expert weights ``[E, out, in]`` have no single
    row axis: ``row`` and ``head`` rank them as whole tensors.
    """
    config = getattr(model, "config", None)
    head = _head_size(config)
    spec = ARCHITECTURES.get(model_type(model))
    qkv_rows = spec.qkv_head_rows(config, head) if spec and spec.qkv_head_rows and head else head
    layouts = {}
    modules = dict(model.named_modules())
    for name, param in model.named_parameters():
        owner_name, _, leaf = name.rpartition(".")
        owner = modules.get(owner_name)
        if param.ndim != 2:
            layouts[name] = TensorLayout(row_axis=None)
            continue
        conv1d = isinstance(owner, Conv1D)
        row_axis = 1 if conv1d else 0
        role = linear_role(owner_name) if owner is not None and is_linear(owner) else None
        if leaf != "weight" or role not in ATTENTION_ROLES or head is None:
            layouts[name] = TensorLayout(row_axis=row_axis)
            continue
        out_axis, in_axis = (1, 0) if conv1d else (0, 1)
        size = qkv_rows if role == "qkv" else head
        axis = in_axis if role == "o" else out_axis
        if param.shape[axis] % size:
            layouts[name] = TensorLayout(row_axis=row_axis)
            continue
        layouts[name] = TensorLayout(row_axis=row_axis, head_size=size, head_axis=axis)
    return layouts
