"""Reverse golden search: the mask of exactly ``target_percent`` % whose removal (zeroing)
changes the model's next-token distribution most, KL(original || masked) on held-out samples.

Search space. One pass over the samples records, for every entry, its worst (largest)
position in the per-sample rankings (``0`` = the top score of that sample) and its summed
score. For a per-sample percentage ``p``, the entries whose worst position is inside every
sample's top ``p`` % are exactly the intersection of per-sample top-``p`` masks (a golden
mask). Each round a fluctuation strategy proposes ``p``; the candidate is that golden set,
trimmed or filled up to exactly the target count by summed score, so every candidate has the
same size and the KLs compare. The best candidate wins; the search stops early after
``patience`` rounds without a gain. Memory: two numbers per scored entry, whatever the number
of samples.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ..io import atomic_output_dir, write_json_atomic
from ..masked import ParameterMasks, check_percent, count_for
from .distributed import all_reduce_, sum_across_ranks
from .fluctuation import FLUCTUATION_STRATEGIES, initial_state
from .golden import check_per_sample_metric, prepare_selection
from .metrics import IMPORTANCE_METRICS, per_rank_scores
from .samples import PromptFn, apply_prompt_fn

logger = logging.getLogger(__name__)

REVERSE_SCOPES = ("global", "tensor")


@dataclass
class ReverseGoldenResult:
    masks: ParameterMasks
    per_tensor: list[dict]
    kl: float  # KL(original || best mask removed), mean per token on the held-out samples
    history: list[dict] = field(default_factory=list)  # per round: percent, kept, kl, best
    settings: dict[str, Any] = field(default_factory=dict)

    def save(self, output_dir: str | os.PathLike, overwrite: bool = False) -> Path:
        """``masks.safetensors`` + ``summary.json``, written to a temp folder then renamed."""
        with atomic_output_dir(output_dir, overwrite) as tmp:
            self.masks.save(tmp / "masks.safetensors", metadata={"kl": repr(self.kl)})
            summary = {
                "kl": self.kl,
                "kept": self.masks.count(),
                "density": self.masks.density(),
                "settings": self.settings,
                "history": self.history,
                "per_tensor": self.per_tensor,
            }
            write_json_atomic(summary, tmp / "summary.json")
        return Path(output_dir)


def _positions_from_top(scores: torch.Tensor) -> torch.Tensor:
    """Position of each entry in the descending order of ``scores`` (0 = largest), int32."""
    flat = scores.reshape(-1)
    order = flat.argsort(descending=True, stable=True)
    positions = torch.empty_like(order, dtype=torch.int32)
    positions[order] = torch.arange(flat.numel(), dtype=torch.int32)
    return positions.reshape(scores.shape)


@dataclass
class RankSummary:
    """Per entry: worst position over samples and summed score; sizes of the ranked groups."""

    worst: dict[str, torch.Tensor]
    total: dict[str, torch.Tensor]
    scope: str

    def golden(self, percent: float) -> dict[str, torch.Tensor]:
        if self.scope == "global":
            limit = count_for(percent, sum(w.numel() for w in self.worst.values()))
            return {n: w < limit for n, w in self.worst.items()}
        return {n: w < count_for(percent, w.numel()) for n, w in self.worst.items()}


def summarise_ranks(fn, model, samples, selected, scope, options, show_progress) -> RankSummary:
    """Worst position and summed score of every entry over the samples (of all ranks)."""
    worst, total = {}, {}
    for sample in tqdm(samples, desc="per-sample ranks", disable=not show_progress):
        with per_rank_scores():
            scores = {
                n: s.detach().float().cpu()
                for n, s in fn(model, [sample], selected, False, **options).items()
            }
        if scope == "global":
            flat = _positions_from_top(torch.cat([s.reshape(-1) for s in scores.values()]))
            positions, start = {}, 0
            for name, s in scores.items():
                positions[name] = flat[start : start + s.numel()].reshape(s.shape)
                start += s.numel()
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


def exact_count(candidate: dict[str, torch.Tensor], total: dict[str, torch.Tensor], count: int):
    """``count`` entries: the candidate's entries first, then the rest, each by summed score."""
    names = list(total)
    flat_total = torch.cat([total[n].reshape(-1) for n in names])
    flat_candidate = torch.cat([candidate[n].reshape(-1) for n in names])
    # Shift candidate entries above every other entry; order inside each part by score.
    span = float(flat_total.max() - flat_total.min()) + 1.0
    key = flat_total.double() + flat_candidate.double() * 2 * span
    chosen = torch.zeros(flat_total.numel(), dtype=torch.bool)
    if count > 0:
        chosen[key.topk(count, sorted=False).indices] = True
    masks, start = {}, 0
    for name in names:
        masks[name] = chosen[start : start + total[name].numel()].reshape(total[name].shape)
        start += total[name].numel()
    return masks


