"""The adapted layer: base weight + a delta that lives on a boolean mask.

Storage follows SHiRA (Sparse High Rank Adapters, Bhardwaj et al., 2024): the trainable values
of the masked entries as a flat vector, in the row-major order of the mask, plus the mask
itself. ``delta = scatter(inside_scale * inside) + scatter(outside_scale * outside)``.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from peft.tuners._buffer_dict import BufferDict
from peft.tuners.tuners_utils import BaseTunerLayer, check_adapters_to_merge
from torch import nn
from transformers.pytorch_utils import Conv1D

from .config import MaskedLRConfig

RANDOM_INIT_STD = 0.01  # init_weights=False: visible in logits, small enough to stay stable


class MaskedLRLayer(BaseTunerLayer):
    """Adapter state of one layer, keyed by adapter name like every peft tuner layer."""

    adapter_layer_names = ("masked_lr_inside", "masked_lr_outside")
    other_param_names = ("masked_lr_mask", "masked_lr_scales", "masked_lr_pending")

    def __init__(self, base_layer: nn.Module, **kwargs) -> None:
        if not isinstance(base_layer, nn.Linear | Conv1D):
            raise TypeError(
                f"masked_lr adapts nn.Linear and transformers' Conv1D only, got "
                f"{type(base_layer).__name__}; leave this module out of target_modules"
            )
        self.base_layer = base_layer
        self.masked_lr_inside = nn.ParameterDict({})
        self.masked_lr_outside = nn.ParameterDict({})
        # Not persistent: the model's state_dict would hold one byte per entry; the adapter
        # file gets the masks packed instead (see MaskedLRModel._get_adapter_state_dict).
        self.masked_lr_mask = BufferDict({}, persistent=False)
        self.masked_lr_scales: dict[str, tuple[float, float]] = {}
        # Adapters built while loading a saved adapter, before its masks are read.
        self.masked_lr_pending: dict[str, bool] = {}
        self.fan_in_fan_out = isinstance(base_layer, Conv1D)  # weight stored as [in, out]
        self._disable_adapters = False
        self.merged_adapters: list[str] = []
        self.kwargs = kwargs

    def update_layer(
        self,
        adapter_name: str,
        mask: torch.Tensor | None,
        config: MaskedLRConfig,
        inference_mode: bool = False,
    ) -> None:
        """Add an adapter. ``mask=None``: its mask comes later from a saved adapter."""
        weight = self.get_base_layer().weight
        pending = mask is None
        if pending:
            mask = torch.zeros(weight.shape, dtype=torch.bool)
        elif tuple(mask.shape) != tuple(weight.shape):
            raise ValueError(
                f"mask of shape {tuple(mask.shape)} does not fit the weight of shape "
                f"{tuple(weight.shape)}"
            )
        self.masked_lr_scales[adapter_name] = (config.inside_lr_scale, config.outside_lr_scale)
        self.masked_lr_pending[adapter_name] = pending
        self._set_values(adapter_name, mask.to(torch.bool), random=not config.init_weights)
        self._move_adapter_to_device_of_base_layer(adapter_name)
        self.set_adapter(self.active_adapters, inference_mode=inference_mode)

    def set_mask(self, adapter_name: str, mask: torch.Tensor) -> None:
        """Install a mask read from a saved adapter (values are loaded right after)."""
        current = self.masked_lr_mask[adapter_name]
        if tuple(mask.shape) != tuple(current.shape):
            raise ValueError(
                f"saved mask of shape {tuple(mask.shape)} does not fit the weight of shape "
                f"{tuple(current.shape)}; was the adapter trained on another base model?"
            )
        mask = mask.to(device=current.device, dtype=torch.bool)
        if not self.masked_lr_pending[adapter_name] and torch.equal(mask, current):
            return  # keep the parameters an optimizer may already hold
        self._set_values(adapter_name, mask, random=False, like=self.masked_lr_inside[adapter_name])
        self.masked_lr_pending[adapter_name] = False

    def _set_values(
        self, adapter_name: str, mask: torch.Tensor, random: bool, like: torch.Tensor | None = None
    ) -> None:
        """New value vectors sized by ``mask`` (device, dtype and requires_grad of ``like``)."""
        nnz = int(mask.sum())
        sizes = {"masked_lr_inside": nnz}
        if self.masked_lr_scales[adapter_name][1] > 0:
            sizes["masked_lr_outside"] = mask.numel() - nnz
        self.masked_lr_mask[adapter_name] = mask
        for name, size in sizes.items():
            values = torch.randn(size) * RANDOM_INIT_STD if random else torch.zeros(size)
            requires_grad = True
            if like is not None:
                values, requires_grad = values.to(like.device, like.dtype), like.requires_grad
            getattr(self, name)[adapter_name] = nn.Parameter(values, requires_grad=requires_grad)

    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        """The delta in the weight's stored layout (``[in, out]`` for Conv1D)."""
        if self.masked_lr_pending[adapter_name]:
            raise RuntimeError(
                f"masked_lr adapter {adapter_name!r} has no mask yet: it was built from a saved "
                "config; load its weights (PeftModel.from_pretrained or load_adapter), or build "
                "it with get_masked_lr_model(model, config, masks)"
            )
        mask = self.masked_lr_mask[adapter_name]
        inside = self.masked_lr_inside[adapter_name]
        inside_scale, outside_scale = self.masked_lr_scales[adapter_name]
        mask = mask.to(inside.device)
        delta = torch.zeros(mask.shape, dtype=inside.dtype, device=inside.device)
        delta = delta.masked_scatter(mask, inside * inside_scale)
        if adapter_name in self.masked_lr_outside:
            outside = self.masked_lr_outside[adapter_name]
            delta = delta.masked_scatter(~mask, outside * outside_scale)
        return delta


