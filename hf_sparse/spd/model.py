"""The ``SPD`` tuner and the helpers that run a decomposed model in SPD's modes.

Lifecycle:
    get_spd_model(model, SPDConfig(C=20, target_modules=[...]))  -> targets checked (linear
                         layers only), each replaced by ``spd.Linear`` (base weight frozen)
    SPDTrainer(...).train()                  -> components and gates learned (trainer.py)
    model.save_pretrained(dir)               -> adapter_model.safetensors: U, V and gates only
    PeftModel.from_pretrained(base, dir)     -> (after ``import hf_sparse.spd``) the same model
    set_spd_ablation(model, keep=..., ci_threshold=...)  -> run a chosen subset of components
    model.merge_and_unload()                 -> a plain model whose weights are the components
                                                kept (``U diag(keep) V``; not with ci_threshold)
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping

import torch
from peft import PeftModel, get_peft_model
from peft.tuners.tuners_utils import (
    BaseTuner,
    BaseTunerLayer,
    _maybe_include_all_linear_layers,
    check_target_module_exists,
)
from torch import nn

from ..cards import install_peft_card_hook
from ..integrity import check_loaded_tensors, peft_targets, stamp_or_verify
from ..models import is_linear, weight_matrix
from .config import SPDConfig
from .layer import Linear, SPDLayer, SPDRuntime

_SHOWN = 5

install_peft_card_hook()  # save_pretrained writes our card, not peft's stock one


def get_spd_model(model: nn.Module, config: SPDConfig, adapter_name: str = "default") -> PeftModel:
    """Wrap ``model`` with an SPD decomposition of ``config.target_modules`` (checked first)."""
    if not isinstance(config, SPDConfig):
        raise TypeError(f"config must be an SPDConfig, got {type(config).__name__}")
    if isinstance(model, PeftModel):
        model.add_adapter(adapter_name, config)
        return model
    return get_peft_model(model, config, adapter_name=adapter_name)


class SPDModel(BaseTuner):
    """Replaces each target ``nn.Linear`` / ``Conv1D`` with an ``spd.Linear``."""

    prefix: str = "spd_"
    tuner_layer_cls = SPDLayer
    target_module_mapping: dict[str, list[str]] = {}

    def inject_adapter(self, model: nn.Module, adapter_name: str, *args, **kwargs) -> None:
        config = self.peft_config[adapter_name]
        check_targets(model, config)  # before any layer is replaced (tied pairs included)
        stamp_or_verify(model, config, peft_targets(model, config))
        super().inject_adapter(model, adapter_name, *args, **kwargs)
        if config.tied_modules:
            layers = spd_layers(model)
            for tied, source in config.tied_modules.items():
                tied_layer = layers[_match(layers, tied)]
                tied_layer.tie_components_(layers[_match(layers, source)], adapter_name)

    def _create_and_replace(
        self,
        config: SPDConfig,
        adapter_name: str,
        target: nn.Module,
        target_name: str,
        parent: nn.Module,
        current_key: str,
        **kwargs,
    ) -> None:
        if isinstance(target, SPDLayer):
            target.update_layer(adapter_name, config, inference_mode=config.inference_mode)
            return
        new_module = Linear(target, adapter_name, config)
        if adapter_name not in self.active_adapters:
            new_module.requires_grad_(False)
        self._replace_module(parent, target_name, new_module, target)

    @classmethod
    def _remap_adapter_state_dict_for_load(cls, model, config, adapter_name, state_dict):
        """peft's remapping, then every component and gate must come from the file."""
        remapped = super()._remap_adapter_state_dict_for_load(
            model, config, adapter_name, state_dict
        )
        check_loaded_tensors(model, config, adapter_name, cls.prefix, remapped)
        return remapped

    def add_weighted_adapter(self, adapters, weights, adapter_name, **kwargs) -> None:
        """Refused: a weighted sum of two decompositions of a weight decomposes nothing."""
        raise NotImplementedError(
            "SPD has no add_weighted_adapter: each adapter decomposes the base weights into its "
            "own components, and a weighted sum of decompositions is not one. To run a chosen "
            "subset of components use set_spd_ablation(model, keep=...), then merge_and_unload()"
        )


