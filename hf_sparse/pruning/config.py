"""What the user sets for one-shot pruning. YAML recipe keys are these field names."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from ..config_utils import from_dict, help_field
from .core import NMPattern, check_sparsity, parse_mask_structure


@dataclass
class PruningConfig:
    """Settings shared by every pruning method.

    Example recipe entry: ``sparsegpt: {sparsity: 0.5, mask: "2:4", ignore: [lm_head]}``.
    """

    method: ClassVar[str] = ""
    needs_calibration: ClassVar[bool] = True

    sparsity: float | None = help_field(
        "Fraction of weights to remove in each target layer, in [0, 1). With an N:M mask it "
        "may be left out (it follows from N:M) or must equal 1 - N/M.",
        None,
    )
    mask: str = help_field(
        "'unstructured', or 'N:M' = at most N non-zeros in every M consecutive inputs "
        "(e.g. '2:4', '4:8').",
        "unstructured",
    )
    targets: list[str] | None = help_field(
        "Patterns of the linears to prune inside the decoder blocks: roles (q, k, v, o, qkv, "
        "gate, up, gate_up, down, fc1, fc2), class names (Linear, Conv1D, ExpertLinear = one "
        "expert of stacked MoE experts, named <experts>.<param>.<e>), name suffixes, or "
        "'re:<regex>'. None = every linear in the decoder blocks. MoE routers are never pruned.",
        None,
    )
    ignore: list[str] = help_field(
        "Patterns of linears never to prune (same syntax as targets).", ["lm_head"]
    )
    sparsity_per_layer: dict[str, float] = help_field(
        "Per-layer overrides: {pattern: sparsity}; the first matching pattern wins "
        "(unstructured masks only).",
        {},
    )
    blocks: str | None = help_field(
        "Dotted path or 're:' pattern of the ModuleList of decoder blocks. None = found from the "
        "model (the ModuleList of its `_no_split_modules` layers); needed only for models that "
        "do not name their layer class there.",
        None,
    )

    def __post_init__(self) -> None:
        pattern = parse_mask_structure(self.mask)
        if pattern is None:
            if self.sparsity is None:
                raise ValueError("sparsity is required for an unstructured mask (e.g. 0.5)")
            check_sparsity(self.sparsity)
        elif self.sparsity is None:
            self.sparsity = pattern.sparsity
        elif abs(check_sparsity(self.sparsity) - pattern.sparsity) > 1e-9:
            raise ValueError(
                f"sparsity {self.sparsity} contradicts mask {self.mask!r} "
                f"(which removes {pattern.sparsity:g}); drop sparsity or make them agree"
            )
        if self.sparsity_per_layer and pattern is not None:
            raise ValueError("sparsity_per_layer works with unstructured masks only")
        for key, value in self.sparsity_per_layer.items():
            check_sparsity(value, f"sparsity_per_layer[{key!r}]")
        if self.targets is not None and (
            isinstance(self.targets, str) or not all(isinstance(t, str) for t in self.targets)
        ):
            raise ValueError(f"targets must be a list of strings, got {self.targets!r}")
        if isinstance(self.ignore, str):
            raise ValueError(f"ignore must be a list of strings, got {self.ignore!r}")

    @property
    def pattern(self) -> NMPattern | None:
        return parse_mask_structure(self.mask)


@dataclass
class MagnitudeConfig(PruningConfig):
    """Remove the smallest ``|w|`` of each layer. Needs no calibration data."""

    method: ClassVar[str] = "magnitude"
    needs_calibration: ClassVar[bool] = False


@dataclass
class WandaConfig(PruningConfig):
    """Wanda (Sun et al., ICLR 2024): remove the smallest ``|w| * ||x||`` in each output row."""

    method: ClassVar[str] = "wanda"


@dataclass
class SparseGPTConfig(PruningConfig):
    """SparseGPT (Frantar & Alistarh, ICML 2023): OBS pruning with error correction."""

    method: ClassVar[str] = "sparsegpt"

    block_size: int = help_field("Columns processed together by the OBS solver.", 128)
    dampening: float = help_field(
        "Damping added to the Hessian diagonal, as a fraction of its mean (retried x10 on a "
        "failed Cholesky).",
        0.01,
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.block_size, int) or self.block_size < 1:
            raise ValueError(f"block_size must be a positive integer, got {self.block_size!r}")
        if not 0 < float(self.dampening) < 1:
            raise ValueError(f"dampening must be in (0, 1), got {self.dampening!r}")


PRUNING_METHODS: dict[str, type[PruningConfig]] = {
    cls.method: cls for cls in (MagnitudeConfig, WandaConfig, SparseGPTConfig)
}


def pruning_config_from_dict(method: str, values: dict[str, Any] | None) -> PruningConfig:
    """``("sparsegpt", {"sparsity": 0.5})`` -> ``SparseGPTConfig(sparsity=0.5)``."""
    if method not in PRUNING_METHODS:
        raise ValueError(f"unknown pruning method {method!r}; valid: {sorted(PRUNING_METHODS)}")
    return from_dict(PRUNING_METHODS[method], values, where=f"pruning method {method!r}")
