"""The ``BASIS_SHARING`` tuner: shared bases on the tuner, coefficients on the layers.

Lifecycle:
    get_basis_sharing_model(model, config, calibration=windows)
        -> plan (groups, ranks; all checks) -> X^T X of the dense model -> whitened grouped SVD
        -> layers replaced, bases filled -> optional coefficient update -> dense weights dropped
    model.save_pretrained(dir)         -> adapter_model.safetensors: bases (once per group),
                                          singular values, coefficients; the plan in the config
    PeftModel.from_pretrained(base, dir)  (after ``import hf_sparse.basis_sharing``)
        -> structure from config + base shapes, factors from the file, dense weights dropped
    model.merge_and_unload()           -> a plain dense model with W = C B

Basis Sharing (Wang et al., ICLR 2025).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

import torch
from peft import PeftModel, get_peft_model
from peft.tuners._buffer_dict import BufferDict
from peft.tuners.tuners_utils import BaseTuner
from torch import nn

from ..calibration import InputStats
from ..cards import install_peft_card_hook
from ..data import check_batch_size, check_token_windows
from ..integrity import check_loaded_tensors, peft_targets, report, stamp_or_verify
from .config import BasisSharingConfig
from .core import SharedFactors
from .layer import BasisSharingLayer, Linear
from .plan import Group, collect_input_stats, factorize, make_plan, parameter_counts

logger = logging.getLogger(__name__)

install_peft_card_hook()  # save_pretrained writes our card, not peft's stock one

BANK = "basis_sharing_bases"
SIGMAS = "basis_sharing_sigmas"
_TUNER_PREFIX = "base_model."


def get_basis_sharing_model(
    model: nn.Module,
    config: BasisSharingConfig,
    calibration: torch.Tensor | None = None,
    stats: Mapping[str, InputStats] | None = None,
    adapter_name: str = "default",
    defer: bool = False,
    batch_size: int = 8,
) -> PeftModel:
    """Compress ``model`` per ``config`` and wrap it as a ``PeftModel``.

    ``calibration`` (``[n, L]`` token ids) gives the whitening statistics (and the data of the
    coefficient update); ``stats`` (from ``collect_input_stats`` on the dense model) can be
    reused across configs instead. ``defer=True`` builds the structure with the dense weights
    still in place; ``fill_deferred_factors_`` fills it later (``BasisSharingCallback`` does so at
    ``on_train_begin``). Every check runs before the model is touched.
    """
    if not isinstance(config, BasisSharingConfig):
        raise TypeError(f"config must be a BasisSharingConfig, got {type(config).__name__}")
    if isinstance(model, PeftModel):
        raise ValueError(
            "model is already a PeftModel: basis_sharing compresses the dense weights, which a "
            "compressed model has dropped. For a second compression compress a fresh copy of "
            "the base model, save it, and model.load_adapter(folder, adapter_name=...)"
        )
    needs_data = config.whitening or config.update_coefficients
    if needs_data and calibration is None and stats is None and not defer:
        raise ValueError(
            "calibration data is missing: whitening (and the coefficient update) need token "
            "windows (calibration=) or statistics (stats=); set whitening=False for plain SVD "
            "or defer=True to compress later with fill_deferred_factors_"
        )
    if config.update_coefficients and calibration is None and not defer:
        raise ValueError(
            "update_coefficients=True needs calibration= token windows (statistics of the "
            "compressed model are collected after compression)"
        )
    if calibration is not None:
        check_token_windows(calibration, model, "calibration")
    check_batch_size(batch_size, "batch_size")
    make_plan(model, config)  # all checks, before any work
    peft_model = get_peft_model(model, config, adapter_name=adapter_name)
    if not defer:
        fill_deferred_factors_(peft_model, calibration, stats, adapter_name, batch_size)
    return peft_model


def _tuner(model: nn.Module) -> BasisSharingModel:
    tuner = model.base_model if isinstance(model, PeftModel) else model
    if not isinstance(tuner, BasisSharingModel):
        raise TypeError(f"expected a basis_sharing PeftModel, got {type(model).__name__}")
    return tuner


def fill_deferred_factors_(
    model: nn.Module,
    calibration: torch.Tensor | None = None,
    stats: Mapping[str, InputStats] | None = None,
    adapter_name: str = "default",
    batch_size: int = 8,
) -> dict[str, int]:
    """Fill a (deferred) adapter from the dense weights still in the layers, in place.

    The existing parameters are written in place, so an optimizer that already holds them
    (Trainer at ``on_train_begin``) keeps working. Returns the parameter counts.
    """
    tuner = _tuner(model)
    config = tuner.peft_config[adapter_name]
    groups = make_plan(tuner.model, config)
    layers = tuner.layers(adapter_name)
    if any(not layer.basis_sharing_pending[adapter_name] for layer in layers.values()):
        raise ValueError(f"adapter {adapter_name!r} is already compressed")
    if calibration is not None:
        check_token_windows(calibration, tuner.model, "calibration")
    if config.whitening and stats is None:
        if calibration is None:
            raise ValueError(
                "calibration data is missing: pass calibration= token windows or stats=, or "
                "set whitening=False"
            )
        names = [m for g in groups.values() for m in g.members]
        stats = collect_input_stats(
            tuner.model, calibration, names, batch_size, blocks=config.blocks
        )
    if config.update_coefficients and calibration is None:
        raise ValueError("update_coefficients=True needs calibration= token windows")
    factors = factorize(tuner.model, groups, stats, config)
    tuner.set_factors(adapter_name, factors, groups)
    if config.update_coefficients:
        from .update import update_coefficients_

        update_coefficients_(tuner.model, calibration, adapter_name, batch_size)
    if config.drop_dense_weights:
        for layer in layers.values():
            layer.drop_dense_weight()
    return parameter_counts(groups)


class BasisSharingModel(BaseTuner):
    """Replaces each planned ``nn.Linear`` / ``Conv1D`` with a ``basis_sharing.Linear``."""

    prefix: str = "basis_sharing_"
    tuner_layer_cls = BasisSharingLayer
    target_module_mapping: dict[str, list[str]] = {}

    def _prepare_adapter_config(self, peft_config, model_config):
        return peft_config  # target_modules come from the plan (make_plan)

    def _bank(self, name: str) -> nn.ModuleDict:
        if name not in self._modules:
            self.add_module(name, nn.ModuleDict())
        return self._modules[name]

    def inject_adapter(
        self,
        model: nn.Module,
        adapter_name: str,
        autocast_adapter_dtype: bool = True,
        low_cpu_mem_usage: bool = False,
        state_dict: dict[str, torch.Tensor] | None = None,
    ) -> None:
        config = self.peft_config[adapter_name]
        groups = make_plan(model, config)
        record = stamp_or_verify(model, config, peft_targets(model, config))
        planned = sorted(config.layer_groups)
        if record is not None and planned != sorted(record["modules"]):
            report(
                [f"layer_groups names {len(planned)} modules but the adapter was made for "
                 f"{len(record['modules'])}; was adapter_config.json edited?"],
                config, "does not fit its config",
            )  # fmt: skip
        dtype = next(model.parameters()).dtype
        device = next(model.parameters()).device
        bases = nn.ParameterDict(
            {
                g.key: nn.Parameter(
                    torch.zeros(g.rank, g.d_in, dtype=dtype, device=device),
                    requires_grad=config.train_bases and not config.inference_mode,
                )
                for g in groups.values()
            }
        )
        sigmas = BufferDict(
            {g.key: torch.zeros(g.rank, dtype=dtype, device=device) for g in groups.values()}
        )
        self._bank(BANK)[adapter_name] = bases
        self._bank(SIGMAS)[adapter_name] = sigmas
        super().inject_adapter(
            model,
            adapter_name,
            autocast_adapter_dtype=autocast_adapter_dtype,
            low_cpu_mem_usage=low_cpu_mem_usage,
            state_dict=state_dict,
        )

    def _create_and_replace(
        self,
        config: BasisSharingConfig,
        adapter_name: str,
        target: nn.Module,
        target_name: str,
        parent: nn.Module,
        current_key: str,
        **kwargs,
    ) -> None:
        key = config.layer_groups[current_key]
        rank = int(config.group_ranks[key])
        train = config.train_coefficients
        if isinstance(target, BasisSharingLayer):
            target.update_layer(adapter_name, key, rank, train, config.inference_mode)
            return
        new_module = Linear(
            target, adapter_name, key, rank, self._bank(BANK), train, config.inference_mode
        )
        if adapter_name not in self.active_adapters:
            new_module.requires_grad_(False)
        self._replace_module(parent, target_name, new_module, target)

    def _mark_only_adapters_as_trainable(self, model: nn.Module) -> None:
        super()._mark_only_adapters_as_trainable(model)
        for adapter in self.active_adapters:
            config = self.peft_config[adapter]
            if config.inference_mode:
                continue
            for layer in self.layers(adapter).values():
                layer.basis_sharing_coefficient[adapter].requires_grad_(config.train_coefficients)
            for basis in self._bank(BANK)[adapter].values():
                basis.requires_grad_(config.train_bases)

    def layers(self, adapter_name: str) -> dict[str, BasisSharingLayer]:
        """``{module name: layer}`` of the layers that hold ``adapter_name``."""
        return {
            name: module
            for name, module in self.model.named_modules()
            if isinstance(module, BasisSharingLayer)
            and adapter_name in module.basis_sharing_coefficient
        }

    @torch.no_grad()
    def set_factors(
        self, adapter_name: str, factors: Mapping[str, SharedFactors], groups: Mapping[str, Group]
    ) -> None:
        """Write bases, singular values and coefficients in place; layers stop being pending."""
        bases = self._bank(BANK)[adapter_name]
        sigmas = self._bank(SIGMAS)[adapter_name]
        layers = self.layers(adapter_name)
        for key, factor in factors.items():
            bases[key].copy_(factor.basis)
            sigmas[key].copy_(factor.singular_values)
            for member, coefficient in zip(groups[key].members, factor.coefficients, strict=True):
                layers[member].basis_sharing_coefficient[adapter_name].copy_(coefficient)
        for layer in layers.values():
            layer.basis_sharing_pending[adapter_name] = False

    def parameter_counts(self, adapter_name: str = "default") -> dict[str, int]:
        return parameter_counts(make_plan(self.model, self.peft_config[adapter_name]))

    def add_weighted_adapter(self, adapters, weights, adapter_name, **kwargs) -> None:
        """Refused: each adapter has its own bases, and a weighted sum of factorizations is
        not a factorization."""
        raise NotImplementedError(
            "basis_sharing has no add_weighted_adapter: each adapter's shared bases come from "
            "its own SVD, so their coefficients cannot be mixed. merge_and_unload() each "
            "compressed model into a dense one and merge those with hf_sparse.merging.merge_"
        )

    def unload(self) -> nn.Module:
        raise ValueError(
            "basis_sharing replaced the dense weights; unload() would return a model without "
            "them. Use merge_and_unload() for a dense model with W = C B"
        )

    @classmethod
    def _get_adapter_state_dict(
        cls, model, config, adapter_name, state_dict, unwanted_adapter_names
    ):
        """Coefficients per layer plus each basis and its singular values once."""
        to_return = super()._get_adapter_state_dict(
            model, config, adapter_name, state_dict, unwanted_adapter_names
        )
        for bank in (BANK, SIGMAS):
            head = f"{_TUNER_PREFIX}{bank}.{adapter_name}."
            for key, value in state_dict.items():
                if key.startswith(head):
                    to_return[key] = value
        return to_return

    @classmethod
    def _remap_adapter_state_dict_for_load(cls, model, config, adapter_name, state_dict):
        """Bank keys get the adapter name back; loading marks the layers compressed."""
        remapped = {}
        for key, value in state_dict.items():
            for bank in (BANK, SIGMAS):
                head = f"{_TUNER_PREFIX}{bank}."
                if key.startswith(head) and key.count(".") == 2:
                    key = f"{head}{adapter_name}.{key[len(head) :]}"
            remapped[key] = value
        remapped = super()._remap_adapter_state_dict_for_load(model, config, adapter_name, remapped)
        check_loaded_tensors(model, config, adapter_name, cls.prefix, remapped)
        expected = [k for k in model.state_dict() if k.startswith(f"{_TUNER_PREFIX}{BANK}.")]
        expected = [k for k in expected if k.split(".")[2] == adapter_name]
        missing = [k for k in expected if k not in remapped]
        if missing:
            raise ValueError(
                f"the saved adapter lacks {len(missing)} shared basis tensor(s), e.g. "
                f"{missing[:3]}; it was not saved by hf_sparse's basis_sharing"
            )
        for module in model.modules():
            if isinstance(module, BasisSharingLayer) and adapter_name in module.basis_sharing_key:
                module.basis_sharing_pending[adapter_name] = False
                if config.drop_dense_weights and module.dense_weight_present():
                    module.drop_dense_weight()
        return remapped