def check_targets(model: nn.Module, config: SPDConfig, check_tied: bool = True) -> list[str]:
    """Names of the modules ``config`` targets; ValueError if any is not a linear layer, or
    (``check_tied``) if a ``tied_modules`` pair does not name two decomposed layers of
    transposed shapes."""
    _maybe_include_all_linear_layers(config, model)
    targets: dict[str, nn.Module] = {}
    inside: list[str] = []
    for name, module in model.named_modules():
        if not name or any(name.startswith(prefix) for prefix in inside):
            continue
        if isinstance(module, BaseTunerLayer):
            inside.append(name + ".")
            module = module.get_base_layer()
        if check_target_module_exists(config, name):
            targets[name] = module
    bad = [name for name, module in targets.items() if not is_linear(module)]
    if bad:
        kinds = sorted({type(targets[name]).__name__ for name in bad})
        raise ValueError(
            f"SPD decomposes linear layers only (nn.Linear, Conv1D), but target_modules "
            f"{config.target_modules!r} also matches {kinds}: {bad[:_SHOWN]}; narrow "
            "target_modules to linear layers or add those names to exclude_modules"
        )
    if not targets:
        linears = [n for n, m in model.named_modules() if is_linear(m)]
        raise ValueError(
            f"target_modules {config.target_modules!r} matches no module; linear layers of this "
            f"model include {linears[:8]}"
        )
    for tied, source in (config.tied_modules or {}).items() if check_tied else ():
        d_out, d_in = weight_matrix(targets[_match(targets, tied)]).shape
        source_shape = tuple(weight_matrix(targets[_match(targets, source)]).shape)
        if source_shape != (d_in, d_out):
            raise ValueError(
                f"tied_modules: a tied layer's weight must be the transpose's shape of its "
                f"source's, got {(d_out, d_in)} for {tied!r} and {source_shape} for {source!r}"
            )
    return list(targets)


def _match(decomposed: Mapping[str, object], name: str) -> str:
    """The one decomposed layer's full name that ``name`` (a tied_modules entry) designates."""
    found = [key for key in decomposed if key == name or key.endswith("." + name)]
    if len(found) != 1:
        raise ValueError(
            f"tied_modules names {name!r}, which matches {len(found)} decomposed layers "
            f"({found[:_SHOWN]}); name exactly one of {list(decomposed)[:_SHOWN]}"
        )
    return found[0]


def spd_layers(model: nn.Module) -> dict[str, SPDLayer]:
    """``{module name: decomposed layer}`` in model order (names without PEFT's prefix)."""
    layers = {}
    for name, module in model.named_modules():
        if isinstance(module, SPDLayer):
            layers[name.removeprefix("base_model.model.")] = module
    return layers


@contextlib.contextmanager
def spd_runtime(
    model: nn.Module, runtimes: Mapping[str, SPDRuntime | None]
) -> Iterator[Mapping[str, SPDRuntime | None]]:
    """Run the decomposed layers named in ``runtimes`` in the given modes; others run as the
    target (``None`` = the layer's default, decomposed, behaviour)."""
    layers = spd_layers(model)
    unknown = sorted(set(runtimes) - set(layers))
    if unknown:
        raise ValueError(f"no decomposed layer named {unknown}; decomposed: {list(layers)}")
    try:
        for name, layer in layers.items():
            layer.spd_runtime = runtimes.get(name, SPDRuntime(mode="target"))
        yield runtimes
    finally:
        for layer in layers.values():
            layer.spd_runtime = None


def set_spd_ablation(
    model: nn.Module,
    keep: Mapping[str, torch.Tensor | list[int]] | None = None,
    ci_threshold: float | None = None,
    include_delta: bool = False,
) -> None:
    """Choose the components the decomposed model runs with, in place.

    ``keep`` maps layer names to a bool ``[C]`` mask or a list of component indices (layers not
    named keep every component); ``ci_threshold`` keeps, per input, only the components whose
    causal importance exceeds it; ``include_delta`` adds ``W - UV`` back. With every component,
    ``include_delta=True`` reproduces the target exactly.
    """
    layers = spd_layers(model)
    keep = dict(keep or {})
    unknown = sorted(set(keep) - set(layers))
    if unknown:
        raise ValueError(f"keep names {unknown}, which are not decomposed; use {list(layers)}")
    for name, layer in layers.items():
        mask = keep.get(name)
        if mask is not None and not isinstance(mask, torch.Tensor):
            C = layer.components()[0].shape[1]
            indices = [int(i) for i in mask]
            if any(i < 0 or i >= C for i in indices):
                raise ValueError(f"component indices for {name} must be in [0, {C}), got {mask}")
            mask = torch.zeros(C, dtype=torch.bool)
            mask[indices] = True
        layer.set_ablation(mask, ci_threshold, include_delta)


def clear_spd_ablation(model: nn.Module) -> None:
    """Back to every component, no threshold, no delta."""
    set_spd_ablation(model)
