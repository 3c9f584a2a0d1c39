"""Adapter integrity: a saved adapter records what it was made from; loading checks it.

An hf_sparse adapter (``MASKED_LR``, ``BASIS_SHARING``, ``SPD``) is only meaningful on the base
it was made from: SPD components decompose *those* weights, Basis Sharing coefficients replace
them, a masked delta is added to them. So ``adapter_config.json`` carries a ``base_record``:

    {"version": 1, "model_type": "llama",
     "modules": {"model.layers.0.mlp.up_proj": {"shape": [64, 32], "probe": [6 floats]}, ...},
     "rows_sha256": "<sha256 of three fp32 rows of every targeted weight, in module order>"}

Lifecycle:
  creating an adapter (``get_*_model``)  -> the tuner stamps the record from the base (before
                                            any weight is replaced or dropped)
  ``save_pretrained``                    -> the record goes into adapter_config.json
  ``PeftModel.from_pretrained`` / ``load_adapter``
      1. before any layer is replaced: the architecture, the exact module list the config
         selects on this base (an edited ``target_modules`` shows here), every shape, and the
         weights (the row digest; on a mismatch the probes, with a tolerance that accepts the
         same base in another dtype) are compared with the record;
      2. when the file's tensors are loaded: every tensor the configuration needs must be in
         the file with its shape, and the file may hold no tensor that nothing uses, so a
         loaded adapter never keeps a randomly initialised component.

A difference is an ``AdapterIntegrityError`` naming it. ``integrity: warn`` in the config, or
``PeftModel.from_pretrained(base, folder, hf_sparse_strict=False)``, turns it into a warning.
"""

from __future__ import annotations

import hashlib
import logging
import math
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from peft import PeftConfig
from peft.tuners.tuners_utils import BaseTunerLayer, check_target_module_exists
from torch import nn
from transformers.pytorch_utils import Conv1D

from .config_utils import help_field
from .models import model_type, weight_matrix

logger = logging.getLogger(__name__)

RECORD_VERSION = 1
INTEGRITY_MODES = ("strict", "warn")
STRICT_KWARG = "hf_sparse_strict"
_PROBES = 6
_SHOWN = 4
_RTOL, _ATOL = 2e-2, 1e-6  # bf16 keeps ~3 significant digits; a different base differs wholly


class AdapterIntegrityError(ValueError):
    """A saved adapter does not fit the base or the files it is loaded with."""


def check_integrity_mode(value: object) -> None:
    if value not in INTEGRITY_MODES:
        raise ValueError(
            f"integrity must be one of {list(INTEGRITY_MODES)}, got {value!r}; 'warn' loads a "
            "mismatched adapter with a warning instead of an error"
        )


def load_config(cls, super_from_pretrained, path, subfolder, kwargs: dict[str, Any]):
    """``PeftConfig.from_pretrained`` for our configs: marks the config as loaded (so the
    tuner verifies instead of stamping) and applies ``hf_sparse_strict`` when given."""
    strict = kwargs.pop(STRICT_KWARG, None)
    config = super_from_pretrained(path, subfolder=subfolder, **kwargs)
    config._hf_sparse_loaded = True
    if strict is not None:
        config.integrity = "strict" if strict else "warn"
    return config


