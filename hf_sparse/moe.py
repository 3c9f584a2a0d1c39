"""Mixture-of-experts layouts: one ``[out, in]`` linear per expert, and routers.

transformers 5 stores the experts of Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE, GraniteMoE, ... as
3-D parameters of one ``...Experts`` module (``gate_up_proj`` ``[E, 2I, H]`` and ``down_proj``
``[E, H, I]``), not as ``nn.Linear`` modules. The ``use_experts_implementation`` decorator that
every such class carries records the layout in attributes (``has_gate``, ``has_bias``,
``is_transposed``) and provides ``_apply_gate``; this module reads those attributes, so every
family built on that interface is handled by the same code.

``ExpertLinear`` is a view of one expert's projection as an ``[out, in]`` matrix. It is not part
of the module tree (the experts module stays as transformers built it, so ``save_pretrained``
and ``from_pretrained`` see the usual tensors); its forward hooks receive the rows that the
router sent to that expert: ``hidden[tokens routed to e]`` for the first projection and
``gate(x @ W_gate_up[e]^T)`` for ``down_proj``. An expert that no token reaches gets no call.

Routers (``mlp.gate`` in Mixtral/Qwen-MoE, ``block_sparse_moe.router`` in GraniteMoE, Qwen2-MoE's
``shared_expert_gate``) decide where tokens go; they are never pruning targets.
"""

from __future__ import annotations

import inspect
import weakref
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

# Path components and class-name fragments that mark a router (kept dense by every method).
ROUTER_PARTS = frozenset({"gate", "router", "shared_expert_gate", "wg", "gating"})
ROUTER_CLASS_FRAGMENTS = ("Router", "Gating")
# Attributes ``transformers.integrations.moe.use_experts_implementation`` sets on experts.
_LAYOUT_ATTRS = ("has_gate", "has_bias", "is_transposed")


def is_router(name: str, module: nn.Module | None = None) -> bool:
    """Whether the module named ``name`` is (inside) an MoE router."""
    if any(part in ROUTER_PARTS for part in name.split(".")):
        return True
    cls = type(module).__name__ if module is not None else ""
    return any(fragment in cls for fragment in ROUTER_CLASS_FRAGMENTS)


def experts_layout(module: nn.Module) -> tuple[str, str] | None:
    """``(first, down)`` names of the stacked projections of a transformers experts module, in
    execution order (``("gate_up_proj", "down_proj")``, or ``("up_proj", "down_proj")`` without
    a gate), or None when ``module`` is not one."""
    if not all(hasattr(module, attr) for attr in _LAYOUT_ATTRS):
        return None
    names = ("gate_up_proj" if module.has_gate else "up_proj", "down_proj")
    for name in names:
        param = getattr(module, name, None)
        if not isinstance(param, nn.Parameter) or param.ndim != 3:
            return None
    return names


def stacked_parameters(module: nn.Module) -> list[str]:
    """Names of the module's own parameters with 3 or more dimensions (stacked weights)."""
    return [name for name, p in module.named_parameters(recurse=False) if p.ndim >= 3]


class ExpertLinear(nn.Module):
    """Expert ``index`` of the stacked projection ``param`` of ``experts``, as a linear layer.

    ``weight`` is a view of the stacked parameter in ``[out, in]`` layout (writing into it
    changes the model). ``register_forward_hook(hook)`` calls ``hook(self, (x,), None)`` with
    the rows routed to this expert, once per forward of the experts module that routes any.
    """

    def __init__(self, experts: nn.Module, param: str, index: int) -> None:
        super().__init__()
        if experts_layout(experts) is None or param not in experts_layout(experts):
            raise ValueError(f"{type(experts).__name__}.{param} is not a stacked expert projection")
        if not 0 <= index < getattr(experts, param).shape[0]:
            raise ValueError(f"expert index {index} outside 0..{getattr(experts, param).shape[0]}")
        self.__dict__["experts"] = experts  # a plain attribute: the view does not own them
        self.param = param
        self.index = index

    @property
    def weight(self) -> torch.Tensor:
        stacked = getattr(self.experts, self.param)[self.index]
        return stacked.t() if self.experts.is_transposed else stacked

    @property
    def bias(self) -> torch.Tensor | None:
        if not self.experts.has_bias:
            return None
        return getattr(self.experts, f"{self.param}_bias")[self.index]

    @property
    def in_features(self) -> int:
        return self.weight.shape[1]

    @property
    def out_features(self) -> int:
        return self.weight.shape[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)

    def register_forward_hook(self, hook: Callable, *args, **kwargs) -> _TapHandle:
        if args or kwargs:
            raise TypeError("ExpertLinear forward hooks take no options")
        return _tap(self.experts).add(self, hook)

    def extra_repr(self) -> str:
        where = f"{type(self.experts).__name__}.{self.param}[{self.index}]"
        return f"{where}, out={self.out_features}, in={self.in_features}"


