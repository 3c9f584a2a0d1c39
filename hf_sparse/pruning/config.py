"""What the user sets for one-shot pruning. YAML recipe keys are these field names."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from ..config_utils import from_dict, help_field
from .core import NMPattern, check_sparsity, parse_mask_structure

SPARSITY_PROFILES = ("uniform", "owl")
WANDA_SCORES = ("wanda", "ria")
COMPUTE_DTYPES = ("float32", "float64")
REDUCTIONS = ("ordered", "sum")


@dataclass
class PruningConfig:
    """Settings shared by every pruning method.

    Example recipe entry: ``sparsegpt: {sparsity: 0.5, mask: "2:4", ignore: [lm_head]}``.
    """

    method: ClassVar[str] = ""
    uses_activations: ClassVar[bool] = True
    refinements: ClassVar[tuple[str, ...]] = ("none",)

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
    sparsity_profile: str = help_field(
        f"How the sparsity is spread over the decoder blocks: {list(SPARSITY_PROFILES)}. "
        "'owl' = outlier-weighed layerwise sparsity (Yin et al. 2024): blocks whose |W|*||X|| "
        "scores hold more outliers (above owl_m x the block mean, on the dense model's "
        "activations) are pruned less, within a band of width 2*owl_lambda; the overall "
        "sparsity stays exact. Unstructured masks only.",
        "uniform",
    )
    owl_m: float = help_field("OWL: a score is an outlier above owl_m x its block's mean.", 5.0)
    owl_lambda: float = help_field(
        "OWL: the block sparsities span a band of width 2*owl_lambda whose parameter-weighted "
        "mean is the target (the paper's [S - lambda, S + lambda] when the outlier shares are "
        "spread evenly).",
        0.08,
    )
    refine: str = help_field(
        "Training-free mask refinement after selection: 'none', or 'dsnot' (DSnoT, Zhang et al. "
        "ICLR 2024: swap pruned and kept weights of each output row to cancel the mean output "
        "error; magnitude and Wanda only).",
        "none",
    )
    refine_iterations: int = help_field("DSnoT: swap rounds per output row (the paper: 50).", 50)
    compute_dtype: str = help_field(
        f"Precision of the activation statistics and of the solves: {list(COMPUTE_DTYPES)}. "
        "Weights are written back in the model's own dtype (bf16, fp16, fp32).",
        "float32",
    )
    device: str | None = help_field(
        "Where each decoder block computes its statistics and solve ('cpu', 'cuda', "
        "'cuda:1'); None = CUDA when present, else the CPU. The model itself may stay on the "
        "CPU or be dispatched/offloaded by accelerate (device_map, offload_folder): blocks are "
        "moved there one at a time and back.",
        None,
    )
    offload_inputs: bool = help_field(
        "Keep the calibration inputs of the blocks on the CPU between stages (moved to the "
        "device batch by batch): less device memory, some transfer time.",
        False,
    )
    reduction: str = help_field(
        f"How statistics are summed over batches and processes: {list(REDUCTIONS)}. "
        "'ordered' = each batch's terms summed in a fixed tree over its position in the whole "
        "calibration set: the same bits (hence the same masks) on any number of processes, "
        "given contiguous shards (shard_for_rank) whose sizes are multiples of batch_size; "
        "'sum' = running sums all-reduced (no partial sums kept, but 1 and N processes "
        "differ in the last bits, which flips near-tied SparseGPT choices).",
        "ordered",
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
        self._check_method_options(pattern)

    def _check_method_options(self, pattern: NMPattern | None) -> None:
        if self.sparsity_profile not in SPARSITY_PROFILES:
            raise ValueError(
                f"sparsity_profile must be one of {list(SPARSITY_PROFILES)}, "
                f"got {self.sparsity_profile!r}"
            )
        if self.owl:
            if pattern is not None:
                raise ValueError(
                    f"sparsity_profile 'owl' needs an unstructured mask: an N:M mask ({self.mask}) "
                    "fixes every layer's sparsity; drop one of them"
                )
            if self.sparsity_per_layer:
                raise ValueError("sparsity_profile 'owl' and sparsity_per_layer exclude each other")
        if not isinstance(self.owl_m, int | float) or not self.owl_m > 0:
            raise ValueError(f"owl_m must be a positive number, got {self.owl_m!r}")
        if not isinstance(self.owl_lambda, int | float) or not 0 <= self.owl_lambda < 0.5:
            raise ValueError(f"owl_lambda must be in [0, 0.5), got {self.owl_lambda!r}")
        if self.refine not in self.refinements:
            raise ValueError(
                f"refine={self.refine!r} is not available for {self.method or 'this method'}; "
                f"valid: {list(self.refinements)}"
            )
        if not isinstance(self.offload_inputs, bool):
            raise ValueError(f"offload_inputs must be true or false, got {self.offload_inputs!r}")
        if self.device is not None and not isinstance(self.device, str):
            raise ValueError(
                f"device must be a string such as 'cpu' or 'cuda', got {self.device!r}"
            )
        for key, valid in (("compute_dtype", COMPUTE_DTYPES), ("reduction", REDUCTIONS)):
            if getattr(self, key) not in valid:
                raise ValueError(f"{key} must be one of {list(valid)}, got {getattr(self, key)!r}")
        if not isinstance(self.refine_iterations, int) or self.refine_iterations < 1:
            raise ValueError(
                f"refine_iterations must be a positive integer, got {self.refine_iterations!r}"
            )

    @property
    def owl(self) -> bool:
        return self.sparsity_profile == "owl"

    @property
    def needs_calibration(self) -> bool:
        """Activations are needed by the method, by OWL's outlier shares, or by a refinement."""
        return self.uses_activations or self.owl or self.refine != "none"

    @property
    def pattern(self) -> NMPattern | None:
        return parse_mask_structure(self.mask)

    @property
    def dtype(self) -> torch.dtype:
        """The torch dtype of ``compute_dtype``."""
        return getattr(torch, self.compute_dtype)


@dataclass
class MagnitudeConfig(PruningConfig):
    """Remove the smallest ``|w|`` of each layer. Needs no calibration data."""

    method: ClassVar[str] = "magnitude"
    uses_activations: ClassVar[bool] = False
    refinements: ClassVar[tuple[str, ...]] = ("none", "dsnot")


@dataclass
class WandaConfig(PruningConfig):
    """Wanda (Sun et al., ICLR 2024): remove the smallest ``|w| * ||x||`` in each output row."""

    method: ClassVar[str] = "wanda"
    refinements: ClassVar[tuple[str, ...]] = ("none", "dsnot")

    score: str = help_field(
        f"Importance score: {list(WANDA_SCORES)}. 'wanda' = |W_ij| ||X_j|| compared within "
        "each output row; 'ria' = relative importance and activations (Zhang et al., ICLR "
        "2024): (|W_ij| / sum_k |W_kj| + |W_ij| / sum_k |W_ik|) ||X_j||^0.5, compared over "
        "the whole layer (N:M: within each group).",
        "wanda",
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.score not in WANDA_SCORES:
            raise ValueError(f"score must be one of {list(WANDA_SCORES)}, got {self.score!r}")


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
