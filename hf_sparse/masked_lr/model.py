"""The ``MASKED_LR`` tuner: mask checks before injection, packed masks in the adapter file.

Lifecycle:
    get_masked_lr_model(model, config, masks)  -> masks checked against the targets, then layers
                                                  replaced (nothing changes if a check fails)
    model.save_pretrained(dir)                 -> adapter_model.safetensors: values + packed masks
    PeftModel.from_pretrained(base, dir)       -> (after import hf_sparse) layers built from the
                                                  config; masks and value shapes from the file
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

import torch
from peft import PeftModel, get_peft_model
from peft.tuners.tuners_utils import (
    BaseTuner,
    BaseTunerLayer,
    _maybe_include_all_linear_layers,
    check_target_module_exists,
)
from torch import nn
from transformers.pytorch_utils import Conv1D

from ..cards import install_peft_card_hook
from ..integrity import check_loaded_tensors, peft_targets, stamp_or_verify
from ..masks.bitmask import decode_mask, encode_mask, load_masks
from ..models import is_linear
from .config import MaskedLRConfig
from .layer import Linear, MaskedLRLayer

logger = logging.getLogger(__name__)
MASK_KEY = "masked_lr_mask"  # adapter-file key suffix of a packed mask
_PEFT_PREFIX = "base_model.model."
_SHOWN = 5  # names listed in an error message

install_peft_card_hook()  # save_pretrained writes our card, not peft's stock one


def get_masked_lr_model(
    model: nn.Module,
    config: MaskedLRConfig,
    masks: Mapping[str, torch.Tensor] | None = None,
    adapter_name: str = "default",
) -> PeftModel:
    """Wrap ``model`` with a masked-LR adapter (or add one to a ``PeftModel``).

    ``masks`` (e.g. a ``ParameterMasks``) maps full parameter names to boolean masks and takes
    precedence over ``config.masks_file``. Every check runs before the model is touched.
    """
    if not isinstance(config, MaskedLRConfig):
        raise TypeError(f"config must be a MaskedLRConfig, got {type(config).__name__}")
    if masks is not None:
        if not isinstance(masks, Mapping):
            raise TypeError(
                f"masks must map parameter names to tensors, got {type(masks).__name__}"
            )
        config._masked_lr_masks = masks  # read once by MaskedLRModel.inject_adapter
    try:
        if isinstance(model, PeftModel):
            model.add_adapter(adapter_name, config)
            return model
        return get_peft_model(model, config, adapter_name=adapter_name)
    finally:
        config.__dict__.pop("_masked_lr_masks", None)


class MaskedLRModel(BaseTuner):
    """Replaces each target ``nn.Linear`` / ``Conv1D`` with a ``masked_lr.Linear``."""

    prefix: str = "masked_lr_"
    tuner_layer_cls = MaskedLRLayer
    target_module_mapping: dict[str, list[str]] = {}

    def inject_adapter(
        self,
        model: nn.Module,
        adapter_name: str,
        autocast_adapter_dtype: bool = True,
        low_cpu_mem_usage: bool = False,
        state_dict: dict[str, torch.Tensor] | None = None,
    ) -> None:
        config = self.peft_config[adapter_name]
        in_memory = config.__dict__.pop("_masked_lr_masks", None)
        if in_memory is None and getattr(config, "_masks_in_checkpoint", False):
            self._masked_lr_masks = None  # layers wait for the masks in the adapter file
            _maybe_include_all_linear_layers(config, model)
        else:
            self._masked_lr_masks = prepare_masks(model, config, in_memory)
        stamp_or_verify(model, config, peft_targets(model, config))
        try:
            super().inject_adapter(
                model,
                adapter_name,
                autocast_adapter_dtype=autocast_adapter_dtype,
                low_cpu_mem_usage=low_cpu_mem_usage,
                state_dict=state_dict,
            )
        finally:
            del self._masked_lr_masks

    def _create_and_replace(
        self,
        config: MaskedLRConfig,
        adapter_name: str,
        target: nn.Module,
        target_name: str,
        parent: nn.Module,
        current_key: str,
        **kwargs,
    ) -> None:
        masks = self._masked_lr_masks
        mask = None if masks is None else masks[current_key]
        if isinstance(target, MaskedLRLayer):
            target.update_layer(adapter_name, mask, config, inference_mode=config.inference_mode)
            return
        new_module = Linear(target, adapter_name, mask, config)
        if adapter_name not in self.active_adapters:
            new_module.requires_grad_(False)  # a second adapter is not trained until activated
        self._replace_module(parent, target_name, new_module, target)

    def add_weighted_adapter(self, adapters, weights, adapter_name, **kwargs) -> None:
        """Refused: hf_sparse merges sparse deltas with ``hf_sparse.merging.merge_``."""
        raise NotImplementedError(
            "masked_lr has no add_weighted_adapter; combine saved masked_lr adapters with "
            "hf_sparse.merging.merge_(base, MergeConfig('task_arithmetic'), [folders], "
            "weights=[...]) (or TIES, DARE, SparseGPT-TV), then sparse_delta_model(base, "
            "result.deltas) to ship the combination as one masked_lr adapter"
        )

    @classmethod
    def _get_adapter_state_dict(
        cls, model, config, adapter_name, state_dict, unwanted_adapter_names
    ):
        """The values, plus each mask (``<module>.masked_lr_mask``) as packed bits or int32
        positions of the kept entries, whichever is smaller (``encode_mask``)."""
        to_return = super()._get_adapter_state_dict(
            model, config, adapter_name, state_dict, unwanted_adapter_names
        )
        for name, module in model.named_modules():
            if isinstance(module, MaskedLRLayer) and adapter_name in module.masked_lr_mask:
                name = name.removeprefix("_fsdp_wrapped_module.")
                packed = encode_mask(module.masked_lr_mask[adapter_name])
                to_return[f"{name}.{MASK_KEY}.{adapter_name}"] = packed
        return to_return

    @classmethod
    def _remap_adapter_state_dict_for_load(cls, model, config, adapter_name, state_dict):
        """Install the saved masks first: they fix the shapes of the values loaded next."""
        state_dict = dict(state_dict)
        missing = []
        for name, module in model.named_modules():
            if not isinstance(module, MaskedLRLayer) or adapter_name not in module.masked_lr_mask:
                continue
            name = name.removeprefix("_fsdp_wrapped_module.")
            packed = None
            for key in (f"{name}.{MASK_KEY}", f"{_PEFT_PREFIX}{name}.{MASK_KEY}"):
                if key in state_dict:
                    packed = state_dict.pop(key)
            if packed is None:
                if module.masked_lr_pending[adapter_name]:
                    missing.append(name)
                continue
            shape = module.masked_lr_mask[adapter_name].shape
            try:
                mask = decode_mask(packed.cpu(), shape, name)
            except ValueError as error:
                raise ValueError(f"saved mask of {name!r}: {error}") from None
            module.set_mask(adapter_name, mask)
        if missing:
            raise ValueError(
                f"the saved adapter has no {MASK_KEY} for {len(missing)} targeted module(s), e.g. "
                f"{missing[:_SHOWN]}; it was not saved by hf_sparse's masked_lr. Load it with the "
                "config's masks instead: get_masked_lr_model(base, config, masks), then "
                "set_peft_model_state_dict"
            )
        remapped = super()._remap_adapter_state_dict_for_load(
            model, config, adapter_name, state_dict
        )
        check_loaded_tensors(model, config, adapter_name, cls.prefix, remapped)
        return remapped


# Masks: names, dtypes, coverage and shapes, all checked before any layer is replaced.


def prepare_masks(
    model: nn.Module, config: MaskedLRConfig, masks: Mapping[str, torch.Tensor] | None
) -> dict[str, torch.Tensor]:
    """``{module name: bool mask}`` for exactly the modules ``config`` targets in ``model``
    (masks of other modules are left out, with a warning).

    Fills ``config.target_modules`` with the masked modules when it is None (and the checks
    pass), so the saved config names what was adapted.
    """
    if masks is None:
        if config.masks_file is None:
            raise ValueError(
                "masked_lr needs masks: pass masks= to get_masked_lr_model or set "
                "MaskedLRConfig.masks_file to a file written by hf_sparse.masks.save_masks"
            )
        masks = load_masks(config.masks_file)
    _check_not_stacked(model, masks)
    by_module = _masks_by_module(masks)
    original = config.target_modules
    if original is None:
        config.target_modules = set(by_module)
    try:
        _maybe_include_all_linear_layers(config, model)
        targets = targeted_modules(model, config)
        by_module = _select_targeted(model, by_module, targets)
        _check_shapes(by_module, targets)
    except (TypeError, ValueError):
        config.target_modules = original  # a failed check leaves the config as it was
        raise
    return by_module


def targeted_modules(model: nn.Module, config: MaskedLRConfig) -> dict[str, nn.Module]:
    """``{name: base layer}`` of the modules ``config.target_modules`` selects (peft's rules)."""
    targets, tuner_layers = {}, []
    for name, module in model.named_modules():
        if not name or any(name.startswith(prefix) for prefix in tuner_layers):
            continue  # inside an adapted layer: its base_layer and adapter containers
        if isinstance(module, BaseTunerLayer):
            tuner_layers.append(name + ".")
        if check_target_module_exists(config, name):
            targets[name] = (
                module.get_base_layer() if isinstance(module, BaseTunerLayer) else module
            )
    unsupported = [n for n, m in targets.items() if not isinstance(m, nn.Linear | Conv1D)]
    if unsupported:
        kinds = sorted({type(targets[n]).__name__ for n in unsupported})
        raise TypeError(
            f"masked_lr adapts nn.Linear and Conv1D only; target_modules also matches {kinds}: "
            f"{unsupported[:_SHOWN]}; narrow target_modules or add them to exclude_modules"
        )
    return targets


def _check_not_stacked(model: nn.Module, masks: Mapping[str, torch.Tensor]) -> None:
    params = dict(model.named_parameters())
    stacked = []
    for raw_name in masks:
        name = raw_name.removeprefix(_PEFT_PREFIX)
        param = params.get(name, params.get(_PEFT_PREFIX + name))
        if param is not None and param.ndim >= 3:
            stacked.append(f"{raw_name} {tuple(param.shape)}")
    if stacked:
        raise ValueError(
            f"{len(stacked)} mask(s) are for stacked MoE expert weights, e.g. {stacked[:2]}; "
            "masked_lr adapts nn.Linear / Conv1D layers only. Make the masks for linear layers "
            "(e.g. golden_masks(..., params=['re:self_attn']) or params=[...] without the "
            "experts) or drop the expert masks"
        )


def _masks_by_module(masks: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    by_module: dict[str, torch.Tensor] = {}
    for raw_name, mask in masks.items():
        name = raw_name.removeprefix(_PEFT_PREFIX).replace(".base_layer.", ".")
        if not name.endswith(".weight"):
            raise ValueError(
                f"mask {raw_name!r} is not for a weight; masked_lr adapts weight matrices, "
                "keyed by parameter name such as model.layers.0.mlp.up_proj.weight"
            )
        module = name.removesuffix(".weight")
        if module in by_module:
            raise ValueError(f"two masks name the same parameter {name!r} (one as {raw_name!r})")
        by_module[module] = _as_bool(raw_name, mask)
    return by_module


def _as_bool(name: str, mask: object) -> torch.Tensor:
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"mask {name!r} must be a tensor, got {type(mask).__name__}")
    if mask.dtype != torch.bool and not bool(((mask == 0) | (mask == 1)).all()):
        raise ValueError(
            f"mask {name!r} ({mask.dtype}) holds values other than 0 and 1; pass a bool tensor"
        )
    return mask.detach().to(device="cpu", dtype=torch.bool)


def _select_targeted(
    model: nn.Module, masks: Mapping[str, torch.Tensor], targets: Mapping[str, nn.Module]
) -> dict[str, torch.Tensor]:
    """The masks of the targeted modules. Masks of other modules of the model are left out
    (e.g. golden masks of every block linear with ``target_modules=["q_proj", "v_proj"]``),
    with a warning naming them; masks the model has no module for, and targeted modules
    without a mask, are errors."""
    modules = dict(model.named_modules())
    extra = [name for name in masks if name not in targets]
    unknown = [name + ".weight" for name in extra if name not in modules]
    if unknown:
        raise ValueError(
            f"{len(unknown)} mask(s) name parameters the model does not have, e.g. "
            f"{unknown[:_SHOWN]}; were the masks made for another model?"
        )
    if extra:
        logger.warning(
            "masked_lr: %d of %d masks are for modules target_modules does not select (e.g. "
            "%s) and are left out; add those modules to target_modules (or leave it None) to "
            "train them too",
            len(extra), len(masks), extra[:_SHOWN],
        )  # fmt: skip
    unmasked = [name for name in targets if name not in masks]
    if unmasked:
        raise ValueError(
            f"{len(unmasked)} targeted module(s) have no mask, e.g. {unmasked[:_SHOWN]}; give "
            "each one a mask (all False keeps a layer unchanged when outside_lr_scale is 0) or "
            "narrow target_modules"
        )
    return {name: mask for name, mask in masks.items() if name in targets}


def _check_shapes(masks: Mapping[str, torch.Tensor], targets: Mapping[str, nn.Module]) -> None:
    for name, mask in masks.items():
        weight_shape = tuple(targets[name].weight.shape)
        if tuple(mask.shape) != weight_shape:
            layout = " (Conv1D stores [in, out])" if isinstance(targets[name], Conv1D) else ""
            raise ValueError(
                f"mask for {name}.weight has shape {tuple(mask.shape)} but the weight has shape "
                f"{weight_shape}{layout}; masks must have the weight's stored shape"
            )


def sparse_delta_model(base: nn.Module, deltas: Mapping[str, torch.Tensor]) -> PeftModel:
    """A ``MASKED_LR`` adapter on ``base`` whose delta equals ``deltas`` exactly: the non-zero
    entries of each ``{module or weight name: delta}`` (stored layout) become the trained
    values, their positions the mask. ``base`` (holding the base weights) is wrapped in place.

    Used to ship a merged or pruned task vector as an adapter of its base model.
    """
    modules = dict(base.named_modules())
    by_module = {name.removesuffix(".weight"): delta for name, delta in deltas.items()}
    others = [name for name in by_module if not is_linear(modules.get(name))]
    if others:
        raise ValueError(
            f"a sparse-delta adapter holds deltas of linear weights only, but {others[:4]}"
            f"{' ...' if len(others) > 4 else ''} are not; save a full model instead "
            "(merge recipes: `output: full`)"
        )
    for name, delta in by_module.items():
        weight = modules[name].weight
        if tuple(delta.shape) != tuple(weight.shape):
            raise ValueError(
                f"delta of {name} has shape {tuple(delta.shape)}, the weight is "
                f"{tuple(weight.shape)}"
            )
    masks = {f"{name}.weight": delta != 0 for name, delta in by_module.items()}
    adapted = get_masked_lr_model(base, MaskedLRConfig(), masks)
    with torch.no_grad():
        for name, module in adapted.named_modules():
            if isinstance(module, MaskedLRLayer):
                key = name.removeprefix("base_model.model.")
                mask = module.masked_lr_mask["default"]
                values = module.masked_lr_inside["default"]
                values.copy_(by_module[key].to(mask.device)[mask].to(values.dtype))
    return adapted
