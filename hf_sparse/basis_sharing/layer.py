"""The compressed layer: ``y = (x B^T) C^T + bias`` with a basis ``B`` shared by a group.

The basis lives on the tuner (``BasisSharingModel.basis_sharing_bases``, VeRA's pattern) and is
reached through a plain reference, not registered here, so it is stored and saved once per
group. Each layer registers only its coefficients ``C``. Basis Sharing (ICLR 2025), Sec. 3.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from peft.tuners.tuners_utils import BaseTunerLayer, check_adapters_to_merge
from torch import nn
from transformers.pytorch_utils import Conv1D

# (layer, adapter, x) -> x B_r^T C_r^T on the active directions only, bias excluded (dynamic
# rank; see dynamic_rank.py)
RankPolicy = Callable[["BasisSharingLayer", str, torch.Tensor], torch.Tensor]


class BasisSharingLayer(BaseTunerLayer):
    """Adapter state of one compressed layer, keyed by adapter name."""

    adapter_layer_names = ("basis_sharing_coefficient",)
    other_param_names = ("basis_sharing_key", "basis_sharing_pending")

    def __init__(self, base_layer: nn.Module, **kwargs) -> None:
        if not isinstance(base_layer, nn.Linear | Conv1D):
            raise TypeError(
                f"basis_sharing compresses nn.Linear and Conv1D only, got "
                f"{type(base_layer).__name__}"
            )
        self.base_layer = base_layer
        weight = base_layer.weight
        out_f, in_f = (
            (weight.shape[1], weight.shape[0]) if isinstance(base_layer, Conv1D) else (weight.shape)
        )
        self.in_features, self.out_features = int(in_f), int(out_f)
        self.basis_sharing_coefficient = nn.ParameterDict({})
        self.basis_sharing_key: dict[str, str] = {}  # adapter -> basis key on the tuner
        # True until the factors are filled (fill_deferred_factors_ or loading a saved adapter);
        # until then the layer runs its dense weight.
        self.basis_sharing_pending: dict[str, bool] = {}
        self.basis_sharing_rank_policy: RankPolicy | None = None
        self._disable_adapters = False
        self.merged_adapters: list[str] = []
        self.kwargs = kwargs

    def set_bank(self, bank: nn.ModuleDict) -> None:
        """Reference (not register) the tuner's ``{adapter: {key: basis}}`` bank."""
        object.__setattr__(self, "_basis_sharing_bank", bank)

    def basis(self, adapter_name: str) -> torch.Tensor:
        return self._basis_sharing_bank[adapter_name][self.basis_sharing_key[adapter_name]]

    def update_layer(
        self, adapter_name: str, key: str, rank: int, train: bool, inference_mode: bool = False
    ) -> None:
        weight = self.get_base_layer().weight
        self.basis_sharing_key[adapter_name] = key
        self.basis_sharing_pending[adapter_name] = True
        coefficient = torch.zeros(self.out_features, rank, dtype=weight.dtype, device=weight.device)
        self.basis_sharing_coefficient[adapter_name] = nn.Parameter(
            coefficient, requires_grad=train
        )
        self.set_adapter(self.active_adapters, inference_mode=inference_mode)
        self.basis_sharing_coefficient[adapter_name].requires_grad_(train and not inference_mode)

    def dense_weight_present(self) -> bool:
        return self.get_base_layer().weight.numel() > 0

    def drop_dense_weight(self) -> None:
        """Replace the dense weight by an empty tensor (same dtype/device) to free its memory."""
        base = self.get_base_layer()
        old = base.weight
        base.weight = nn.Parameter(
            torch.empty(0, dtype=old.dtype, device=old.device), requires_grad=False
        )

    def set_dense_weight(self, matrix: torch.Tensor) -> None:
        """Install a dense ``[out, in]`` weight in the base layer's own layout."""
        base = self.get_base_layer()
        value = matrix.t() if isinstance(base, Conv1D) else matrix
        base.weight = nn.Parameter(value.contiguous(), requires_grad=False)

    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        """The compressed layer's full weight ``C B`` as ``[out, in]`` (it replaces, not adds)."""
        coefficient = self.basis_sharing_coefficient[adapter_name]
        return coefficient @ self.basis(adapter_name).to(coefficient)


class Linear(nn.Module, BasisSharingLayer):
    """``nn.Linear`` or GPT-2 ``Conv1D`` replaced by basis x coefficients.

    Unlike additive adapters, the factors *replace* the weight: with the dense weight dropped,
    disabling the adapter is impossible (``merge_and_unload`` gives a dense model instead).
    """

    def __init__(
        self,
        base_layer: nn.Module,
        adapter_name: str,
        key: str,
        rank: int,
        bank: nn.ModuleDict,
        train: bool = True,
        inference_mode: bool = False,
        **kwargs,
    ) -> None:
        super().__init__()
        BasisSharingLayer.__init__(self, base_layer, **kwargs)
        self.set_bank(bank)
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, key, rank, train, inference_mode)

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        adapter_names = check_adapters_to_merge(self, adapter_names)
        if len(adapter_names) > 1:
            raise ValueError("basis_sharing replaces the weight: merge one adapter at a time")
        for name in adapter_names:
            if self.basis_sharing_pending.get(name, True):
                continue  # not compressed yet: the dense weight is still the layer's weight
            weight = self.get_delta_weight(name).detach()
            if safe_merge and not torch.isfinite(weight).all():
                raise ValueError(f"adapter {name!r} gives NaN/inf weights in {self!r}")
            self.set_dense_weight(weight)
            self.merged_adapters.append(name)

    def unmerge(self) -> None:
        if self.merged:
            self.drop_dense_weight()
            self.merged_adapters.clear()

    def _active(self) -> str | None:
        for name in self.active_adapters:
            if name in self.basis_sharing_coefficient and not self.basis_sharing_pending[name]:
                return name
        return None

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        adapter = self._active()
        if self.merged or adapter is None or self.disable_adapters:
            if not self.dense_weight_present():
                raise RuntimeError(
                    "this basis_sharing layer has no dense weight (it was dropped after "
                    "compression), so adapters cannot be disabled; use merge_and_unload()"
                )
            return self.base_layer(x, *args, **kwargs)
        if self.basis_sharing_rank_policy is not None:
            y = self.basis_sharing_rank_policy(self, adapter, x)
        else:
            coefficient = self.basis_sharing_coefficient[adapter]
            basis = self.basis(adapter)
            y = F.linear(F.linear(x.to(basis.dtype), basis).to(coefficient.dtype), coefficient)
        bias = self.get_base_layer().bias
        if bias is not None:
            y = y + bias
        return y.to(x.dtype)

    def __repr__(self) -> str:
        return "basis_sharing." + super().__repr__()
