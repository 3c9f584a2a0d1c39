"""Where the calibration engine computes: an execution device, and one block at a time on it.

The model may sit on the CPU, on one device, or be dispatched by accelerate (``device_map``,
including ``"disk"`` and CPU offload with ``offload_folder``). The engine moves each decoder block
in turn to the execution device for its calibration passes and its solve, then puts it back
where it was: a plain block moves back to its own device; an accelerate-offloaded block has
its new weights written to its offload store (the CPU copy, or a fresh ``.dat`` file in the
offload folder; the checkpoint the model was loaded from is never written) and goes back to
``meta``. Peak memory is then one block plus the block inputs (on the device, or on the CPU
with ``offload_inputs``).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

logger = logging.getLogger(__name__)


def default_device() -> torch.device:
    """CUDA (the current device) when present, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def resolve_device(device: str | torch.device | None) -> torch.device:
    """The execution device: ``None`` = ``default_device()``; a name is checked to exist."""
    if device is None:
        return default_device()
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError) as error:
        raise ValueError(
            f"device {device!r} is not a torch device ('cpu', 'cuda', 'cuda:1')"
        ) from (error)
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} was asked for but CUDA is not available; use 'cpu'")
    if resolved.type == "cuda" and (resolved.index or 0) >= torch.cuda.device_count():
        raise ValueError(
            f"device {device!r}: only {torch.cuda.device_count()} CUDA device(s) are visible"
        )
    if resolved.type == "meta":
        raise ValueError("device 'meta' holds no data; use 'cpu' or 'cuda'")
    if resolved.type == "cuda" and resolved.index is None:  # compare equal to cuda:N tensors
        return torch.device("cuda", torch.cuda.current_device())
    return resolved


def to_device(value: Any, device: torch.device) -> Any:
    """``value`` with every tensor inside tuples, lists and dicts moved to ``device``."""
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, tuple):
        return tuple(to_device(v, device) for v in value)
    if isinstance(value, list):
        return [to_device(v, device) for v in value]
    if isinstance(value, dict):
        return {k: to_device(v, device) for k, v in value.items()}
    return value


def input_device(model: nn.Module) -> torch.device:
    """Where token ids go in: the input embedding's device, or the CPU when accelerate
    dispatches the model (its hooks move inputs) or the embedding is offloaded."""
    if _offload_hooks(model) or _has_hook(model):
        return torch.device("cpu")
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    weight = getattr(embeddings, "weight", None)
    if weight is not None and weight.device.type != "meta":
        return weight.device
    parameter = next((p for p in model.parameters() if p.device.type != "meta"), None)
    return parameter.device if parameter is not None else torch.device("cpu")


def _align_hooks(module: nn.Module) -> list:
    """accelerate ``AlignDevicesHook`` objects attached to ``module`` (also inside a
    ``SequentialHook``)."""
    hook = getattr(module, "_hf_hook", None)
    if hook is None:
        return []
    from accelerate.hooks import AlignDevicesHook

    inner = getattr(hook, "hooks", [hook])
    return [h for h in inner if isinstance(h, AlignDevicesHook)]


def _has_hook(model: nn.Module) -> bool:
    return any(_align_hooks(m) for m in model.modules())


def _offload_hooks(module: nn.Module) -> list[tuple[nn.Module, Any]]:
    return [(m, h) for m in module.modules() for h in _align_hooks(m) if h.offload]


def _own_tensors(module: nn.Module, hook) -> list[tuple[str, torch.Tensor]]:
    from accelerate.utils import named_module_tensors

    return list(
        named_module_tensors(
            module,
            include_buffers=hook.offload_buffers,
            recurse=hook.place_submodules,
            remove_non_persistent=True,
        )
    )


def _write_back(hook, tensors: list[tuple[str, torch.Tensor]]) -> None:
    """Store the module's current tensors where the hook reloads them from."""
    from accelerate.utils import offload_weight
    from accelerate.utils.offload import OffloadedWeightsLoader, PrefixedDataset

    store, prefix = hook.weights_map, ""
    if isinstance(store, PrefixedDataset):
        store, prefix = store.dataset, store.prefix
    for name, tensor in tensors:
        value, key = tensor.detach().to("cpu"), prefix + name
        if isinstance(store, OffloadedWeightsLoader):
            if key in store.state_dict or store.save_folder is None:
                store.state_dict[key] = value
            else:  # a new file in the offload folder; a safetensors checkpoint stays untouched
                offload_weight(value, key, store.save_folder, index=store.index)
        elif isinstance(store, dict):
            store[key] = value
        else:
            raise TypeError(
                f"cannot write the new {key} back into an offload store of type "
                f"{type(store).__name__}; load the model without offloading this block"
            )


@contextlib.contextmanager
def onloaded(block: nn.Module, device: torch.device) -> Iterator[nn.Module]:
    """``block`` with its weights materialised on ``device`` while the context is open; its
    (possibly changed) weights are put back where they came from on exit."""
    offloaded = _offload_hooks(block)
    hooked = [(m, h) for m in block.modules() for h in _align_hooks(m)]
    saved = [(h, h.execution_device, h.offload) for _, h in hooked]
    placed: dict[str, torch.device] = {}
    try:
        for module, hook in offloaded:
            hook.execution_device = device
            hook._onload_weights(module)  # materialise once; not again at every forward
            hook.offload = False
        for _, hook in hooked:
            hook.execution_device = device
        for name, tensor in [*block.named_parameters(), *block.named_buffers()]:
            if tensor.device != device and tensor.device.type != "meta":
                placed[name] = tensor.device
        if placed:
            _move(block, placed, device)
        yield block
    finally:
        if placed:
            _move(block, {name: placed[name] for name in placed}, None)
        for module, hook in offloaded:
            _write_back(hook, _own_tensors(module, hook))
            hook._offload_weights(module)
        for hook, execution_device, offload in saved:
            hook.execution_device, hook.offload = execution_device, offload


def _move(block: nn.Module, names: dict[str, torch.device], device: torch.device | None) -> None:
    """Move the named tensors of ``block`` to ``device`` (``None``: back to ``names[name]``),
    keeping ``Parameter`` objects (optimisers and hooks hold them)."""
    tensors = dict(block.named_parameters())
    tensors.update(dict(block.named_buffers()))
    with torch.no_grad():
        for name, home in names.items():
            tensor = tensors[name]
            tensor.data = tensor.data.to(device if device is not None else home)


def stored_tensor(module: nn.Module, name: str = "weight") -> torch.Tensor:
    """``module.<name>``, read from its accelerate offload store when it is on ``meta``."""
    tensor = getattr(module, name)
    if tensor.device.type != "meta":
        return tensor
    for hook in _align_hooks(module):
        if hook.offload and hook.weights_map is not None:
            return hook.weights_map[name]
    raise ValueError(
        f"{type(module).__name__}.{name} is on 'meta' and no accelerate offload hook holds its "
        "values: load the model with its weights (or a device_map with an offload_folder)"
    )