def expert_linears(name: str, experts: nn.Module) -> dict[str, ExpertLinear]:
    """``{"<name>.<param>.<e>": view}`` for every expert and stacked projection of ``experts``."""
    layout = experts_layout(experts)
    if layout is None:
        raise ValueError(f"{name} ({type(experts).__name__}) is not a stacked experts module")
    count = getattr(experts, layout[0]).shape[0]
    return {
        f"{name}.{param}.{index}": ExpertLinear(experts, param, index)
        for param in layout
        for index in range(count)
    }


class _TapHandle:
    def __init__(self, tap: _RoutedInputs, key: tuple[str, int], entry: tuple) -> None:
        self.tap, self.key, self.entry = tap, key, entry

    def remove(self) -> None:
        self.tap.remove(self.key, self.entry)


class _RoutedInputs:
    """One forward hook on an experts module that hands each expert view the rows it reads."""

    def __init__(self, experts: nn.Module) -> None:
        self.experts = weakref.ref(experts)
        self.hooks: dict[tuple[str, int], list[tuple[ExpertLinear, Callable]]] = {}
        self.handle = experts.register_forward_hook(self._on_forward, with_kwargs=True)
        parameters = list(inspect.signature(experts.forward).parameters)
        self.arg_names = parameters[:2]  # (hidden_states, top-k expert indices)

    def add(self, view: ExpertLinear, hook: Callable) -> _TapHandle:
        entry = (view, hook)
        self.hooks.setdefault((view.param, view.index), []).append(entry)
        return _TapHandle(self, (view.param, view.index), entry)

    def remove(self, key: tuple[str, int], entry: tuple) -> None:
        entries = self.hooks.get(key, [])
        if entry in entries:
            entries.remove(entry)
        if not entries:
            self.hooks.pop(key, None)
        if not self.hooks:
            self.handle.remove()
            experts = self.experts()
            if experts is not None:
                _TAPS.pop(experts, None)

    def _inputs(self, args: tuple, kwargs: dict) -> tuple[torch.Tensor, torch.Tensor]:
        values = list(args[:2])
        for name in self.arg_names[len(values) :]:
            if name not in kwargs:
                raise TypeError(f"experts forward called without {name!r}; cannot route inputs")
            values.append(kwargs[name])
        return values[0], values[1]

    @torch.no_grad()
    def _on_forward(self, module: nn.Module, args: tuple, kwargs: dict, _output) -> None:
        hidden, routes = self._inputs(args, kwargs)
        hidden = hidden.reshape(-1, hidden.shape[-1])
        routes = routes.reshape(hidden.shape[0], -1)
        first, down = experts_layout(module)
        for index in sorted({i for _, i in self.hooks}):
            tokens = (routes == index).any(dim=-1).nonzero().squeeze(-1)
            if tokens.numel() == 0:
                continue
            rows = hidden[tokens]
            self._fire(first, index, rows)
            if (down, index) in self.hooks:
                projected = ExpertLinear(module, first, index)(rows)
                inner = (
                    module._apply_gate(projected) if module.has_gate else module.act_fn(projected)
                )
                self._fire(down, index, inner)

    def _fire(self, param: str, index: int, rows: torch.Tensor) -> None:
        for view, hook in list(self.hooks.get((param, index), [])):
            hook(view, (rows,), None)


_TAPS: weakref.WeakKeyDictionary[nn.Module, _RoutedInputs] = weakref.WeakKeyDictionary()


def _tap(experts: nn.Module) -> _RoutedInputs:
    tap = _TAPS.get(experts)
    if tap is None:
        tap = _TAPS[experts] = _RoutedInputs(experts)
    return tap
