"""A compressed model as plain modules, so other PEFT methods (LoRA) can sit on top.

``unload_factorized(peft_model)`` replaces every compressed layer by a ``FactorizedLinear``
holding two ``nn.Linear``: ``basis`` (``in -> k``, the *same* module object in every layer of a
group, so the sharing and the memory saving survive) and ``coefficient`` (``k -> out``, with the
original bias). LoRA can then target the coefficients for recovery fine-tuning, as the Basis
Sharing paper (ICLR 2025, Sec. 4) does with LoRA on the compressed model::

    plain = unload_factorized(compressed)
    lora = get_peft_model(plain, LoraConfig(r=8, target_modules=["coefficient"]))

To reload such a LoRA adapter, rebuild the same plain model (load the Basis Sharing adapter,
``unload_factorized``) and call ``PeftModel.from_pretrained(plain, lora_dir)``.
"""

from __future__ import annotations

import torch
from peft import PeftModel
from peft.tuners.tuners_utils import _get_submodules
from torch import nn

from .layer import BasisSharingLayer


class FactorizedLinear(nn.Module):
    """``y = coefficient(basis(x))``; ``basis`` may be shared with other layers."""

    def __init__(self, basis: nn.Linear, coefficient: nn.Linear) -> None:
        super().__init__()
        self.basis = basis
        self.coefficient = coefficient

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.coefficient(self.basis(x))


def _linear_from(weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    out_f, in_f = weight.shape
    layer = nn.Linear(in_f, out_f, bias=bias is not None, device="meta")
    layer.weight = weight if isinstance(weight, nn.Parameter) else nn.Parameter(weight)
    if bias is not None:
        layer.bias = bias if isinstance(bias, nn.Parameter) else nn.Parameter(bias)
    return layer


@torch.no_grad()
def unload_factorized(model: PeftModel, adapter_name: str = "default") -> nn.Module:
    """The base model with each compressed layer as ``FactorizedLinear`` (parameters reused,
    not copied). The ``PeftModel`` should not be used afterwards."""
    from .model import BANK, _tuner

    tuner = _tuner(model)
    layers = tuner.layers(adapter_name)
    pending = [n for n, layer in layers.items() if layer.basis_sharing_pending[adapter_name]]
    if pending:
        raise ValueError(f"adapter {adapter_name!r} is not compressed yet: {pending[:3]}")
    bank = tuner._bank(BANK)[adapter_name]
    shared = {key: _linear_from(basis, None) for key, basis in bank.items()}
    for name, layer in layers.items():
        parent, _, leaf = _get_submodules(tuner.model, name)
        bias = layer.get_base_layer().bias
        coefficient = _linear_from(layer.basis_sharing_coefficient[adapter_name], bias)
        key = layer.basis_sharing_key[adapter_name]
        setattr(parent, leaf, FactorizedLinear(shared[key], coefficient))
    plain = tuner.model
    if hasattr(plain, "peft_config"):
        del plain.peft_config
    for param in plain.parameters():
        param.requires_grad_(True)
    return plain


def is_compressed_layer(module: nn.Module) -> bool:
    return isinstance(module, BasisSharingLayer | FactorizedLinear)
