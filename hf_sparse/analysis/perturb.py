"""Perturbations of chosen weight entries, registered by name, applied and undone exactly.

Each perturbation maps the chosen entries' values to new values: ``fn(values, tensor_std,
strength, generator)``. ``zero`` ignores ``strength``; ``sign_flip`` multiplies by ``-strength``
(1 = a plain flip); ``scale`` multiplies by ``strength``; ``noise`` adds Gaussian noise of
standard deviation ``strength`` times the whole tensor's standard deviation.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping

import torch
from torch import nn

from ..masks import ParameterMasks

Perturbation = Callable[[torch.Tensor, float, float, torch.Generator], torch.Tensor]
PERTURBATIONS: dict[str, Perturbation] = {}


def register_perturbation(name: str) -> Callable[[Perturbation], Perturbation]:
    def decorate(fn: Perturbation) -> Perturbation:
        PERTURBATIONS[name] = fn
        return fn

    return decorate


@register_perturbation("zero")
def zero(values: torch.Tensor, std: float, strength: float, generator) -> torch.Tensor:
    return torch.zeros_like(values)


@register_perturbation("sign_flip")
def sign_flip(values: torch.Tensor, std: float, strength: float, generator) -> torch.Tensor:
    return -strength * values


@register_perturbation("scale")
def scale(values: torch.Tensor, std: float, strength: float, generator) -> torch.Tensor:
    return strength * values


@register_perturbation("noise")
def noise(values: torch.Tensor, std: float, strength: float, generator) -> torch.Tensor:
    draw = torch.randn(values.shape, generator=generator, dtype=torch.float32)
    return values + (strength * std * draw).to(values.device, values.dtype)


def check_perturbation(kind: str, strength: float) -> None:
    if kind not in PERTURBATIONS:
        raise ValueError(f"unknown perturbation {kind!r}; valid: {sorted(PERTURBATIONS)}")
    if isinstance(strength, bool) or not isinstance(strength, int | float):
        raise ValueError(f"perturbation strength must be a number, got {strength!r}")
    if kind == "noise" and strength < 0:
        raise ValueError(f"noise strength is a multiple of the weight's std (>= 0), got {strength}")


@contextlib.contextmanager
def perturbed(
    model: nn.Module,
    masks: Mapping[str, torch.Tensor],
    kind: str = "zero",
    strength: float = 1.0,
    seed: int = 0,
) -> Iterator[None]:
    """Inside the block the True entries of ``masks`` are perturbed by ``kind``; afterwards the
    original values are back bit for bit. Names and shapes are checked before any change."""
    check_perturbation(kind, strength)
    masks = masks if isinstance(masks, ParameterMasks) else ParameterMasks(dict(masks))
    masks.check_against(model)
    params = dict(model.named_parameters())
    generator = torch.Generator().manual_seed(seed)
    fn = PERTURBATIONS[kind]
    saved = {}
    try:
        with torch.no_grad():
            for name in sorted(masks):
                param = params[name]
                mask = masks[name].to(param.device)
                values = param[mask].clone()
                saved[name] = (mask, values)
                std = float(param.float().std()) if param.numel() > 1 else 0.0
                param[mask] = fn(values, std, float(strength), generator).to(param.dtype)
        yield
    finally:
        with torch.no_grad():
            for name, (mask, values) in saved.items():
                params[name][mask] = values
