"""``MaskedAdamW``: AdamW with one learning rate inside a boolean mask and another outside it.

The update is ``torch.optim.AdamW``'s (Loshchilov & Hutter, "Decoupled Weight Decay
Regularization", 2019) with ``lr`` replaced per element by ``lr * (inside_lr_scale where the
mask is True, else outside_lr_scale)``. The decoupled weight decay uses the same per-element
rate, so an entry whose rate is 0 does not move at all, not even by decay. Moments are kept for
every entry, so masks may change between steps without losing them.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn
from torch.optim import Optimizer

MASK_STATE_KEY = "lr_mask"  # the per-parameter bool mask, saved in the optimizer state
_WRAPPER_PREFIXES = ("base_model.model.", "module.", "_orig_mod.")
_SHOWN = 5


class MaskedAdamW(Optimizer):
    """AdamW with per-element learning rates given by boolean masks.

    Args: those of ``torch.optim.AdamW`` (same defaults; no foreach/fused/capturable paths),
    plus ``masks`` (``{parameter or parameter name: bool mask of its shape}``; names need the
    optimizer to be built from ``model.named_parameters()``), ``inside_lr_scale`` and
    ``outside_lr_scale`` (also settable per param group), or instead absolute rates
    ``masked_lr`` / ``unmasked_lr`` (the specification's names; also per group): they are turned
    into the scales ``masked_lr / lr`` and ``unmasked_lr / lr`` of the group's ``lr`` when the
    group is added, so a scheduler scales them as it scales ``lr``. ``get_lr_info()`` reports
    the effective rates and mask densities per group. Parameters without a mask train with
    the plain group lr. Masks may also be set later with ``set_masks`` (e.g. from a callback at
    ``on_train_begin``); they are stored in the optimizer state, so a resumed run keeps them.

    Non-finite moments at a frozen entry (scale 0) would still spread into the weight (0 * inf);
    skip such steps (as AMP's GradScaler does) rather than relying on the mask.
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        amsgrad: bool = False,
        *,
        maximize: bool = False,
        masks: Mapping[nn.Parameter | str, torch.Tensor] | None = None,
        inside_lr_scale: float = 1.0,
        outside_lr_scale: float = 0.0,
        masked_lr: float | None = None,
        unmasked_lr: float | None = None,
    ) -> None:
        _check_hyperparameters(lr, betas, eps, weight_decay)
        defaults = dict(
            lr=lr,
            betas=betas,
            eps=eps,
            weight_decay=weight_decay,
            amsgrad=amsgrad,
            maximize=maximize,
            inside_lr_scale=inside_lr_scale,
            outside_lr_scale=outside_lr_scale,
            masked_lr=masked_lr,
            unmasked_lr=unmasked_lr,
        )
        super().__init__(params, defaults)
        if masks:
            self.set_masks(masks)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        where = f"param group {len(self.param_groups) - 1}"
        _check_hyperparameters(group["lr"], group["betas"], group["eps"], group["weight_decay"])
        for absolute, scale in (
            ("masked_lr", "inside_lr_scale"),
            ("unmasked_lr", "outside_lr_scale"),
        ):
            value = group.get(absolute)
            if value is None:
                continue
            _check_scale(absolute, value, where)
            if not group["lr"] > 0:
                raise ValueError(
                    f"{absolute} of {where} needs a group lr > 0 to be expressed as a scale of "
                    f"it, got lr={group['lr']}; set lr to the base rate"
                )
            group[scale] = float(value) / group["lr"]
            group[absolute] = None  # applied: later lr changes (schedulers) scale it
        _check_scale("inside_lr_scale", group["inside_lr_scale"], where)
        _check_scale("outside_lr_scale", group["outside_lr_scale"], where)

    def set_masks(self, masks: Mapping[nn.Parameter | str, torch.Tensor]) -> None:
        """Set (or replace) the masks of some parameters; all are checked before any is set."""
        resolved = []
        by_name = self._parameters_by_name()
        known = {id(p) for group in self.param_groups for p in group["params"]}
        unknown = []
        for key, mask in masks.items():
            if not isinstance(key, str | torch.Tensor):
                raise TypeError(
                    f"masks must be keyed by parameter or name, got {type(key).__name__}"
                )
            param = by_name.get(_normalise(key)) if isinstance(key, str) else key
            if param is None or id(param) not in known:
                unknown.append(key if isinstance(key, str) else f"<tensor {tuple(key.shape)}>")
                continue
            resolved.append((key, param, _as_bool_mask(key, mask, param)))
        if unknown:
            hint = (
                ""
                if by_name
                else " (to key masks by name, build the optimizer from model.named_parameters())"
            )
            raise ValueError(
                f"{len(unknown)} mask(s) are for parameters this optimizer does not hold, e.g. "
                f"{unknown[:_SHOWN]}{hint}"
            )
        for _, param, mask in resolved:
            self.state[param][MASK_STATE_KEY] = mask.to(param.device)

    def get_masks(self) -> dict[nn.Parameter, torch.Tensor]:
        """The current masks, by parameter."""
        return {
            p: state[MASK_STATE_KEY] for p, state in self.state.items() if MASK_STATE_KEY in state
        }

    def get_lr_info(self) -> list[dict[str, Any]]:
        """Per param group: its ``lr`` now, the effective rates inside and outside the masks
        (``lr * scale``), and how many of its parameters have a mask with which density."""
        info = []
        masks = {id(p): m for p, m in self.get_masks().items()}
        for index, group in enumerate(self.param_groups):
            lr = float(group["lr"])
            masked = [masks[id(p)] for p in group["params"] if id(p) in masks]
            kept = sum(int(m.sum()) for m in masked)
            entries = sum(m.numel() for m in masked)
            info.append(
                {
                    "group": index,
                    "lr": lr,
                    "masked_lr": lr * float(group["inside_lr_scale"]),
                    "unmasked_lr": lr * float(group["outside_lr_scale"]),
                    "inside_lr_scale": float(group["inside_lr_scale"]),
                    "outside_lr_scale": float(group["outside_lr_scale"]),
                    "params": len(group["params"]),
                    "masked_params": len(masked),
                    "masked_entries": kept,
                    "entries_of_masked_params": entries,
                    "mask_density": kept / entries if entries else None,
                }
            )
        return info

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        # torch casts loaded state to the parameter's dtype; the masks are bool again here.
        for state in self.state.values():
            if MASK_STATE_KEY in state:
                state[MASK_STATE_KEY] = state[MASK_STATE_KEY].to(torch.bool)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for param in group["params"]:
                if param.grad is not None:
                    self._update(param, group)
        return loss

    def _update(self, param: torch.Tensor, group: dict[str, Any]) -> None:
        """One AdamW step for ``param``, in the operation order of torch's single-tensor AdamW
        (so that with scale 1 the result is AdamW's to the last bit)."""
        if param.grad.is_sparse:
            raise RuntimeError("MaskedAdamW does not support sparse gradients")
        grad = -param.grad if group["maximize"] else param.grad
        state = self.state[param]
        if "step" not in state:
            state["step"] = torch.tensor(0.0, dtype=torch.float32)
            state["exp_avg"] = torch.zeros_like(param, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(param, memory_format=torch.preserve_format)
            if group["amsgrad"]:
                state["max_exp_avg_sq"] = torch.zeros_like(
                    param, memory_format=torch.preserve_format
                )
        lr, weight_decay, eps = group["lr"], group["weight_decay"], group["eps"]
        beta1, beta2 = group["betas"]
        scales = _lr_scales(state.get(MASK_STATE_KEY), group, param)
        state["step"] += 1
        step = state["step"].item()

        if weight_decay != 0:
            if isinstance(scales, float):
                param.mul_(1 - lr * scales * weight_decay)
            else:
                mask, inside, outside = scales
                factor = torch.where(
                    mask, 1 - lr * inside * weight_decay, 1 - lr * outside * weight_decay
                )
                param.mul_(factor.to(param.dtype))

        exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
        exp_avg.lerp_(grad, 1 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        bias_correction1 = 1 - beta1**step
        bias_correction2_sqrt = (1 - beta2**step) ** 0.5
        if group["amsgrad"]:
            max_exp_avg_sq = state["max_exp_avg_sq"]
            torch.maximum(max_exp_avg_sq, exp_avg_sq, out=max_exp_avg_sq)
            denom = (max_exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(eps)
        else:
            denom = (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(eps)

        if isinstance(scales, float):
            param.addcdiv_(exp_avg, denom, value=-(lr * scales) / bias_correction1)
        else:
            mask, inside, outside = scales
            per_element = torch.where(mask, inside, outside).to(exp_avg.dtype)
            param.addcdiv_(exp_avg * per_element, denom, value=-lr / bias_correction1)

    def _parameters_by_name(self) -> dict[str, torch.Tensor]:
        by_name = {}
        for group in self.param_groups:
            for name, param in zip(group.get("param_names", ()), group["params"], strict=False):
                by_name[_normalise(name)] = param
        return by_name


def _lr_scales(
    mask: torch.Tensor | None, group: dict[str, Any], param: torch.Tensor
) -> float | tuple[torch.Tensor, float, float]:
    """A float when one scale covers the whole parameter, else ``(mask, inside, outside)``."""
    inside, outside = float(group["inside_lr_scale"]), float(group["outside_lr_scale"])
    if mask is None:
        return 1.0
    if inside == outside:
        return inside
    return mask.to(param.device), inside, outside


def _normalise(name: str) -> str:
    """Parameter names without wrapper prefixes (PEFT, DDP, torch.compile)."""
    changed = True
    while changed:
        changed = False
        for prefix in _WRAPPER_PREFIXES:
            if name.startswith(prefix):
                name, changed = name[len(prefix) :], True
    return name


def _as_bool_mask(key: object, mask: object, param: torch.Tensor) -> torch.Tensor:
    label = repr(key) if isinstance(key, str) else f"parameter of shape {tuple(param.shape)}"
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"mask for {label} must be a tensor, got {type(mask).__name__}")
    if tuple(mask.shape) != tuple(param.shape):
        raise ValueError(
            f"mask for {label} has shape {tuple(mask.shape)} but the parameter has shape "
            f"{tuple(param.shape)}"
        )
    if mask.dtype != torch.bool and not bool(((mask == 0) | (mask == 1)).all()):
        raise ValueError(f"mask for {label} ({mask.dtype}) holds values other than 0 and 1")
    return mask.detach().to(torch.bool)


def _check_scale(field: str, value: object, where: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"{field} of {where} must be a number >= 0, got {value!r}")
    if not math.isfinite(value) or value < 0:
        raise ValueError(
            f"{field} of {where} must be finite and >= 0, got {value!r}; 0 freezes those entries"
        )


def _check_hyperparameters(lr, betas, eps, weight_decay) -> None:
    if not lr >= 0.0:  # also rejects NaN
        raise ValueError(f"lr must be >= 0, got {lr}")
    if not eps >= 0.0:  # also rejects NaN
        raise ValueError(f"eps must be >= 0, got {eps}")
    if len(betas) != 2 or not all(0.0 <= beta < 1.0 for beta in betas):
        raise ValueError(f"betas must be two numbers in [0, 1), got {betas}")
    if not weight_decay >= 0.0:  # also rejects NaN
        raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