@dataclass
class IntegrityCheckedConfig(PeftConfig):
    """The fields and loading every hf_sparse PEFT config shares: the ``base_record`` stamped
    when the adapter is made and checked when it is loaded, and the ``integrity`` mode."""

    base_record: dict | None = help_field(
        "Filled when the adapter is made: what it was made from (model type, the exact adapted "
        "modules with their shapes, a fingerprint of their base weights). Loading checks it "
        "(hf_sparse.integrity). Leave None.",
        None,
    )
    integrity: str = help_field(
        "'strict': loading on another base, with an edited config, or with missing or extra "
        "tensors is an AdapterIntegrityError; 'warn': a warning (also: "
        "PeftModel.from_pretrained(..., hf_sparse_strict=False)).",
        "strict",
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        check_integrity_mode(self.integrity)

    @classmethod
    def from_pretrained(
        cls, pretrained_model_name_or_path: str, subfolder: str | None = None, **kwargs
    ):
        """Load a saved config (marked as loaded, so the tuner checks its ``base_record``);
        ``hf_sparse_strict=False`` downgrades integrity errors to warnings."""
        return load_config(
            cls, super().from_pretrained, pretrained_model_name_or_path, subfolder, kwargs
        )


def _shape(module: nn.Module) -> tuple[int, int]:
    """``(d_out, d_in)`` from the layer's attributes (also once its weight was dropped)."""
    if isinstance(module, Conv1D):
        return int(module.nf), int(module.weight.shape[0] if module.weight.numel() else module.nx)
    if isinstance(module, nn.Linear):
        return int(module.out_features), int(module.in_features)
    return tuple(int(d) for d in weight_matrix(module).shape)  # type: ignore[return-value]


def _rows(d_out: int) -> list[int]:
    return sorted({0, d_out // 2, d_out - 1})


def _readable(module: nn.Module) -> torch.Tensor | None:
    """The ``[out, in]`` weight if it can be fingerprinted (present, real, floating point)."""
    weight = getattr(module, "weight", None)
    if weight is None or weight.numel() == 0 or weight.device.type == "meta":
        return None
    if not weight.dtype.is_floating_point:
        return None  # quantized storage
    return weight_matrix(module).detach()


def _fingerprint(modules: Mapping[str, nn.Module]) -> tuple[str | None, dict[str, list[float]]]:
    """The sha256 of three fp32 rows of every weight (module order) and six probe values per
    weight; ``(None, {})`` when some weight cannot be read."""
    digest = hashlib.sha256()
    probes: dict[str, list[float]] = {}
    for name in sorted(modules):
        weight = _readable(modules[name])
        if weight is None:
            return None, {}
        d_out, d_in = weight.shape
        rows = weight[_rows(d_out)].float().cpu().contiguous()
        digest.update(name.encode())
        digest.update(rows.numpy().tobytes())
        cols = [(2 * i + 1) * d_in // (2 * _PROBES) for i in range(_PROBES)]
        picks = [rows[i % rows.shape[0], c].item() for i, c in enumerate(cols)]
        probes[name] = [float(f"{v:.7g}") for v in picks]
    return digest.hexdigest(), probes


def base_record(model: nn.Module, modules: Mapping[str, nn.Module]) -> dict[str, Any]:
    """What an adapter on ``modules`` (``{name: base layer}``) of ``model`` was made from."""
    sha, probes = _fingerprint(modules)
    return {
        "version": RECORD_VERSION,
        "model_type": model_type(model),
        "modules": {
            name: {"shape": list(_shape(modules[name])), "probe": probes.get(name)}
            for name in sorted(modules)
        },
        "rows_sha256": sha,
    }


def peft_targets(model: nn.Module, config) -> dict[str, nn.Module]:
    """``{name: base layer}`` of the modules peft's rules select with ``config`` on ``model``
    (inside adapted layers only the layer itself, seen through its ``base_layer``)."""
    targets, inside = {}, []
    for name, module in model.named_modules():
        if not name or any(name.startswith(prefix) for prefix in inside):
            continue
        if isinstance(module, BaseTunerLayer):
            inside.append(name + ".")
        if check_target_module_exists(config, name):
            base = module.get_base_layer() if isinstance(module, BaseTunerLayer) else module
            targets[name] = base
    return targets


def _listed(names: list[str]) -> str:
    more = f" and {len(names) - _SHOWN} more" if len(names) > _SHOWN else ""
    return f"{names[:_SHOWN]}{more}"


def base_differences(model: nn.Module, record: Mapping[str, Any], targets: Mapping[str, nn.Module]):
    """The ways ``model`` (with the modules the config selects on it) differs from ``record``,
    as sentences; empty when it is the base the adapter was made from."""
    problems = []
    here_type = model_type(model)
    if record.get("model_type") not in (None, here_type):
        problems.append(f"it was made for a {record['model_type']} model, this base is {here_type}")
    recorded = dict(record.get("modules") or {})
    missing = sorted(set(recorded) - set(targets))
    extra = sorted(set(targets) - set(recorded))
    if missing or extra:
        names = {n for n, _ in model.named_modules()}
        absent = [n for n in missing if n not in names]
        if absent:
            problems.append(
                f"this base has no module {_listed(absent)} that the adapter adapts: it was "
                f"made for another model ({len(recorded)} adapted modules)"
            )
        else:
            problems.append(
                "the config's target_modules selects "
                + (f"{_listed(extra)}, " if extra else "")
                + (f"but not {_listed(missing)}, " if missing else "")
                + f"while the adapter was made for exactly {len(recorded)} modules; was "
                "adapter_config.json edited? Restore it or re-create the adapter"
            )
    common = sorted(set(recorded) & set(targets))
    shapes = [
        f"{n}: {list(_shape(targets[n]))} here, {recorded[n]['shape']} in the adapter"
        for n in common
        if list(_shape(targets[n])) != list(recorded[n]["shape"])
    ]
    if shapes:
        problems.append(f"shapes differ ({_listed(shapes)}): the adapter was made for another base")
    if problems or not common:
        return problems
    weights = _weight_difference(record, {n: targets[n] for n in common})
    if weights:
        problems.append(weights)
    return problems


def _weight_difference(record: Mapping[str, Any], targets: Mapping[str, nn.Module]) -> str | None:
    if record.get("rows_sha256") is None:
        return None
    sha, probes = _fingerprint(targets)
    if sha is None:
        logger.warning(
            "the base weights of the adapted modules cannot be read (dropped, quantized or on "
            "the meta device): only the module list and shapes were checked"
        )
        return None
    if sha == record["rows_sha256"]:
        return None
    for name in sorted(targets):
        saved = record["modules"][name].get("probe")
        here = probes[name]
        if saved is None:
            continue
        for a, b in zip(here, saved, strict=True):
            if not math.isclose(a, b, rel_tol=_RTOL, abs_tol=_ATOL):
                return (
                    f"the base weights differ from those the adapter was made from (e.g. "
                    f"{name}: {a:.6g} here, {b:.6g} when it was made): load the base model "
                    "it was trained on"
                )
    logger.info("base weights match the adapter's record up to rounding (another dtype?)")
    return None


def report(problems: list[str], config, what: str) -> None:
    """Raise (``integrity: strict``) or warn (``warn``) about ``problems``."""
    if not problems:
        return
    method = str(getattr(config.peft_type, "value", config.peft_type))
    message = f"{method} adapter {what}: " + "; ".join(problems)
    if getattr(config, "integrity", "strict") == "warn":
        warnings.warn(message + " (loaded anyway: integrity='warn')", stacklevel=3)
        logger.warning("%s (loaded anyway: integrity='warn')", message)
        return
    raise AdapterIntegrityError(
        message + f". To load it anyway pass {STRICT_KWARG}=False to PeftModel.from_pretrained "
        '(or set "integrity": "warn" in adapter_config.json)'
    )


def stamp_or_verify(model: nn.Module, config, targets: Mapping[str, nn.Module]) -> dict | None:
    """At injection: a loaded config's record is checked against ``model`` (before any layer
    is replaced); a new adapter gets a fresh record. Returns the record the adapter carries."""
    if getattr(config, "_hf_sparse_loaded", False):
        record = config.base_record
        if record is None:  # saved before records existed: say so, check the tensors only
            message = (
                f"{config.peft_type} adapter carries no base_record (saved before hf_sparse "
                "recorded one): its base cannot be checked; load it on its base and re-save it"
            )
            warnings.warn(message, stacklevel=3)
            logger.warning(message)
            return None
        report(base_differences(model, record, targets), config, "does not fit this base")
        return record
    config.base_record = base_record(model, targets)
    return config.base_record


def _adapter_keys(model: nn.Module, prefix: str, adapter_name: str) -> dict[str, torch.Size]:
    """``{state-dict key: shape}`` of every tensor of ``adapter_name`` in ``model``."""
    keys = {}
    for key, tensor in model.state_dict(keep_vars=True).items():
        parts = key.split(".")
        if any(
            part.startswith(prefix) and parts[i + 1 : i + 2] == [adapter_name]
            for i, part in enumerate(parts)
        ):
            keys[key] = tensor.shape
    return keys


def check_loaded_tensors(
    model: nn.Module, config, adapter_name: str, prefix: str, state_dict: Mapping[str, Any]
) -> None:
    """The file's tensors (remapped to ``model``'s keys) against what the adapter holds:
    missing ones would stay randomly initialised, extra ones would be dropped silently, and a
    wrong shape is a file from another configuration."""
    expected = _adapter_keys(model, prefix, adapter_name)
    given = {k: v for k, v in state_dict.items() if prefix in k}

    def strip(key: str) -> str:
        return key.replace(f".{adapter_name}", "", 1).removeprefix("base_model.model.")

    problems = []
    missing = sorted(set(expected) - set(given))
    if missing:
        problems.append(
            f"the adapter file lacks {len(missing)} tensor(s) the configuration needs "
            f"({_listed([strip(k) for k in missing])}); they would stay randomly initialised"
        )
    extra = sorted(set(given) - set(expected))
    if extra:
        problems.append(
            f"the adapter file holds {len(extra)} tensor(s) no adapted module uses "
            f"({_listed([strip(k) for k in extra])}); the config was edited or the file "
            "belongs to another adapter"
        )
    shapes = [
        f"{strip(k)}: {list(given[k].shape)} in the file, {list(expected[k])} expected"
        for k in sorted(set(given) & set(expected))
        if expected[k] != given[k].shape and expected[k].numel() != 0
    ]
    if shapes:
        problems.append(f"tensor shapes differ ({_listed(shapes)})")
    report(problems, config, "does not match its file")
