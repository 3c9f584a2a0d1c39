"""Gradient accumulation at the positions of a mask only.

With a golden mask and the entries outside it frozen, only the masked entries of each
gradient matter. ``SparseGradientAccumulator`` keeps, per masked parameter, the mask's
positions (int32) and one float32 running sum per position: the storage of the mask itself
(8 bytes per kept entry), instead of a dense ``.grad`` per parameter alive across micro-steps.
Attached to a model (``attach``), a post-accumulate-grad hook folds each parameter's fresh
gradient into the sums as soon as backward produces it and frees the dense gradient; on the
last micro-step (``write_when()`` true) the dense gradient is rebuilt from the sums for the
optimizer, zero outside the mask.

Lifecycle (plain loop)::

    accumulator = SparseGradientAccumulator(model, masks)
    for micro_batch in micro_batches:
        model(**micro_batch).loss.backward()
        accumulator.accumulate_()     # folds .grad into the sums, frees .grad
    accumulator.write_grads_()        # dense .grad = the sums at the mask, 0 elsewhere
    optimizer.step()

In a ``Trainer``: ``SparseGradientAccumulationCallback`` (``hf_sparse.callbacks``) attaches it
with accelerate's ``sync_gradients`` flag as ``write_when``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
from torch import nn

from ..masks import ParameterMasks


class SparseGradientAccumulator:
    """Running sums of ``model``'s gradients at the True entries of ``masks`` (by name)."""

    def __init__(self, model: nn.Module, masks: Mapping[str, torch.Tensor]) -> None:
        ParameterMasks(dict(masks)).check_against(model)
        params = dict(model.named_parameters())
        self.params: dict[str, nn.Parameter] = {}
        self.positions: dict[str, torch.Tensor] = {}
        self.sums: dict[str, torch.Tensor] = {}
        for name, mask in masks.items():
            param = params[name]
            if param.numel() >= 2**31:
                raise ValueError(f"{name} has {param.numel()} entries: int32 positions overflow")
            flat = mask.reshape(-1).to(device=param.device, dtype=torch.bool)
            self.params[name] = param
            self.positions[name] = flat.nonzero().squeeze(1).to(torch.int32)
            self.sums[name] = torch.zeros(
                self.positions[name].numel(), dtype=torch.float32, device=param.device
            )
        self._handles: list = []
        self.micro_steps = 0

    def _fold(self, name: str) -> None:
        param = self.params[name]
        if param.grad is None:
            return
        picked = torch.index_select(param.grad.reshape(-1), 0, self.positions[name])
        self.sums[name] += picked.float()
        param.grad = None

    def accumulate_(self) -> None:
        """Fold the current ``.grad`` of every masked parameter into the sums; free it."""
        for name in self.params:
            self._fold(name)
        self.micro_steps += 1

    def _write(self, name: str, scale: float) -> None:
        param = self.params[name]
        dense = torch.zeros_like(param)
        values = self.sums[name] * scale if scale != 1.0 else self.sums[name]
        dense.reshape(-1).index_put_((self.positions[name],), values.to(param.dtype))
        param.grad = dense
        self.sums[name].zero_()

    def write_grads_(self, scale: float = 1.0) -> None:
        """Give each masked parameter the dense gradient ``scale * sums`` (0 outside the mask)
        and reset the sums (call before ``optimizer.step()``)."""
        for name in self.params:
            self._fold(name)  # a gradient not yet folded (no accumulate_ after the last backward)
            self._write(name, scale)
        self.micro_steps = 0

    def attach(self, write_when: Callable[[], bool]) -> None:
        """Fold every parameter's gradient as soon as backward has accumulated it; when
        ``write_when()`` is true (the last micro-step), write the dense gradient instead."""
        self.detach()
        for name, param in self.params.items():

            def hook(_param: torch.Tensor, name: str = name) -> None:
                self._fold(name)
                if write_when():
                    self._write(name, 1.0)

            self._handles.append(param.register_post_accumulate_grad_hook(hook))

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def storage_bytes(self) -> int:
        """Bytes held across micro-steps: positions and sums."""
        return sum(
            p.numel() * p.element_size() + s.numel() * s.element_size()
            for p, s in zip(self.positions.values(), self.sums.values(), strict=True)
        )

    def dense_bytes(self) -> int:
        """Bytes of the dense gradients the same parameters would keep across micro-steps."""
        return sum(p.numel() * p.element_size() for p in self.params.values())
