"""Parameter importance: metrics, golden masks (intersection of per-sample top-k) and the
reverse golden KL search with fluctuation strategies."""

from .fluctuation import FLUCTUATION_STRATEGIES, FluctuationState, initial_state
from .golden import GoldenResult, golden_masks
from .metrics import (
    IMPORTANCE_METRICS,
    check_metric_options,
    compute_importance,
    per_rank_scores,
    register_metric,
)
from .reverse import ReverseGoldenResult, reverse_golden_masks
from .samples import as_samples, instruction_prompt_fn, text_prompt_fn
from .selection import default_parameters, select_parameters

__all__ = [
    "FLUCTUATION_STRATEGIES",
    "IMPORTANCE_METRICS",
    "FluctuationState",
    "GoldenResult",
    "ReverseGoldenResult",
    "as_samples",
    "check_metric_options",
    "compute_importance",
    "default_parameters",
    "golden_masks",
    "initial_state",
    "instruction_prompt_fn",
    "per_rank_scores",
    "register_metric",
    "reverse_golden_masks",
    "select_parameters",
    "text_prompt_fn",
]
