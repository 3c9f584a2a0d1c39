"""The decomposed layer: a target linear, its ``C`` rank-one subcomponents and their gates.

How the layer runs is set from outside (``model.py``) through ``spd_runtime``:

* ``target``: the frozen base layer (optionally recording its input for the gates);
* ``masked``: ``sum_c m_c (V[c] . x) U[:, c]`` with given masks, plus the delta ``W - UV`` under
  its own mask (SPD's stochastic reconstruction, Bushnaq et al. 2025);
* default (no runtime set): the decomposed layer with the ablation settings (``spd_keep``,
  ``spd_ci_threshold``, ``spd_include_delta``): all components unless told otherwise.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import torch
from peft.tuners.tuners_utils import BaseTunerLayer, check_adapters_to_merge
from torch import nn
from transformers.pytorch_utils import Conv1D

from ..models import weight_matrix
from .config import SPDConfig
from .core import causal_importances, component_output, gate_mlp, inner_acts, weight_delta


@dataclass
class SPDRuntime:
    """How one forward pass uses this layer (set and cleared by ``model.spd_runtime``)."""

    mode: str = "target"  # "target" or "masked"
    capture: bool = False  # target mode: keep the input for the gates
    captured: torch.Tensor | None = None
    mask: torch.Tensor | None = None  # masked mode: [..., C]; None = all ones
    delta_mask: torch.Tensor | None = None  # masked mode: [...]; None = 1 (when delta is used)
    use_delta: bool = True


class SPDLayer(BaseTunerLayer):
    """Adapter state of one decomposed layer, keyed by adapter name like every peft tuner."""

    adapter_layer_names = (
        "spd_U",
        "spd_V",
        "spd_gate_w1",
        "spd_gate_b1",
        "spd_gate_w2",
        "spd_gate_b2",
    )
    other_param_names = (
        "spd_leak",
        "spd_use_delta",
        "spd_keep",
        "spd_ci_threshold",
        "spd_tied_to",
    )

    def __init__(self, base_layer: nn.Module, **kwargs) -> None:
        if not isinstance(base_layer, nn.Linear | Conv1D):
            raise TypeError(
                f"SPD decomposes nn.Linear and transformers' Conv1D only, got "
                f"{type(base_layer).__name__}; leave this module out of target_modules"
            )
        self.base_layer = base_layer
        for name in self.adapter_layer_names:
            setattr(self, name, nn.ParameterDict({}))
        self.spd_leak: dict[str, float] = {}
        self.spd_use_delta: dict[str, bool] = {}
        self.spd_keep: dict[str, torch.Tensor | None] = {}
        self.spd_ci_threshold: dict[str, float | None] = {}
        # adapter -> the layer whose components this one uses transposed (a plain dict, so the
        # source is not registered twice as a submodule)
        self.spd_tied_to: dict[str, SPDLayer] = {}
        self.spd_include_delta = False
        self.spd_runtime: SPDRuntime | None = None
        # The target weight (stored layout) while a merge has written the decomposed one into
        # the base layer; the gates, the delta and unmerge need it.
        self._spd_unmerged_weight: torch.Tensor | None = None
        self._disable_adapters = False
        self.merged_adapters: list[str] = []
        self.kwargs = kwargs

    @property
    def d_out_in(self) -> tuple[int, int]:
        out_features, in_features = weight_matrix(self.get_base_layer()).shape
        return int(out_features), int(in_features)

    def update_layer(
        self, adapter_name: str, config: SPDConfig, inference_mode: bool = False
    ) -> None:
        """Add an adapter: random ``U``, ``V`` and gates sized by ``config.C``/``gate_hidden``."""
        d_out, d_in = self.d_out_in
        C, H = config.C, config.gate_hidden
        weight = weight_matrix(self.get_base_layer())
        # V reads inputs (fan-in d_in); U writes outputs from C inner activations. The gates'
        # first layer has fan-in 1 and feeds a GELU: Kaiming's ReLU gain sqrt(2), as the
        # reference implementation initialises it.
        V = torch.randn(C, d_in) / math.sqrt(d_in)
        U = torch.randn(d_out, C) / math.sqrt(C)
        values = {
            "spd_V": V,
            "spd_U": U,
            "spd_gate_w1": torch.randn(C, H) * math.sqrt(2.0),
            "spd_gate_b1": torch.zeros(C, H),
            "spd_gate_w2": torch.randn(C, H) / math.sqrt(H),
            "spd_gate_b2": torch.zeros(C),
        }
        for name, value in values.items():
            value = value.to(device=weight.device, dtype=weight.dtype)
            getattr(self, name)[adapter_name] = nn.Parameter(value)
        self.spd_leak[adapter_name] = float(config.leak)
        self.spd_use_delta[adapter_name] = bool(config.use_delta_component)
        self.spd_keep[adapter_name] = None
        self.spd_ci_threshold[adapter_name] = None
        self._move_adapter_to_device_of_base_layer(adapter_name)
        self.set_adapter(self.active_adapters, inference_mode=inference_mode)

    # The decomposition, read by model.py, the trainer and the metrics.

    def spd_adapter(self) -> str:
        active = [name for name in self.active_adapters if name in self.spd_gate_b2]
        if not active:
            raise RuntimeError("this SPD layer has no active SPD adapter")
        return active[0]

    def components(self, adapter_name: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(U [d_out, C], V [C, d_in])`` of an adapter (the active one by default); for a
        tied layer, the source's ``(V^T, U^T)``."""
        name = adapter_name or self.spd_adapter()
        source = self.spd_tied_to.get(name)
        if source is not None:
            U, V = source.components(name)
            return V.t(), U.t()
        return self.spd_U[name], self.spd_V[name]

    def component_parameters(self, adapter_name: str | None = None) -> list[nn.Parameter]:
        """The parameters that hold this layer's own ``U`` and ``V`` (none when tied)."""
        name = adapter_name or self.spd_adapter()
        return [d[name] for d in (self.spd_U, self.spd_V) if name in d]

    def tie_components_(self, source: SPDLayer, adapter_name: str) -> None:
        """Use ``source``'s components transposed (``U = V_s^T``, ``V = U_s^T``) from now on
        and drop this layer's own: for a target whose weight is the transpose of the
        source's (TMS's tied ``linear2 = linear1^T``), one set of rank-one components then
        decomposes both, as in the reference implementation's TMS runs."""
        if source is self or source.spd_tied_to.get(adapter_name) is not None:
            raise ValueError("tied_modules: a layer can be tied only to an untied other layer")
        d_out, d_in = self.d_out_in
        if source.d_out_in != (d_in, d_out):
            raise ValueError(
                f"tied_modules: a tied layer's weight must be the transpose's shape of its "
                f"source's, got {(d_out, d_in)} and {source.d_out_in}"
            )
        sizes = (self.spd_U[adapter_name].shape[1], source.spd_U[adapter_name].shape[1])
        if sizes[0] != sizes[1]:
            raise ValueError(f"tied_modules: C differs ({sizes[0]} vs {sizes[1]})")
        del self.spd_U[adapter_name]
        del self.spd_V[adapter_name]
        self.spd_tied_to[adapter_name] = source

    def target_weight(self) -> torch.Tensor:
        """The frozen weight as ``[d_out, d_in]`` (the target's, also while merged)."""
        stored = self._spd_unmerged_weight
        if stored is None:
            return weight_matrix(self.get_base_layer())
        return stored.t() if isinstance(self.get_base_layer(), Conv1D) else stored

    def decomposed_weight(self, adapter_name: str | None = None) -> torch.Tensor:
        """The ``[d_out, d_in]`` weight the layer runs with by default: ``U diag(keep) V``,
        plus the delta ``W - U V`` when the ablation includes it."""
        name = adapter_name or self.spd_adapter()
        U, V = self.components(name)
        keep = self.spd_keep.get(name)
        if keep is not None:
            U = U * keep.to(device=U.device, dtype=U.dtype)
        weight = U @ V
        if self.spd_include_delta:
            weight = weight + self._delta(name)
        return weight

    def _delta(self, name: str) -> torch.Tensor:
        return weight_delta(self.target_weight(), *self.components(name))

    def causal_importance(
        self, x: torch.Tensor, adapter_name: str | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(g_lower, g_upper)`` of every subcomponent for inputs ``x: [..., d_in]``."""
        name = adapter_name or self.spd_adapter()
        pre = gate_mlp(
            inner_acts(x, self.components(name)[1]),
            self.spd_gate_w1[name],
            self.spd_gate_b1[name],
            self.spd_gate_w2[name],
            self.spd_gate_b2[name],
        )
        return causal_importances(pre, self.spd_leak[name])

    def set_ablation(
        self,
        keep: torch.Tensor | None = None,
        ci_threshold: float | None = None,
        include_delta: bool = False,
        adapter_name: str | None = None,
    ) -> None:
        """Run with only the ``keep`` components (bool ``[C]``; None = all), and/or only those
        whose causal importance on the current input exceeds ``ci_threshold``."""
        if self.merged:
            raise RuntimeError(
                "this SPD layer is merged: its weight is the decomposition of the ablation it "
                "was merged with; call model.unmerge_adapter() before choosing another"
            )
        name = adapter_name or self.spd_adapter()
        C = self.spd_gate_b2[name].shape[0]
        if keep is not None:
            keep = torch.as_tensor(keep)
            if keep.dtype != torch.bool or tuple(keep.shape) != (C,):
                raise ValueError(
                    f"keep must be a bool tensor of shape ({C},), got {keep.dtype} "
                    f"{tuple(keep.shape)}"
                )
        self.spd_keep[name] = keep
        self.spd_ci_threshold[name] = ci_threshold
        self.spd_include_delta = include_delta


class Linear(nn.Module, SPDLayer):
    """``nn.Linear`` or GPT-2 ``Conv1D`` decomposed into SPD subcomponents."""

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: SPDConfig, **kw) -> None:
        super().__init__()
        SPDLayer.__init__(self, base_layer, **kw)
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, config, inference_mode=config.inference_mode)

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        """Write ``decomposed_weight()`` into the base layer (the target weight is kept aside
        for ``unmerge``), so ``merge_and_unload`` gives a plain model that runs the chosen
        components. A ``ci_threshold`` picks components per input: no single weight does."""
        adapter_names = check_adapters_to_merge(self, adapter_names)
        if not adapter_names:
            return
        if len(adapter_names) > 1:
            raise ValueError(
                f"an SPD layer runs one decomposition at a time; merge one of {adapter_names}"
            )
        name = adapter_names[0]
        if self.spd_ci_threshold.get(name) is not None:
            raise ValueError(
                f"SPD adapter {name!r} keeps components by causal importance on each input "
                "(ci_threshold), which no fixed weight reproduces; merge a fixed set instead: "
                "set_spd_ablation(model, keep=...)"
            )
        with torch.no_grad():
            weight = self.decomposed_weight(name)
        if safe_merge and not torch.isfinite(weight).all():
            raise ValueError(f"merging SPD adapter {name!r} gives non-finite weights; not merged")
        base = self.get_base_layer()
        self._spd_unmerged_weight = base.weight.data
        stored = weight.t() if isinstance(base, Conv1D) else weight
        base.weight.data = stored.to(base.weight.dtype).contiguous()
        self.merged_adapters.append(name)

    def unmerge(self) -> None:
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.", stacklevel=2)
            return
        self.get_base_layer().weight.data = self._spd_unmerged_weight
        self._spd_unmerged_weight = None
        self.merged_adapters.clear()

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        kwargs.pop("adapter_names", None)
        active = [name for name in self.active_adapters if name in self.spd_gate_b2]
        run = self.spd_runtime
        if self.merged:
            if self.disable_adapters:
                self.unmerge()
            elif run is not None:
                raise RuntimeError(
                    "this SPD layer is merged, but training and metrics run the target and the "
                    "masked components; call model.unmerge_adapter() first"
                )
            else:
                return self.base_layer(x, *args, **kwargs)
        if self.disable_adapters or not active or (run is not None and run.mode == "target"):
            if run is not None and run.capture:
                run.captured = x
            return self.base_layer(x, *args, **kwargs)
        name = active[0]
        base = self.get_base_layer()
        U, V = self.components(name)
        x = x.to(V.dtype)
        if run is not None:  # masked: SPD training
            delta = self._delta(name) if run.use_delta and self.spd_use_delta[name] else None
            return component_output(x, U, V, run.mask, base.bias, delta, run.delta_mask)
        mask = None
        keep = self.spd_keep.get(name)
        if keep is not None:
            mask = keep.to(device=V.device, dtype=V.dtype)
        threshold = self.spd_ci_threshold.get(name)
        if threshold is not None:
            ci, _ = self.causal_importance(x, name)
            active_mask = (ci > threshold).to(V.dtype)
            mask = active_mask if mask is None else active_mask * mask
        delta = self._delta(name) if self.spd_include_delta else None
        return component_output(x, U, V, mask, base.bias, delta)

    def __repr__(self) -> str:
        return "spd." + super().__repr__()
