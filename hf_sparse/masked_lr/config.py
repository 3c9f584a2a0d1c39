"""What the user sets for the masked-learning-rate PEFT method (``MASKED_LR``)."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

from ..config_utils import check_positive_ints, help_field
from ..data import check_data_source
from ..importance import IMPORTANCE_METRICS, check_metric_options
from ..importance.chunked import CHUNKED_METRICS, check_chunk_size
from ..integrity import IntegrityCheckedConfig
from ..masks import RANKING_SCOPES, check_percent
from ..peft_registry import add_peft_type
from .core import DEFAULT_FREQUENCY, FLUCTUATION_STRATEGIES, check_fluctuation, resolve_strategy

PEFT_TYPE_NAME = "MASKED_LR"


MASKED_LR = add_peft_type(PEFT_TYPE_NAME)


@dataclass
class MaskedLRConfig(IntegrityCheckedConfig):
    """A trainable delta on chosen weights, with one learning-rate scale inside a mask, another
    outside it.

    The delta is stored as ``inside_lr_scale * inside`` scattered to the mask's True entries
    (plus ``outside_lr_scale * outside`` on the others when that scale is positive), so only the
    masked values are trained and saved. Because Adam's update does not depend on the gradient's
    scale, a scale ``s`` makes those entries move by ``s * lr`` per step: an exact per-element
    learning-rate multiplier for Adam/AdamW. With plain SGD the same reparametrisation moves
    them by ``s**2 * lr``.

    Loading: ``import hf_sparse`` first. It adds ``MASKED_LR`` to peft's method registry;
    without it ``PeftModel.from_pretrained`` fails with ``KeyError: 'MASKED_LR'``. A saved
    adapter holds its masks (packed bits or int32 positions), so ``masks_file`` is not read
    when loading one.

    Example::

        config = MaskedLRConfig(masks_file="golden_masks.safetensors", outside_lr_scale=0.0)
        model = get_masked_lr_model(base_model, config)
    """

    target_modules: list[str] | str | None = help_field(
        "Modules to adapt, with peft's usual meaning: a list of names or name suffixes (e.g. "
        "['q_proj', 'v_proj']), a regex string, or 'all-linear'. None = exactly the modules that "
        "have a mask. Only nn.Linear and GPT-2's Conv1D are supported.",
        None,
    )
    exclude_modules: list[str] | str | None = help_field(
        "Modules never to adapt (same syntax as target_modules).", None
    )
    masks_file: str | None = help_field(
        "Masks written by hf_sparse.masks.save_masks, keyed by full parameter name "
        "(model.layers.0.self_attn.q_proj.weight; a PEFT 'base_model.model.' prefix is ignored). "
        "Each mask has the weight's stored shape ([in, out] for Conv1D). Masks passed to "
        "get_masked_lr_model take precedence; a saved adapter carries its own masks.",
        None,
    )
    inside_lr_scale: float = help_field(
        "Learning-rate multiplier of the entries where the mask is True (> 0). Exact for "
        "Adam-family optimizers; with SGD the effective multiplier is its square.",
        1.0,
    )
    outside_lr_scale: float = help_field(
        "Learning-rate multiplier of the other entries (>= 0). 0 = they never change and are not "
        "even stored; > 0 stores a second trainable vector for them (dense storage).",
        0.0,
    )
    init_weights: bool = help_field(
        "True: the delta starts at zero, so the adapted model equals the base model. False: "
        "small random values (for tests only).",
        True,
    )
    modules_to_save: list[str] | None = help_field(
        "Modules apart from the adapted ones to train fully and save (e.g. a classifier head).",
        None,
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = MASKED_LR
        if isinstance(self.target_modules, list):
            self.target_modules = set(self.target_modules)
        if isinstance(self.exclude_modules, list):
            self.exclude_modules = set(self.exclude_modules)
        if isinstance(self.masks_file, os.PathLike):
            self.masks_file = os.fspath(self.masks_file)
        if self.masks_file is not None and not isinstance(self.masks_file, str):
            raise ValueError(f"masks_file must be a path, got {self.masks_file!r}")
        _check_scale("inside_lr_scale", self.inside_lr_scale, allow_zero=False)
        _check_scale("outside_lr_scale", self.outside_lr_scale, allow_zero=True)

    @classmethod
    def from_pretrained(
        cls, pretrained_model_name_or_path: str, subfolder: str | None = None, **kwargs
    ):
        """Load a saved config; its masks then come with the adapter weights, not ``masks_file``."""
        config = super().from_pretrained(pretrained_model_name_or_path, subfolder, **kwargs)
        config._masks_in_checkpoint = True
        return config


def _check_scale(field: str, value: object, allow_zero: bool) -> None:
    bound = ">= 0" if allow_zero else "> 0"
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"{field} must be a number {bound}, got {value!r}")
    if not math.isfinite(value) or value < 0 or (value == 0 and not allow_zero):
        fix = "use 0 to freeze these entries" if allow_zero else "use a small positive value"
        raise ValueError(f"{field} must be finite and {bound}, got {value!r}; {fix}")


def _check_metric(metric: str, options: dict, per_sample: bool) -> None:
    check_metric_options(metric, options)
    if per_sample and metric == "magnitude":
        raise ValueError(
            "metric 'magnitude' does not depend on the sample; golden masks need a per-sample "
            f"metric, e.g. {sorted(set(IMPORTANCE_METRICS) - {'magnitude'})}"
        )


def _check_chunking(chunk_size: int | None, metric: str) -> None:
    check_chunk_size(chunk_size)
    if chunk_size is not None and metric not in CHUNKED_METRICS:
        raise ValueError(
            f"chunk_size applies to the gradient metrics {list(CHUNKED_METRICS)}, not "
            f"{metric!r}: set chunk_size: null or choose one of them"
        )


@dataclass
class ScoreConfig:
    """One importance metric's top-k as a mask (``hf-sparse mask score``)."""

    metric: str = help_field("Importance metric (see hf_sparse.importance).", "gradient")
    top_k_percent: float = help_field("Percent of entries kept in the mask.", 1.0)
    scope: str = help_field("Ranking scope: global, tensor, row or head.", "global")
    params: list[str] | None = help_field(
        "Parameter patterns to score (roles, names, 're:'); None = decoder-block linear weights.",
        None,
    )
    blocks: str | None = help_field(
        "Dotted path or 're:' pattern of the decoder-block ModuleList; None = found from the "
        "model's `_no_split_modules`.",
        None,
    )
    metric_options: dict = help_field("Extra metric options, e.g. {probes: 8}.", {})

    def __post_init__(self) -> None:
        check_percent(self.top_k_percent, "top_k_percent")
        if self.scope not in RANKING_SCOPES:
            raise ValueError(f"scope must be one of {list(RANKING_SCOPES)}, got {self.scope!r}")
        _check_metric(self.metric, self.metric_options, per_sample=False)


