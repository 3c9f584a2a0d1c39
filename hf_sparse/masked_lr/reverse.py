"""Reverse golden search: the mask of exactly ``target_percent`` % whose removal (zeroing)
changes the model's next-token distribution most, KL(original || masked) on held-out samples.

Search space. One pass over the samples records, for every entry, its worst (largest)
position in the per-sample rankings (``0`` = the top score of that sample) and its summed
score. For a per-sample percentage ``p``, the entries whose worst position is inside every
sample's top ``p`` % are exactly the intersection of per-sample top-``p`` masks (a golden
mask). Each round a fluctuation strategy proposes ``p``; the candidate is that golden set,
trimmed or filled up to exactly the target count by summed score, so every candidate has the
same size and the KLs compare. The best candidate wins; the search stops early after
``patience`` rounds without a gain. Memory: per scored entry its worst position, its summed
score and one float64 copy of the sums for the per-round ranking, whatever the number of
samples.
"""

from __future__ import annotations

import itertools
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ..config_utils import to_dict
from ..evaluation import masked_weights_zeroed
from ..importance.chunked import loss_chunks
from ..importance.distributed import all_reduce_, sum_across_ranks
from ..importance.metrics import IMPORTANCE_METRICS, per_rank_scores
from ..importance.samples import PromptFn, apply_prompt_fn, check_samples
from ..masks import ParameterMasks, count_for
from ..masks.ranking import flatten, top_count, unflatten
from .config import ReverseGoldenConfig
from .core import FLUCTUATION_STRATEGIES, initial_state
from .golden import prepare_selection

logger = logging.getLogger(__name__)


@dataclass
class ReverseGoldenResult:
    masks: ParameterMasks
    per_tensor: list[dict]
    kl: float  # KL(original || best mask removed), mean per token on the held-out samples
    history: list[dict] = field(default_factory=list)  # per round: percent, kept, kl, best
    settings: dict[str, Any] = field(default_factory=dict)


def _positions_from_top(scores: torch.Tensor) -> torch.Tensor:
    """Position of each entry in the descending order of ``scores`` (0 = largest), int32."""
    flat = scores.reshape(-1)
    order = flat.argsort(descending=True, stable=True)
    positions = torch.empty_like(order, dtype=torch.int32)
    positions[order] = torch.arange(flat.numel(), dtype=torch.int32)
    return positions.reshape(scores.shape)


@dataclass
class RankSummary:
    """Per entry: worst position over samples and summed score."""

    worst: dict[str, torch.Tensor]
    total: dict[str, torch.Tensor]
    scope: str

    def __post_init__(self) -> None:
        # Every round ranks by the same summed scores: flatten them once.
        flat = flatten(self.total).double()
        self._flat_total = flat
        self._span = float(flat.max() - flat.min()) + 1.0

    def golden(self, percent: float) -> dict[str, torch.Tensor]:
        if self.scope == "global":
            limit = count_for(percent, sum(w.numel() for w in self.worst.values()))
            return {n: w < limit for n, w in self.worst.items()}
        return {n: w < count_for(percent, w.numel()) for n, w in self.worst.items()}

    def exact_count(self, candidate: dict[str, torch.Tensor], count: int):
        """``count`` entries: the candidate's first, then the rest, each by summed score."""
        # Shift candidate entries above every other entry; order inside each part by score.
        key = self._flat_total + flatten(candidate).double() * 2 * self._span
        return unflatten(top_count(key, count), self.total)


def summarise_ranks(
    fn, model, samples, selected, scope, options, show_progress, chunk_size=None
) -> RankSummary:
    """Worst position and summed score of every entry over the samples (of all ranks)."""
    worst, total = {}, {}
    for sample in tqdm(samples, desc="per-sample ranks", disable=not show_progress):
        with per_rank_scores(), loss_chunks(chunk_size):
            scores = {
                n: s.detach().float().cpu()
                for n, s in fn(model, [sample], selected, False, **options).items()
            }
        if scope == "global":
            positions = unflatten(_positions_from_top(flatten(scores)), scores)
        else:
            positions = {n: _positions_from_top(s) for n, s in scores.items()}
        for name, s in scores.items():
            if name in worst:
                torch.maximum(worst[name], positions[name], out=worst[name])
                total[name] += s
            else:
                worst[name], total[name] = positions[name], s.clone()
    device = next(model.parameters()).device
    all_reduce_(worst, torch.distributed.ReduceOp.MAX, device)
    all_reduce_(total, torch.distributed.ReduceOp.SUM, device)
    return RankSummary(worst, total, scope)


