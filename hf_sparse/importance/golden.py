"""Golden parameters: the weights in the top-k of every sample (intersection of per-sample
top-k masks), after the "golden parameters" idea of keeping only weights that matter for all
inputs rather than on average.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from torch import nn
from tqdm.auto import tqdm

from ..masked import RANKING_SCOPES, ParameterMasks, check_percent, top_k
from ..models import find_decoder_blocks, parameter_layouts
from .distributed import intersect_across_ranks, sum_across_ranks
from .metrics import IMPORTANCE_METRICS, check_metric_options, per_rank_scores
from .samples import PromptFn, apply_prompt_fn
from .selection import select_parameters

logger = logging.getLogger(__name__)


@dataclass
class GoldenResult:
    masks: ParameterMasks
    per_tensor: list[dict]  # name, shape, numel, kept, density, ... (ParameterMasks.report)
    samples_used: int
    settings: dict[str, Any]


def restrict_to_last_blocks(
    model: nn.Module, names: list[str], last_blocks_percent: float | None
) -> list[str]:
    """Only the names inside the last ``last_blocks_percent`` % of decoder blocks."""
    if last_blocks_percent is None:
        return names
    check_percent(last_blocks_percent, "last_blocks_percent")
    blocks = find_decoder_blocks(model)
    keep = max(1, round(len(blocks) * last_blocks_percent / 100))
    prefixes = tuple(f"{name}." for name, _ in blocks[-keep:])
    chosen = [n for n in names if n.startswith(prefixes)]
    if not chosen:
        raise ValueError(
            f"no selected parameter lies in the last {last_blocks_percent}% of blocks "
            f"({[n for n, _ in blocks[-keep:]]})"
        )
    return chosen


def prepare_selection(model, params, last_blocks_percent) -> dict[str, nn.Parameter]:
    selected = select_parameters(model, params)
    names = restrict_to_last_blocks(model, list(selected), last_blocks_percent)
    return {n: selected[n] for n in names}


def check_per_sample_metric(metric: str, options: dict[str, Any]) -> None:
    check_metric_options(metric, options)
    if metric == "magnitude":
        raise ValueError(
            "metric 'magnitude' does not depend on the sample; golden masks need a per-sample "
            f"metric, e.g. {sorted(set(IMPORTANCE_METRICS) - {'magnitude'})}"
        )


def golden_masks(
    model: nn.Module,
    dataset: Sequence[Any],
    prompt_fn: PromptFn | None = None,
    top_k_percent: float = 5.0,
    *,
    num_samples: int = 16,
    metric: str = "gradient",
    scope: str = "tensor",
    params: list[str] | str | None = None,
    last_blocks_percent: float | None = None,
    show_progress: bool = True,
    **metric_options: Any,
) -> GoldenResult:
    """Intersection over ``num_samples`` samples of each sample's top ``top_k_percent`` % by
    ``metric`` (default ``gradient``: |dL/dw| on that sample alone).

    ``dataset``: examples turned into ``{"input_ids", "labels"}`` by ``prompt_fn``
    (``text_prompt_fn`` / ``instruction_prompt_fn``), or already such dicts. ``scope``: the
    ranking scope of each per-sample top-k (``tensor``, ``global``, ``row``, ``head``).
    ``params``: which parameters (default: decoder-block linear weights);
    ``last_blocks_percent``: only those in the last N% of decoder blocks. Only one sample's
    scores and the running intersection are in memory at a time. Under ``torch.distributed``
    each rank scores its own examples (give each rank its shard) and the masks are
    intersected across ranks: every rank gets the intersection over all samples.
    """
    check_percent(top_k_percent, "top_k_percent")
    if not isinstance(num_samples, int) or num_samples < 1:
        raise ValueError(f"num_samples must be a positive integer, got {num_samples!r}")
    if scope not in RANKING_SCOPES:
        raise ValueError(f"scope must be one of {list(RANKING_SCOPES)}, got {scope!r}")
    check_per_sample_metric(metric, metric_options)
    samples = apply_prompt_fn(dataset, prompt_fn, limit=num_samples)
    if len(samples) < num_samples:
        logger.warning(
            "the dataset has %d examples, fewer than num_samples=%d: using all",
            len(samples),
            num_samples,
        )
    selected = prepare_selection(model, params, last_blocks_percent)
    layout = parameter_layouts(model)
    fn = IMPORTANCE_METRICS[metric]
    running: ParameterMasks | None = None
    with per_rank_scores():
        for sample in tqdm(samples, desc="golden masks", disable=not show_progress):
            scores = fn(model, [sample], selected, False, **metric_options)
            masks = top_k(scores, top_k_percent, scope, layout)
            running = masks if running is None else running & masks
            del scores
    device = next(model.parameters()).device
    running = intersect_across_ranks(running, device)
    used = int(sum_across_ranks(len(samples), device))
    logger.info("golden masks over %d samples: %s", used, running)
    return GoldenResult(
        masks=running,
        per_tensor=[r.to_dict() for r in running.report()],
        samples_used=used,
        settings={
            "top_k_percent": top_k_percent,
            "metric": metric,
            "scope": scope,
            "num_samples": used,
            "last_blocks_percent": last_blocks_percent,
            **metric_options,
        },
    )