CHUNK_SIZE_HELP = (
    "Memory-bounded scoring: each sample's loss gradient is computed over chunks of this many "
    "tokens (head and cross-entropy per chunk, gradients accumulated over chunks; the same "
    "gradient). Gradient metrics only (gradient, grad_x_weight, fisher). None = whole samples."
)


@dataclass
class GoldenConfig:
    """Golden parameters: the entries in the per-sample top ``top_k_percent`` % of every one of
    ``num_samples`` samples (the intersection of per-sample top-k masks)."""

    top_k_percent: float = help_field("Per-sample top-k, in percent of the ranked entries.", 5.0)
    num_samples: int = help_field("Samples whose top-k sets are intersected.", 16)
    metric: str = help_field("Per-sample importance metric (not magnitude).", "gradient")
    scope: str = help_field("Ranking scope of each top-k: tensor, global, row or head.", "tensor")
    params: list[str] | None = help_field(
        "Parameter patterns to score; None = decoder-block linear weights.", None
    )
    blocks: str | None = help_field(
        "Dotted path or 're:' pattern of the decoder-block ModuleList; None = found from the "
        "model's `_no_split_modules`.",
        None,
    )
    last_blocks_percent: float | None = help_field(
        "Only parameters in the last N% of decoder blocks; None = all blocks.", None
    )
    metric_options: dict = help_field("Extra metric options, e.g. {probes: 8}.", {})
    chunk_size: int | None = help_field(CHUNK_SIZE_HELP, None)

    def __post_init__(self) -> None:
        check_percent(self.top_k_percent, "top_k_percent")
        check_positive_ints(self, ("num_samples",), "golden")
        _check_chunking(self.chunk_size, self.metric)
        if self.scope not in RANKING_SCOPES:
            raise ValueError(f"scope must be one of {list(RANKING_SCOPES)}, got {self.scope!r}")
        if self.last_blocks_percent is not None:
            check_percent(self.last_blocks_percent, "last_blocks_percent")
        _check_metric(self.metric, self.metric_options, per_sample=True)


REVERSE_SCOPES = ("global", "tensor")


