"""Coefficient update: refit every coefficient by least squares on the compressed model's inputs.

Basis Sharing (Wang et al., ICLR 2025), Sec. 3.3: after compression the inputs of later layers
have drifted; with ``X^T X`` re-collected at the compressed model's layer inputs (the basis
outputs ``z = x B^T`` have statistics ``B X^T X B^T``), each layer's coefficients become
``argmin_C ||X W^T - X B^T C^T||``, ``W`` the original dense weight. The paper uses it at
compression ratios of 40% and above.

The statistics come from one pass, as in the paper. A variant that regresses the *dense* model's
outputs instead (``X_d W^T``) over-corrects when done in one pass: every layer compensates the
whole drift it saw, and the corrections add up (a quick SmolLM2 check at 40%, 4 calibration
windows, 1 eval window: perplexity 336 -> 19,502). It would need the block-by-block engine and
is left out.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from ..calibration import StatsCollector
from ..models import weight_matrix
from .core import refit_coefficients
from .layer import BasisSharingLayer

_PEFT_PREFIX = "base_model.model."


def _compressed_layers(model: nn.Module, adapter_name: str) -> dict[str, BasisSharingLayer]:
    layers = {
        name.removeprefix(_PEFT_PREFIX): module
        for name, module in model.named_modules()
        if isinstance(module, BasisSharingLayer) and adapter_name in module.basis_sharing_key
    }
    if not layers:
        raise ValueError(f"no basis_sharing layer holds adapter {adapter_name!r}")
    return layers


@torch.no_grad()
def collect_compressed_stats(
    model: nn.Module,
    calibration: torch.Tensor,
    adapter_name: str = "default",
    batch_size: int = 8,
) -> dict[str, torch.Tensor]:
    """``{layer name: X^T X}`` (float32 sums) at the inputs of the compressed layers, one pass."""
    layers = _compressed_layers(model, adapter_name)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        with StatsCollector(layers, need_xtx=True, need_sq_norms=False) as collector:
            for batch in calibration.split(batch_size):
                model(input_ids=batch.to(device), use_cache=False)
    finally:
        model.train(was_training)
    # layers reading the same input (q/k/v, gate/up) share one tensor; nothing writes to it
    return {name: item.xtx for name, item in collector.stats.items()}


@torch.no_grad()
def update_coefficients_(
    model: nn.Module,
    calibration: torch.Tensor,
    adapter_name: str = "default",
    batch_size: int = 8,
    dense_weights: Mapping[str, torch.Tensor] | None = None,
    damping: float = 1e-6,
) -> int:
    """Refit the coefficients of every compressed layer in place; returns the layer count.

    ``dense_weights`` maps module names to the original ``[out, in]`` weights; without it the
    dense weights still held by the layers are used (compress with ``drop_dense_weights`` off,
    or call this before they are dropped, as ``fill_deferred_factors_`` does).
    """
    if not isinstance(calibration, torch.Tensor) or calibration.ndim != 2:
        raise ValueError("calibration must be a [n_windows, seq_len] tensor of token ids")
    layers = _compressed_layers(model, adapter_name)
    missing = [
        n
        for n, layer in layers.items()
        if (dense_weights is None or n not in dense_weights) and not layer.dense_weight_present()
    ]
    if missing:
        raise ValueError(
            f"the coefficient update needs the original weights, but {len(missing)} layer(s) "
            f"dropped theirs, e.g. {missing[:3]}; pass dense_weights={{name: weight}}"
        )
    grams = collect_compressed_stats(model, calibration, adapter_name, batch_size)
    for name, layer in layers.items():
        if dense_weights is not None and name in dense_weights:
            weight = dense_weights[name]
        else:
            weight = weight_matrix(layer.get_base_layer())
        coefficient = layer.basis_sharing_coefficient[adapter_name]
        fitted = refit_coefficients(weight, layer.basis(adapter_name), grams[name], damping)
        coefficient.copy_(fitted.to(coefficient.dtype))
    return len(layers)
