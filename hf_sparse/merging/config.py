"""What the user sets for a merge. YAML recipe keys are these field names (mergekit-like)."""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..config_utils import help_field
from .core import MERGE_METHODS, SIGN_METHODS, check_density, check_merge_method

HESSIAN_MODES = ("per_task", "shared")


@dataclass
class MergeConfig:
    """How task vectors are sparsified and combined.

    Example (Python)::

        config = MergeConfig(method="sparsegpt_tv", density=0.2, sequential=True)
        result = merge_(base_model, config, ["ft_a", "ft_b"], calibration=[windows_a, windows_b])

    The same settings in a recipe's ``parameters:`` block:
    ``{density: 0.2, sequential: true, hessians: per_task}`` with ``merge_method: sparsegpt_tv``.
    """

    method: str = help_field(
        f"Merge method: {sorted(MERGE_METHODS)}. sparsegpt_tv prunes each task vector with "
        "SparseGPT's OBS solver on the layer-input Hessian, then sums; sparsegpt_ties then "
        "elects signs like TIES; dare_sparsegpt / dare_sparsegpt_ties (DARE with error "
        "correction) divide the SparseGPT-kept entries by the density like DARE.",
        "ties",
    )
    density: float = help_field(
        "Fraction of each task vector kept, in (0, 1] (a model's own density overrides it).", 1.0
    )
    sign_method: str = help_field(
        f"TIES sign election: {list(SIGN_METHODS)} (sum of values, or majority of signs).",
        "total",
    )
    normalize: bool = help_field(
        "Divide the merged task vector by the summed weights of the contributing task vectors "
        "(mergekit's normalize). False = PEFT's convention (TIES divides by the count).",
        False,
    )
    sequential: bool = help_field(
        "OBS methods: compute each block's Hessians on inputs that went through the already "
        "merged earlier blocks (True), or all on the base model's inputs (False).",
        True,
    )
    hessians: str = help_field(
        f"OBS methods: {list(HESSIAN_MODES)}. per_task = each task vector is pruned with the "
        "Hessian of its own calibration data; shared = one Hessian from all calibration data.",
        "per_task",
    )
    rescale: bool = help_field(
        "OBS methods: after pruning, scale each row of the kept task vector by the least-squares "
        "factor that best reproduces X tau (not the specification's `rescale`: that one is "
        "dare_rescale).",
        False,
    )
    dare_rescale: bool = help_field(
        "OBS methods: divide the kept entries by the density after the solve (DARE's rescale, "
        "the specification's `rescale`); always on for dare_sparsegpt and dare_sparsegpt_ties.",
        False,
    )
    block_size: int = help_field("OBS methods: columns solved together.", 128)
    dampening: float = help_field(
        "OBS methods: fraction of mean(diag H) added to the diagonal before the Cholesky "
        "(raised tenfold on failure).",
        0.01,
    )
    targets: list[str] | None = help_field(
        "OBS methods: patterns of the decoder-block linears pruned with their Hessian (roles, "
        "class names, suffixes, 're:<regex>'); None = all. Other changed tensors (embeddings, "
        "norms, biases, untargeted linears) are trimmed by magnitude at the same density.",
        None,
    )
    blocks: str | None = help_field(
        "Dotted path or 're:' pattern of the decoder blocks. None = found from the model's "
        "`_no_split_modules`.",
        None,
    )
    seed: int = help_field("Seed of DARE's random drops.", 0)
    sparsity_profile: str = help_field(
        "OBS methods: 'uniform' (every targeted layer keeps `density` of its task vector) or "
        "'owl' (outlier-weighed layerwise sparsity, Yin et al. 2024: blocks whose "
        "|tau| * ||X|| scores hold more outliers, on the base model's activations, keep more; "
        "the overall density of each task vector stays exact).",
        "uniform",
    )
    owl_m: float = help_field("OWL: a score is an outlier above owl_m x its block's mean.", 5.0)
    owl_lambda: float = help_field("OWL: width 2*owl_lambda of the band of block sparsities.", 0.08)
    check_base: bool = help_field(
        "Refuse adapters whose recorded base_model_name_or_path differs from the base model.",
        True,
    )

    def __post_init__(self) -> None:
        check_merge_method(self.method)
        check_density(self.density)
        if self.sign_method not in SIGN_METHODS:
            raise ValueError(
                f"sign_method must be one of {list(SIGN_METHODS)}, got {self.sign_method!r}"
            )
        if self.hessians not in HESSIAN_MODES:
            raise ValueError(
                f"hessians must be one of {list(HESSIAN_MODES)}, got {self.hessians!r}"
            )
        if not isinstance(self.block_size, int) or self.block_size < 1:
            raise ValueError(f"block_size must be a positive integer, got {self.block_size!r}")
        if self.sparsity_profile not in ("uniform", "owl"):
            raise ValueError(
                f"sparsity_profile must be 'uniform' or 'owl', got {self.sparsity_profile!r}"
            )
        if self.sparsity_profile == "owl" and MERGE_METHODS[self.method].sparsify != "obs":
            raise ValueError(
                f"sparsity_profile 'owl' needs calibration activations: use it with an OBS method "
                f"(sparsegpt_tv, sparsegpt_ties), not {self.method!r}"
            )
        rule = MERGE_METHODS[self.method]
        if self.dare_rescale and rule.sparsify != "obs":
            raise ValueError(
                f"dare_rescale applies to OBS methods (sparsegpt_tv, sparsegpt_ties), not "
                f"{self.method!r}: DARE methods rescale already, magnitude ones never do"
            )
        if self.rescale and (self.dare_rescale or rule.density_rescale):
            raise ValueError(
                "rescale (least-squares row scale) and DARE's 1/density rescale undo each other: "
                "set rescale: false, or use sparsegpt_tv / sparsegpt_ties without dare_rescale"
            )
        if not isinstance(self.owl_m, int | float) or not self.owl_m > 0:
            raise ValueError(f"owl_m must be a positive number, got {self.owl_m!r}")
        if not isinstance(self.owl_lambda, int | float) or not 0 <= self.owl_lambda < 0.5:
            raise ValueError(f"owl_lambda must be in [0, 0.5), got {self.owl_lambda!r}")
        if not isinstance(self.dampening, int | float) or not (
            math.isfinite(self.dampening) and self.dampening > 0
        ):
            raise ValueError(f"dampening must be a positive number, got {self.dampening!r}")

    @property
    def needs_calibration(self) -> bool:
        return MERGE_METHODS[self.method].sparsify == "obs"