class KLProbe:
    """KL(original || model with entries zeroed) on fixed held-out samples.

    The original log-probabilities are computed once. Zeroing backs up only the masked
    entries, ``chunk_size`` tensors at a time, and restores them exactly. Under
    ``torch.distributed`` the KL sums over every rank's held-out samples, so all ranks see the
    same KL and take the same search decisions.
    """

    def __init__(self, model, params, samples, chunk_size: int):
        self.model, self.params, self.samples, self.chunk_size = model, params, samples, chunk_size
        self.reference = [self._log_probs(s) for s in samples]

    @torch.no_grad()
    def _log_probs(self, sample) -> torch.Tensor:
        device = next(self.model.parameters()).device
        logits = self.model(input_ids=sample["input_ids"].to(device), use_cache=False).logits
        return F.log_softmax(logits.float(), -1).cpu()

    @torch.no_grad()
    def kl_with_zeroed(self, masks: dict[str, torch.Tensor]) -> float:
        names = [n for n, m in masks.items() if bool(m.any())]
        backup = {}
        try:
            for start in range(0, len(names), self.chunk_size):
                for name in names[start : start + self.chunk_size]:
                    param = self.params[name]
                    mask = masks[name].to(param.device)
                    backup[name] = (mask, param[mask].clone())
                    param.masked_fill_(mask, 0)
            total, count = 0.0, 0
            for sample, log_p in zip(self.samples, self.reference, strict=True):
                log_q = self._log_probs(sample)
                total += float((log_p.exp() * (log_p - log_q)).sum())
                count += log_p.shape[0] * log_p.shape[1]
            device = next(self.model.parameters()).device
            return sum_across_ranks(total, device) / sum_across_ranks(count, device)
        finally:
            for name, (mask, values) in backup.items():
                self.params[name][mask] = values


def reverse_golden_masks(
    model: nn.Module,
    dataset: Sequence[Any],
    prompt_fn: PromptFn | None = None,
    target_percent: float = 1.0,
    *,
    eval_dataset: Sequence[Any] | None = None,
    num_samples: int = 16,
    eval_samples: int = 4,
    metric: str = "gradient",
    scope: str = "global",
    strategy: str = "adaptive_sinusoidal",
    rounds: int = 8,
    patience: int = 3,
    expansion: float = 4.0,
    chunk_size: int = 16,
    params: list[str] | str | None = None,
    last_blocks_percent: float | None = None,
    seed: int = 0,
    show_progress: bool = True,
    **metric_options: Any,
) -> ReverseGoldenResult:
    """Search the ``target_percent`` % mask whose removal maximises KL(original || masked).

    ``dataset`` gives the ``num_samples`` scored samples; ``eval_dataset`` (default: the next
    ``eval_samples`` examples of ``dataset``) the held-out samples of the KL. ``strategy``: one
    of ``FLUCTUATION_STRATEGIES``, proposing the per-sample percentage each round within
    ``[target, expansion * target]``. The result has exactly ``round(target_percent% of n)``
    entries. Under ``torch.distributed`` give each rank its shard of both sets: positions,
    scores and KLs are combined across ranks, so every rank ends with the same mask.
    """
    check_percent(target_percent, "target_percent")
    check_per_sample_metric(metric, metric_options)
    if strategy not in FLUCTUATION_STRATEGIES:
        raise ValueError(
            f"unknown strategy {strategy!r}; valid strategies: {sorted(FLUCTUATION_STRATEGIES)}"
        )
    if scope not in REVERSE_SCOPES:
        raise ValueError(
            f"reverse search scope must be one of {list(REVERSE_SCOPES)}, got {scope!r}"
        )
    for name, value in (
        ("num_samples", num_samples),
        ("rounds", rounds),
        ("patience", patience),
        ("chunk_size", chunk_size),
        ("eval_samples", eval_samples),
    ):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    if eval_dataset is None:
        if dataset is None or len(dataset) <= num_samples:
            raise ValueError(
                f"no held-out samples: the dataset has {0 if dataset is None else len(dataset)} "
                f"examples and num_samples={num_samples}; pass eval_dataset= or more examples"
            )
        eval_dataset = list(dataset)[num_samples : num_samples + eval_samples]
    samples = apply_prompt_fn(dataset, prompt_fn, limit=num_samples)
    held_out = apply_prompt_fn(eval_dataset, prompt_fn, limit=eval_samples)
    selected = prepare_selection(model, params, last_blocks_percent)
    fn = IMPORTANCE_METRICS[metric]

    ranks = summarise_ranks(fn, model, samples, selected, scope, metric_options, show_progress)
    total_entries = sum(t.numel() for t in ranks.total.values())
    count = count_for(target_percent, total_entries)
    probe = KLProbe(model, selected, held_out, chunk_size)
    step = FLUCTUATION_STRATEGIES[strategy]
    state = initial_state(target_percent, expansion, seed)
    history, best, best_kl, last_kl, stale = [], None, None, None, 0
    for round_index in tqdm(range(rounds), desc="reverse search", disable=not show_progress):
        percent, state = step(state, round_index, last_kl, best_kl)
        golden = ranks.golden(percent)
        candidate = exact_count(golden, ranks.total, count)
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
            "target_percent": target_percent,
            "metric": metric,
            "scope": scope,
            "strategy": strategy,
            "rounds": rounds,
            "patience": patience,
            "expansion": expansion,
            "num_samples": int(sum_across_ranks(len(samples), device)),
            "eval_samples": int(sum_across_ranks(len(held_out), device)),
            "last_blocks_percent": last_blocks_percent,
            "seed": seed,
            **metric_options,
        },
    )