class KLProbe:
    """KL(original || model with entries zeroed) on fixed held-out samples.

    The original log-probabilities are computed once; ``masked_weights_zeroed`` backs up only
    the masked entries and restores them exactly. ``batch_size`` samples share a forward pass
    (padded on the right with an attention mask; only real tokens count). Under
    ``torch.distributed`` the KL sums over every rank's held-out samples, so all ranks see the
    same KL and take the same search decisions.
    """

    def __init__(self, model, samples, batch_size: int = 1):
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        self.model = model
        self.batches = [
            _padded(samples[i : i + batch_size]) for i in range(0, len(samples), batch_size)
        ]
        self.reference = [self._log_probs(ids, mask) for ids, mask in self.batches]

    @torch.no_grad()
    def _log_probs(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        device = next(self.model.parameters()).device
        logits = self.model(
            input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False
        ).logits
        return F.log_softmax(logits.float(), -1).cpu()

    @torch.no_grad()
    def kl_with_zeroed(self, masks: dict[str, torch.Tensor]) -> float:
        total, count = 0.0, 0
        with masked_weights_zeroed(self.model, masks):
            for (ids, mask), log_p in zip(self.batches, self.reference, strict=True):
                log_q = self._log_probs(ids, mask)
                per_token = (log_p.exp() * (log_p - log_q)).sum(-1)
                total += float(per_token[mask.bool()].sum())
                count += int(mask.sum())
        device = next(self.model.parameters()).device
        return sum_across_ranks(total, device) / sum_across_ranks(count, device)


def _padded(samples: list[dict[str, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    """``[n, longest]`` token ids padded on the right with 0, and the attention mask."""
    rows = [s["input_ids"].reshape(-1) for s in samples]
    longest = max(r.numel() for r in rows)
    ids = torch.zeros(len(rows), longest, dtype=rows[0].dtype)
    mask = torch.zeros(len(rows), longest, dtype=torch.long)
    for index, row in enumerate(rows):
        ids[index, : row.numel()] = row
        mask[index, : row.numel()] = 1
    return ids, mask


def reverse_golden_masks(
    model: nn.Module,
    config: ReverseGoldenConfig,
    dataset: Sequence[Any],
    prompt_fn: PromptFn | None = None,
    eval_dataset: Sequence[Any] | None = None,
    show_progress: bool = True,
) -> ReverseGoldenResult:
    """Search the ``config.target_percent`` % mask whose removal maximises KL(original || masked).

    ``dataset`` gives the ``num_samples`` scored samples; ``eval_dataset`` (default: the next
    ``eval_samples`` examples of ``dataset``) the held-out samples of the KL. The strategy
    proposes the per-sample percentage each round within ``[target, expansion * target]``. The
    result has exactly ``round(target_percent% of n)`` entries. Under ``torch.distributed`` give
    each rank its shard of both sets: positions, scores and KLs are combined across ranks, so
    every rank ends with the same mask.
    """
    num_samples, eval_samples = config.num_samples, config.eval_samples
    if eval_dataset is None:
        if dataset is None or len(dataset) <= num_samples:
            raise ValueError(
                f"no held-out samples: the dataset has {0 if dataset is None else len(dataset)} "
                f"examples and num_samples={num_samples}; pass eval_dataset= or more examples"
            )
        eval_dataset = list(itertools.islice(dataset, num_samples, num_samples + eval_samples))
    samples = apply_prompt_fn(dataset, prompt_fn, limit=num_samples)
    held_out = apply_prompt_fn(eval_dataset, prompt_fn, limit=eval_samples)
    check_samples(samples, model, "dataset")
    check_samples(held_out, model, "eval_dataset")
    selected = prepare_selection(model, config.params, config.last_blocks_percent, config.blocks)
    fn = IMPORTANCE_METRICS[config.metric]
    metric_options, scope = config.metric_options, config.scope
    target_percent, patience = config.target_percent, config.patience

    ranks = summarise_ranks(
        fn, model, samples, selected, scope, metric_options, show_progress, config.chunk_size
    )
    total_entries = sum(t.numel() for t in ranks.total.values())
    count = count_for(target_percent, total_entries)
    probe = KLProbe(model, held_out, config.batch_size)
    step = FLUCTUATION_STRATEGIES[config.strategy]
    state = initial_state(
        target_percent,
        config.expansion,
        config.seed,
        config.fluctuation_amplitude,
        config.fluctuation_frequency,
    )
    history, best, best_kl, last_kl, stale = [], None, None, None, 0
    for round_index in tqdm(range(config.rounds), desc="reverse search", disable=not show_progress):
        percent, state = step(state, round_index, last_kl, best_kl)
        golden = ranks.golden(percent)
        candidate = ranks.exact_count(golden, count)
        last_kl = probe.kl_with_zeroed(candidate)
        improved = best_kl is None or last_kl > best_kl
        if improved:
            best, best_kl, stale = candidate, last_kl, 0
        else:
            stale += 1
        history.append(
            {
                "round": round_index,
                "percent": percent,
                "golden_kept": int(sum(int(g.sum()) for g in golden.values())),
                "kl": last_kl,
                "best_kl": best_kl,
            }
        )
        logger.info(
            "round %d: p=%.4f%% KL=%.5f (best %.5f)", round_index, percent, last_kl, best_kl
        )
        if stale >= patience:
            logger.info("no gain for %d rounds: stopping early", patience)
            break
    masks = ParameterMasks(best)
    device = next(model.parameters()).device
    if not math.isfinite(best_kl):
        logger.warning("the best KL is not finite (%s): check the held-out samples", best_kl)
    return ReverseGoldenResult(
        masks=masks,
        per_tensor=[r.to_dict() for r in masks.report()],
        kl=best_kl,
        history=history,
        settings={
            **to_dict(config),
            "num_samples": int(sum_across_ranks(len(samples), device)),
            "eval_samples": int(sum_across_ranks(len(held_out), device)),
        },
    )
