"""Which parameters a metric scores: patterns over parameter and module names."""

from __future__ import annotations

import difflib
import re

from torch import nn

from ..models import (
    ROLES,
    ExpertLinear,
    block_linears,
    experts_layout,
    find_decoder_blocks,
    is_linear,
    linear_role,
    matches_pattern,
)


def default_parameters(model: nn.Module, blocks: str | None = None) -> list[str]:
    """Weights of every linear layer inside the decoder blocks (what every metric can score):
    stacked MoE expert weights included (``...experts.down_proj``), routers never. ``blocks``:
    the dotted path (or ``re:`` pattern) of the decoder-block ModuleList, None = found."""
    names: dict[str, None] = {}
    for block_name, block in find_decoder_blocks(model, blocks):
        for name, module in block_linears(block_name, block):
            if isinstance(module, ExpertLinear):
                names[name.rpartition(".")[0]] = None  # the stacked parameter, once
            elif is_linear(module) and ".lora_" not in name:
                names[f"{name}.weight"] = None
    return list(names)


def _matches(name: str, owner_name: str, owner: nn.Module | None, pattern: str) -> bool:
    if pattern.startswith("re:"):
        return re.search(pattern[3:], name) is not None
    if name == pattern or name.endswith("." + pattern):
        return True
    if owner is not None and name.rpartition(".")[2] in (experts_layout(owner) or ()):
        return matches_pattern(name, owner, pattern)  # stacked experts: role of the projection
    if owner is None or not name.endswith(".weight"):
        return False
    return is_linear(owner) and matches_pattern(owner_name, owner, pattern)


def select_parameters(
    model: nn.Module, params: list[str] | str | None, blocks: str | None = None
) -> dict[str, nn.Parameter]:
    """``{name: parameter}`` chosen by ``params``.

    ``None``: the weights of all decoder-block linears. Otherwise each pattern is a parameter
    name (or its suffix, e.g. ``embed_tokens.weight``), ``re:<regex>`` on parameter names, or a
    linear-layer pattern (role ``q``/``down``/..., class name, module-name suffix) selecting
    that layer's weight. A pattern that matches nothing is an error. ``blocks``: where the
    decoder blocks are (dotted path or ``re:``), checked even when ``params`` is given.
    """
    named = dict(model.named_parameters())
    if params is None:
        return {n: named[n] for n in default_parameters(model, blocks)}
    if blocks is not None:
        find_decoder_blocks(model, blocks)  # a wrong path fails here, before any work
    if isinstance(params, str):
        params = [params]
    modules = dict(model.named_modules())
    chosen: dict[str, nn.Parameter] = {}
    for pattern in params:
        hits = []
        for name in named:
            owner_name = name.rpartition(".")[0]
            if _matches(name, owner_name, modules.get(owner_name), pattern):
                hits.append(name)
        if not hits:
            roles = sorted({r for n in modules if (r := linear_role(n))})
            words = sorted({part for n in named for part in n.split(".")} | set(roles))
            close = difflib.get_close_matches(pattern.removeprefix("re:"), words, n=3, cutoff=0.6)
            hint = f"did you mean {' or '.join(repr(c) for c in close)}? " if close else ""
            raise ValueError(
                f"parameter pattern {pattern!r} matches no parameter of this model; {hint}use a "
                f"parameter name, 're:<regex>', or a role of {roles or list(ROLES)}; "
                f"names look like {list(named)[:3]}"
            )
        chosen.update({n: named[n] for n in hits})
    return chosen
