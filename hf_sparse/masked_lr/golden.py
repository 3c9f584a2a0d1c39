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

from ..config_utils import to_dict
from ..importance.chunked import loss_chunks
from ..importance.distributed import intersect_across_ranks, sum_across_ranks
from ..importance.metrics import IMPORTANCE_METRICS, per_rank_scores
from ..importance.samples import PromptFn, apply_prompt_fn, check_samples
from ..importance.selection import select_parameters
from ..masks import ParameterMasks, check_percent, top_k
from ..models import find_decoder_blocks, parameter_layouts
from .config import GoldenConfig

logger = logging.getLogger(__name__)


@dataclass
class GoldenResult:
    masks: ParameterMasks
    per_tensor: list[dict]  # name, shape, numel, kept, density, ... (ParameterMasks.report)
    samples_used: int
    settings: dict[str, Any]


def restrict_to_last_blocks(
    model: nn.Module,
    names: list[str],
    last_blocks_percent: float | None,
    blocks_path: str | None = None,
) -> list[str]:
    """Only the names inside the last ``last_blocks_percent`` % of decoder blocks
    (``blocks_path``: where they are, None = found from the model)."""
    if last_blocks_percent is None:
        return names
    check_percent(last_blocks_percent, "last_blocks_percent")
    blocks = find_decoder_blocks(model, blocks_path)
    keep = max(1, round(len(blocks) * last_blocks_percent / 100))
    prefixes = tuple(f"{name}." for name, _ in blocks[-keep:])
    chosen = [n for n in names if n.startswith(prefixes)]
    if not chosen:
        raise ValueError(
            f"no selected parameter lies in the last {last_blocks_percent}% of blocks "
            f"({[n for n, _ in blocks[-keep:]]})"
        )
    return chosen


def prepare_selection(
    model, params, last_blocks_percent, blocks: str | None = None
) -> dict[str, nn.Parameter]:
    selected = select_parameters(model, params, blocks)
    names = restrict_to_last_blocks(model, list(selected), last_blocks_percent, blocks)
    return {n: selected[n] for n in names}


def golden_masks(
    model: nn.Module,
    config: GoldenConfig,
    dataset: Sequence[Any],
    prompt_fn: PromptFn | None = None,
    show_progress: bool = True,
) -> GoldenResult:
    """Intersection over ``config.num_samples`` samples of each sample's top
    ``config.top_k_percent`` % by ``config.metric`` (default ``gradient``: |dL/dw| on that
    sample alone).

    ``dataset``: examples turned into ``{"input_ids", "labels"}`` by ``prompt_fn``
    (``text_prompt_fn`` / ``instruction_prompt_fn``), or already such dicts. Only one sample's
    scores and the running intersection are in memory at a time. Under ``torch.distributed``
    each rank scores its own examples (give each rank its shard) and the masks are
    intersected across ranks: every rank gets the intersection over all samples.
    """
    samples = apply_prompt_fn(dataset, prompt_fn, limit=config.num_samples)
    if not samples:
        raise ValueError("golden masks need at least one sample; the dataset is empty")
    check_samples(samples, model, "dataset")
    if len(samples) < config.num_samples:
        logger.warning(
            "the dataset has %d examples, fewer than num_samples=%d: using all",
            len(samples),
            config.num_samples,
        )
    selected = prepare_selection(model, config.params, config.last_blocks_percent, config.blocks)
    layout = parameter_layouts(model)
    fn = IMPORTANCE_METRICS[config.metric]
    running: ParameterMasks | None = None
    with per_rank_scores(), loss_chunks(config.chunk_size):
        for sample in tqdm(samples, desc="golden masks", disable=not show_progress):
            scores = fn(model, [sample], selected, False, **config.metric_options)
            masks = top_k(scores, config.top_k_percent, config.scope, layout)
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
        settings={**to_dict(config), "num_samples": used},
    )
