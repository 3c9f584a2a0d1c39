"""Parameter importance (shared by the golden searches, critical-weight studies and callbacks):
metrics registered in ``IMPORTANCE_METRICS``, parameter selection, sample handling and the
all-reduce of scores across ranks."""

from . import hessian  # noqa: F401  registers the hessian_diag metric
from .chunked import loss_chunks
from .metrics import (
    IMPORTANCE_METRICS,
    check_metric_options,
    compute_importance,
    per_rank_scores,
    register_metric,
)
from .samples import as_samples, instruction_prompt_fn, text_prompt_fn
from .selection import default_parameters, select_parameters

__all__ = [
    "IMPORTANCE_METRICS",
    "as_samples",
    "check_metric_options",
    "compute_importance",
    "default_parameters",
    "instruction_prompt_fn",
    "loss_chunks",
    "per_rank_scores",
    "register_metric",
    "select_parameters",
    "text_prompt_fn",
]
