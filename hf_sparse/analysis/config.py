"""What the user sets for a critical-weight study. YAML recipe keys are these field names."""

from __future__ import annotations

from dataclasses import dataclass

from ..config_utils import check_positive_ints, help_field
from ..data import check_data_source
from ..importance import IMPORTANCE_METRICS
from .clustering import CLUSTER_METHODS, PROFILE_LEVELS
from .controls import RANKING_MODES
from .downstream import DOWNSTREAM_TASKS
from .perturb import check_perturbation


@dataclass
class PerturbationSpec:
    kind: str = help_field("zero, sign_flip, scale or noise.", "zero")
    strengths: list[float] = help_field(
        "Strengths, one curve point each (scale factor; noise: multiples of the weight's std).",
        [1.0],
    )

    def __post_init__(self) -> None:
        if not self.strengths:
            raise ValueError(f"perturbation {self.kind!r} needs at least one strength")
        for strength in self.strengths:
            check_perturbation(self.kind, strength)


@dataclass
class AnalysisConfig:
    """A complete study: scores, top-k set, perturbations with controls, stability,
    breakdown, clustering, downstream tasks. See ``recipes/critical-weights.yaml``."""

    metric: str = help_field(f"Importance metric: {sorted(IMPORTANCE_METRICS)}.", "fisher")
    top_k: float | int = help_field(
        "Size of the critical set: a count (int) or a percentage of the scored entries (float).",
        0.01,
    )
    mode: str = help_field(
        f"Ranking mode {list(RANKING_MODES)}: one global ranking, top-k per layer (tensor), or "
        "per attention head.",
        "global",
    )
    params: list[str] | None = help_field(
        "Parameters to score (roles, class names, suffixes, 're:'); None = decoder-block linears.",
        None,
    )
    blocks: str | None = help_field(
        "Dotted path or 're:' pattern of the decoder-block ModuleList; None = found from the "
        "model's `_no_split_modules`.",
        None,
    )
    dataset: str = help_field("Text the scores are computed on (calibration split).", "wikitext2")
    num_samples: int = help_field("Scoring samples (windows).", 16)
    sequence_length: int = help_field("Tokens per scoring window.", 256)
    eval_dataset: str = help_field(
        "Text the effects are measured on (evaluation split).", "wikitext2"
    )
    eval_windows: int = help_field("Evaluation windows for perplexity and KL.", 4)
    eval_length: int = help_field("Tokens per evaluation window.", 256)
    perturbations: list[PerturbationSpec] = help_field(
        "Perturbations of the top-k set, each with its strengths.", [PerturbationSpec()]
    )
    progressive_k: list[float | int] = help_field(
        "k values of the progressive curve (counts or percentages); empty = only top_k.", []
    )
    targets: list[str] = help_field(
        "Targeted perturbations: 'all', a component (q, k, v, o, gate, up, down, ...), "
        "'attention', 'mlp', or 'layers:A-B'.",
        ["all"],
    )
    control_seeds: int = help_field("Random control sets per point.", 3)
    stability_seeds: list[int] = help_field(
        "Seeds of the scoring-sample draw (and Hutchinson probes): one score set each.", [0, 1, 2]
    )
    stability_subsets: int = help_field(
        "Disjoint subsets of the scoring samples scored separately (0 = skip).", 2
    )
    checkpoints: list[str] = help_field(
        "Checkpoint folders of one training run to compare (same architecture).", []
    )
    cluster_method: str = help_field(f"Clustering: {list(CLUSTER_METHODS)}.", "kmeans")
    cluster_level: str = help_field(f"Profiles per {list(PROFILE_LEVELS)}.", "tensor")
    n_clusters: int = help_field("k-means clusters.", 4)
    cluster_perturbation: bool = help_field(
        "Perturb the top-k entries of one cluster at a time (first perturbation, first "
        "strength), with control_seeds same-size random sets from the same cluster's weights.",
        True,
    )
    single_weight_candidates: int = help_field(
        "Top-ranked weights zeroed one at a time (perplexity each); 0 = skip.", 8
    )
    downstream_tasks: list[str] = help_field(
        "lm-eval tasks on local files, before and after zeroing the top-k: "
        f"{list(DOWNSTREAM_TASKS)}.",
        [],
    )
    downstream_limit: int = help_field("Examples per downstream task.", 100)
    seed: int = help_field("Seed of the sample draw and the controls.", 0)

    def __post_init__(self) -> None:
        if self.metric not in IMPORTANCE_METRICS:
            raise ValueError(f"unknown metric {self.metric!r}; valid: {sorted(IMPORTANCE_METRICS)}")
        if self.mode not in RANKING_MODES:
            raise ValueError(f"unknown mode {self.mode!r}; valid: {list(RANKING_MODES)}")
        if self.cluster_method not in CLUSTER_METHODS:
            valid = list(CLUSTER_METHODS)
            raise ValueError(f"cluster_method must be one of {valid}, got {self.cluster_method!r}")
        if self.cluster_level not in PROFILE_LEVELS:
            raise ValueError(
                f"cluster_level must be one of {list(PROFILE_LEVELS)}, got {self.cluster_level!r}"
            )
        for task in self.downstream_tasks:
            if task not in DOWNSTREAM_TASKS:
                raise ValueError(
                    f"unknown downstream task {task!r}; valid: {list(DOWNSTREAM_TASKS)}"
                )
        self.perturbations = [
            p if isinstance(p, PerturbationSpec) else PerturbationSpec(**p)
            for p in self.perturbations
        ]
        check_positive_ints(
            self,
            ("num_samples", "sequence_length", "eval_windows", "eval_length", "control_seeds",
             "n_clusters", "downstream_limit"),
            "analysis",
        )  # fmt: skip
        check_data_source(self.dataset)
        check_data_source(self.eval_dataset)
        for name in ("single_weight_candidates", "stability_subsets"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 0:
                raise ValueError(f"analysis.{name} must be an integer >= 0, got {value!r}")
        if self.stability_subsets > self.num_samples:
            raise ValueError(
                f"stability_subsets ({self.stability_subsets}) exceeds num_samples "
                f"({self.num_samples}): fewer windows than subsets"
            )


@dataclass
class SensitivityConfig:
    """Snapshots of the critical set while a model trains (``SensitivityCallback``)."""

    metric: str = help_field("Importance metric of each snapshot.", "magnitude")
    top_k: int | float = help_field(
        "Size of the critical set: a count (int) or a percentage (float) of the entries.", 1.0
    )
    steps: list[int] | None = help_field(
        "Global steps to snapshot (0 = before training); or use `every`.", None
    )
    every: int | None = help_field("Snapshot every N steps (and at step 0).", None)
    num_samples: int = help_field("First training samples every snapshot scores.", 8)
    params: list[str] | None = help_field(
        "Parameter patterns to score; None = decoder-block linear weights.", None
    )
    blocks: str | None = help_field(
        "Dotted path or 're:' pattern of the decoder-block ModuleList; None = found from the "
        "model's `_no_split_modules`.",
        None,
    )
    spearman_entries: int = help_field(
        "Score entries kept (seeded subsample) for the Spearman correlation.", 1_000_000
    )
    max_jaccard_drift: float | None = help_field(
        "Drift alarm: when 1 - Jaccard(top-k set, previous snapshot's) exceeds this, log a "
        "warning and record the event (None = no alarm).",
        None,
    )
    min_spearman: float | None = help_field(
        "Drift alarm: when the Spearman correlation of the scores with the previous snapshot's "
        "falls below this, log a warning and record the event (None = no alarm).",
        None,
    )

    def __post_init__(self) -> None:
        for name, low in (("max_jaccard_drift", 0.0), ("min_spearman", -1.0)):
            value = getattr(self, name)
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise ValueError(f"{name} must be a number in [{low}, 1] or null, got {value!r}")
            if not low <= value <= 1:
                raise ValueError(f"{name} must be in [{low}, 1], got {value}")
        if self.metric not in IMPORTANCE_METRICS:
            raise ValueError(f"unknown metric {self.metric!r}; valid: {sorted(IMPORTANCE_METRICS)}")
        if self.steps is None and self.every is None:
            raise ValueError("choose when to snapshot: steps=[...] or every=N")
        if self.every is not None and (not isinstance(self.every, int) or self.every < 1):
            raise ValueError(f"every must be a positive integer, got {self.every!r}")
        if self.steps is not None and any(not isinstance(s, int) or s < 0 for s in self.steps):
            raise ValueError(f"steps must be non-negative integers, got {self.steps!r}")
        check_positive_ints(self, ("num_samples", "spearman_entries"), "sensitivity")