@dataclass
class ReverseGoldenConfig:
    """Reverse golden search: the mask of exactly ``target_percent`` % whose removal changes the
    next-token distribution most (KL on held-out samples), proposed round by round by a
    fluctuation strategy."""

    target_percent: float = help_field("Size of the mask, in percent of the scored entries.", 1.0)
    num_samples: int = help_field("Samples scored.", 16)
    eval_samples: int = help_field("Held-out samples of the KL.", 4)
    metric: str = help_field("Per-sample importance metric (not magnitude).", "gradient")
    scope: str = help_field("Ranking scope: global or tensor.", "global")
    strategy: str = help_field(
        f"Fluctuation strategy: {sorted(FLUCTUATION_STRATEGIES)} ('momentum' and 'chaos' are "
        "accepted short spellings).",
        "adaptive_sinusoidal",
    )
    fluctuation_amplitude: float = help_field(
        "Fraction in (0, 1] of the band's half-width the proposals may move from its centre.",
        1.0,
    )
    fluctuation_frequency: float = help_field(
        "Cycles per round of the periodic strategies (adaptive_sinusoidal, harmonic_oscillator).",
        DEFAULT_FREQUENCY,
    )
    rounds: int = help_field("Search rounds at most.", 8)
    patience: int = help_field("Stop after this many rounds without a better KL.", 3)
    expansion: float = help_field("Proposals lie in [target, expansion * target] percent.", 4.0)
    params: list[str] | None = help_field(
        "Parameter patterns to score; None = decoder-block linear weights.", None
    )
    blocks: str | None = help_field(
        "Dotted path or 're:' pattern of the decoder-block ModuleList; None = found from the "
        "model's `_no_split_modules`.",
        None,
    )
    last_blocks_percent: float | None = help_field(
        "Only parameters in the last N% of decoder blocks; None = all blocks.", None
    )
    seed: int = help_field("Seed of the strategies that draw random numbers.", 0)
    metric_options: dict = help_field("Extra metric options, e.g. {probes: 8}.", {})
    chunk_size: int | None = help_field(CHUNK_SIZE_HELP, None)
    batch_size: int = help_field(
        "Held-out samples per forward pass of the KL evaluation (padded on the right; the KL "
        "counts real tokens only).",
        1,
    )

    def __post_init__(self) -> None:
        check_percent(self.target_percent, "target_percent")
        counts = ("num_samples", "eval_samples", "rounds", "patience", "batch_size")
        check_positive_ints(self, counts, "reverse")
        _check_chunking(self.chunk_size, self.metric)
        self.strategy = resolve_strategy(self.strategy)
        check_fluctuation(self.fluctuation_amplitude, self.fluctuation_frequency)
        if self.scope not in REVERSE_SCOPES:
            raise ValueError(
                f"reverse search scope must be one of {list(REVERSE_SCOPES)}, got {self.scope!r}"
            )
        if not self.expansion >= 1:
            raise ValueError(f"expansion must be >= 1, got {self.expansion!r}")
        if self.last_blocks_percent is not None:
            check_percent(self.last_blocks_percent, "last_blocks_percent")
        _check_metric(self.metric, self.metric_options, per_sample=True)


DATA_FORMATS = ("auto", "instruction", "text")


@dataclass
class MaskDataConfig:
    """The examples a mask recipe scores (``data:`` of mask and fine-tuning recipes)."""

    dataset: str = help_field("Named set (alpaca, wikitext2, ...), or a local file.", "alpaca")
    format: str = help_field(
        "instruction (Alpaca fields, loss on the response), text (plain windows) or auto.",
        "auto",
    )
    num_samples: int = help_field("Samples to score / intersect.", 16)
    eval_samples: int = help_field("Held-out samples for KL (reverse search only).", 8)
    max_length: int = help_field("Tokens per sample (longer ones are cut).", 256)
    seed: int = help_field("Seed of the sample draw.", 0)
    text_field: str = help_field("Column holding the text in jsonl/parquet data.", "text")

    def __post_init__(self) -> None:
        if self.format not in DATA_FORMATS:
            raise ValueError(
                f"data.format must be one of {list(DATA_FORMATS)}, got {self.format!r}"
            )
        check_positive_ints(self, ("num_samples", "eval_samples", "max_length"), "data")
        check_data_source(self.dataset)


FINETUNE_ADAPTERS = ("masked_lr", "full")


@dataclass
class FinetuneConfig:
    """Fine-tuning with a mask (``finetune:`` of fine-tuning recipes)."""

    adapter: str = help_field(
        "masked_lr: sparse-delta PEFT adapter on the masked weights; full: the whole model "
        "with MaskedAdamW (masked entries at inside_lr_scale * lr, the rest at outside).",
        "masked_lr",
    )
    inside_lr_scale: float = help_field("Learning-rate multiplier inside the mask.", 1.0)
    outside_lr_scale: float = help_field("Multiplier outside the mask (0 = frozen).", 0.0)
    learning_rate: float = help_field("Base learning rate (AdamW).", 1e-4)
    max_steps: int = help_field("Optimizer steps.", 30)
    batch_size: int = help_field("Examples per step.", 4)
    train_samples: int = help_field("Training examples drawn from the data.", 240)
    eval_samples: int = help_field("Held-out examples for the eval loss.", 40)
    max_length: int = help_field("Tokens per example (longer ones are cut).", 256)
    seed: int = help_field("Seed of the example draw and of training.", 0)

    def __post_init__(self) -> None:
        if self.adapter not in FINETUNE_ADAPTERS:
            raise ValueError(
                f"finetune.adapter must be one of {list(FINETUNE_ADAPTERS)}, got {self.adapter!r}"
            )
        if self.inside_lr_scale <= 0 or self.outside_lr_scale < 0:
            raise ValueError(
                "finetune.inside_lr_scale must be > 0 and outside_lr_scale >= 0, got "
                f"{self.inside_lr_scale} and {self.outside_lr_scale}"
            )
        counts = ("max_steps", "batch_size", "train_samples", "eval_samples", "max_length")
        check_positive_ints(self, counts, "finetune")