class Linear(nn.Module, MaskedLRLayer):
    """``nn.Linear`` or GPT-2 ``Conv1D`` with masked-LR adapters.

    The forward pass adds the deltas to the base weight and runs one matmul, the same operation
    the base layer runs, so a zero delta gives the base output bit for bit and a merged model
    gives the adapted output bit for bit. The cost is one weight-sized temporary per layer (kept
    for the backward pass), as in SHiRA. Hooks on the base layer are bypassed; put them on this
    layer instead.
    """

    def __init__(
        self,
        base_layer: nn.Module,
        adapter_name: str,
        mask: torch.Tensor | None,
        config: MaskedLRConfig,
        **kwargs,
    ) -> None:
        super().__init__()
        MaskedLRLayer.__init__(self, base_layer, **kwargs)
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, mask, config, inference_mode=config.inference_mode)

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        adapter_names = check_adapters_to_merge(self, adapter_names)
        weight = self.get_base_layer().weight
        for name in adapter_names:
            if name not in self.masked_lr_inside:
                continue
            delta = self.get_delta_weight(name).to(weight.dtype)
            if safe_merge and not torch.isfinite(weight.data + delta).all():
                raise ValueError(f"merging adapter {name!r} gives non-finite weights; not merged")
            weight.data += delta
            self.merged_adapters.append(name)

    def unmerge(self) -> None:
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.", stacklevel=2)
            return
        weight = self.get_base_layer().weight
        while self.merged_adapters:
            name = self.merged_adapters.pop()
            if name in self.masked_lr_inside:
                weight.data -= self.get_delta_weight(name).to(weight.dtype)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if kwargs.pop("adapter_names", None) is not None:
            raise ValueError("masked_lr does not support mixed-adapter batches (adapter_names=...)")
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        active = [name for name in self.active_adapters if name in self.masked_lr_inside]
        if self.merged or not active:
            return self.base_layer(x, *args, **kwargs)
        base = self.get_base_layer()
        weight = base.weight
        for name in active:
            weight = weight + self.get_delta_weight(name).to(weight.dtype)
        if self.fan_in_fan_out:  # what Conv1D.forward does, with the adapted weight
            out = torch.addmm(base.bias, x.reshape(-1, x.shape[-1]), weight)
            return out.view(*x.shape[:-1], weight.shape[-1])
        return F.linear(x, weight, base.bias)

    def __repr__(self) -> str:
        return "masked_lr." + super().__repr__()