@dataclass
class MergeSource:
    """One fine-tuned model or adapter folder, with its weight and (optional) density."""

    model: str = help_field("Folder of a fine-tuned model (save_pretrained) or of an adapter.")
    weight: float = help_field("Weight of this task vector in the combination.", 1.0)
    density: float | None = help_field(
        "Kept fraction of this task vector; None = the merge's density.", None
    )

    def __post_init__(self) -> None:
        if isinstance(self.weight, bool) or not isinstance(self.weight, int | float):
            raise ValueError(f"weight of {self.model} must be a number, got {self.weight!r}")
        if not math.isfinite(self.weight):
            raise ValueError(f"weight of {self.model} must be finite, got {self.weight!r}")
        if self.density is not None:
            check_density(self.density)


TASK_VECTOR_PRUNE_METHODS = ("sparsegpt_tv", "magnitude_prune")


@dataclass
class TaskVectorPruneConfig:
    """Pruning one fine-tune's task vector against its base (``TaskVectorPruneCallback``).

    ``method`` is a merge method of one task: ``sparsegpt_tv`` (SparseGPT's OBS solver on the
    base model's layer-input Hessians) or ``magnitude_prune`` (TIES' magnitude trim).
    """

    method: str = help_field(
        f"One of {list(TASK_VECTOR_PRUNE_METHODS)} (names of MERGE_METHODS).", "sparsegpt_tv"
    )
    density: float = help_field("Kept fraction of each target's task vector, in (0, 1].", 0.1)
    calibration_samples: int = help_field(
        "sparsegpt_tv: first training samples whose base-model Hessians are used.", 32
    )
    targets: list[str] | None = help_field(
        "Decoder-block linears (roles, class names, suffixes, 're:'); None = all.", None
    )
    blocks: str | None = help_field(
        "Dotted path or 're:' pattern of the decoder-block ModuleList; None = found from the "
        "model's `_no_split_modules`.",
        None,
    )
    block_size: int = help_field("sparsegpt_tv: columns solved together.", 128)
    dampening: float = help_field("sparsegpt_tv: fraction of mean(diag H) added.", 0.01)
    rescale: bool = help_field(
        "sparsegpt_tv: scale each kept row by the least-squares factor that best reproduces X tau.",
        False,
    )

    def __post_init__(self) -> None:
        if self.method not in TASK_VECTOR_PRUNE_METHODS:
            raise ValueError(
                f"task-vector pruning method must be one of {list(TASK_VECTOR_PRUNE_METHODS)}, "
                f"got {self.method!r}"
            )
        check_density(self.density)
        for name in ("calibration_samples", "block_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if not 0 < float(self.dampening) < 1:
            raise ValueError(f"dampening must be in (0, 1), got {self.dampening!r}")
