"""Apply a pruning config to a model in place (the HF-facing side of ``core``).

Lifecycle of ``prune_(model, config, calibration)``:
  1. resolve the target linears per decoder block (``models.target_linears``), failing on
     patterns that match nothing before any work;
  2. magnitude: prune every target directly;
     Wanda / SparseGPT: run the sequential engine; in each block collect input statistics,
     prune the block's targets, re-run the block so the next block sees pruned activations.
     An MoE expert that no calibration token reached (on any rank) has no statistics: it is
     pruned by magnitude, with a warning, and listed in ``PruningResult.fallbacks``;
  3. measure the sparsity from the pruned weights, record a ``sparsity`` block in
     ``model.config`` and return the keep-masks.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from ..calibration import (
    InputStats,
    StatsCollector,
    all_reduce_stats,
    broadcast_block,
    distributed_world,
    run_sequential,
)
from ..config_utils import to_dict
from ..data import check_batch_size, check_token_windows
from ..execution import onloaded, resolve_device, stored_tensor
from ..models import (
    ExpertLinear,
    find_decoder_blocks,
    find_linear,
    matches_pattern,
    near_names,
    set_weight_matrix,
    target_linears,
    weight_matrix,
)
from .config import MagnitudeConfig, PruningConfig, SparseGPTConfig, WandaConfig
from .core import keep_mask_from_scores, magnitude_mask, obs_prune, wanda_mask
from .owl import OWLPlan, dense_input_sq_norms, plan_owl
from .refine import dsnot_refine, ria_scores

logger = logging.getLogger(__name__)


NO_TOKENS_FALLBACK = "magnitude: no calibration token was routed to this expert"


@dataclass
class PruningResult:
    """Keep-masks (``True`` = kept, ``[out, in]`` layout) by linear name, and timings.

    ``measured_sparsity`` counts the zeros in the pruned weights themselves (set by
    ``prune_``); ``fallbacks`` names the layers pruned another way than asked, and why.
    """

    masks: dict[str, torch.Tensor]
    seconds: float
    measured_sparsity: float | None = None
    fallbacks: dict[str, str] = field(default_factory=dict)
    owl: OWLPlan | None = None

    @property
    def sparsity(self) -> float:
        """The sparsity of the masks (what the method decided)."""
        total = sum(m.numel() for m in self.masks.values())
        kept = sum(int(m.sum()) for m in self.masks.values())
        return 1.0 - kept / max(total, 1)


def measured_sparsity(linears: dict[str, nn.Module]) -> float:
    """Share of exact zeros in the weight matrices of ``linears`` (expert views included)."""
    zeros = total = 0
    for module in linears.values():
        weight = weight_matrix(module)
        if weight.device.type == "meta":  # an accelerate-offloaded layer: read its store
            weight = stored_tensor(module)
        zeros += int((weight == 0).sum())
        total += weight.numel()
    return zeros / total if total else 0.0


def layer_sparsity(
    config: PruningConfig, name: str, module: nn.Module, plan: dict[str, float] | None = None
) -> float:
    if plan and name in plan:  # OWL's exact per-layer budget
        return plan[name]
    for pattern, value in config.sparsity_per_layer.items():
        if matches_pattern(name, module, pattern):
            return float(value)
    return float(config.sparsity)


def _prune_layer_magnitude(
    config: PruningConfig, name: str, module: nn.Module, plan: dict[str, float] | None = None
) -> torch.Tensor:
    weight = weight_matrix(module)
    keep = magnitude_mask(weight, layer_sparsity(config, name, module, plan), config.pattern)
    with torch.no_grad():
        weight.mul_(keep.to(weight.dtype))
    return keep


def _block_pruner(
    config: PruningConfig,
    linears: dict[str, nn.Module],
    masks: dict[str, torch.Tensor],
    fallbacks: dict[str, str],
    plan: dict[str, float] | None = None,
) -> Callable[[], None]:
    """Install statistics hooks on a block's targets; return the function that prunes them."""
    use_obs = isinstance(config, SparseGPTConfig)
    collector = StatsCollector(
        linears, use_obs, not use_obs, config.dtype, config.reduction == "ordered"
    ).__enter__()
    means = _InputSums(linears) if config.refine == "dsnot" else None

    def finish() -> None:
        collector.__exit__()
        if means is not None:
            means.close()
        collector.fill_missing()  # before the all-reduce: every rank reduces the same tensors
        all_reduce_stats(collector.stats)
        unseen = [name for name in linears if collector.stats[name].tokens == 0]
        unused = [name for name in unseen if not isinstance(linears[name], ExpertLinear)]
        if unused:
            raise RuntimeError(f"{unused} saw no input during calibration (are they used?)")
        for name in unseen:
            logger.warning("%s: %s; pruned by magnitude", name, NO_TOKENS_FALLBACK)
            masks[name] = _prune_layer_magnitude(config, name, linears[name], plan).cpu()
            fallbacks[name] = NO_TOKENS_FALLBACK
        seen = {name: module for name, module in linears.items() if name not in unseen}
        if use_obs:
            _obs_prune_shared(config, seen, collector.stats, masks, plan)
            return
        for name, module in seen.items():
            weight = weight_matrix(module)
            sparsity = layer_sparsity(config, name, module, plan)
            keep = select_mask(
                config, weight, collector.stats[name].sq_norms, sparsity, plan is not None
            )
            if means is not None:
                keep = dsnot_refine(
                    weight, keep, means.mean(name), collector.stats[name].sq_norms,
                    config.refine_iterations, config.pattern,
                )  # fmt: skip
            with torch.no_grad():
                weight.mul_(keep.to(weight.dtype))
            masks[name] = keep.cpu()

    return finish


def select_mask(
    config: PruningConfig,
    weight: torch.Tensor,
    sq_norms: torch.Tensor,
    sparsity: float,
    exact_total: bool = False,
) -> torch.Tensor:
    """The keep-mask of a mask-only method (magnitude, Wanda, Wanda with RIA scores);
    ``exact_total``: prune exactly ``round(sparsity * numel)`` (OWL's budgets)."""
    if isinstance(config, MagnitudeConfig):
        return magnitude_mask(weight, sparsity, config.pattern)
    if getattr(config, "score", "wanda") == "ria":
        return keep_mask_from_scores(ria_scores(weight, sq_norms), sparsity, config.pattern)
    return wanda_mask(weight, sq_norms, sparsity, config.pattern, exact_total)


class _InputSums:
    """Forward hooks summing each target linear's input rows (``E[x]`` for DSnoT)."""

    def __init__(self, linears: dict[str, nn.Module]) -> None:
        self.sums: dict[str, torch.Tensor] = {}
        self.tokens: dict[str, int] = {}
        self.handles = [m.register_forward_hook(self._hook(n)) for n, m in linears.items()]

    def _hook(self, name: str) -> Callable:
        def hook(_module: nn.Module, args: tuple, _output) -> None:
            rows = args[0].detach().reshape(-1, args[0].shape[-1]).float()
            if name not in self.sums:
                self.sums[name] = torch.zeros(rows.shape[1], device=rows.device)
                self.tokens[name] = 0
            self.sums[name] += rows.sum(0)
            self.tokens[name] += rows.shape[0]

        return hook

    def close(self) -> None:
        for handle in self.handles:
            handle.remove()
        _, world = distributed_world()
        if world > 1:
            for name in sorted(self.sums):
                count = torch.tensor([float(self.tokens[name])], dtype=torch.float64)
                torch.distributed.all_reduce(self.sums[name])
                torch.distributed.all_reduce(count)
                self.tokens[name] = int(count.item())

    def mean(self, name: str) -> torch.Tensor:
        return self.sums[name] / max(self.tokens[name], 1)


def _obs_prune_shared(
    config: SparseGPTConfig,
    linears: dict[str, nn.Module],
    stats: dict[str, InputStats],
    masks: dict[str, torch.Tensor],
    plan: dict[str, float] | None = None,
) -> None:
    """SparseGPT on a block: layers reading the same input (q/k/v, gate/up) are stacked and
    solved together, one Hessian factor and one column sweep for the group."""
    groups: dict[int, list[str]] = {}
    for name in linears:
        groups.setdefault(id(stats[name]), []).append(name)
    for names in groups.values():
        hessian = stats[names[0]].hessian
        weights = [weight_matrix(linears[n]) for n in names]
        row_groups = [
            (w.shape[0], layer_sparsity(config, n, linears[n], plan))
            for n, w in zip(names, weights, strict=True)
        ]
        pruned, keep = obs_prune(
            torch.cat([w.detach().to(config.dtype) for w in weights]),
            hessian,
            config.sparsity,
            config.pattern,
            block_size=config.block_size,
            damp=config.dampening,
            row_groups=row_groups,
            exact_total=plan is not None,
            dtype=config.dtype,
        )
        first = 0
        for name, (rows, _) in zip(names, row_groups, strict=True):
            set_weight_matrix(linears[name], pruned[first : first + rows])
            masks[name] = keep[first : first + rows].cpu()
            first += rows


def prune_(
    model: nn.Module,
    config: PruningConfig,
    calibration: torch.Tensor | None = None,
    batch_size: int = 8,
    show_progress: bool = True,
) -> PruningResult:
    """Prune ``model`` in place with ``config``; ``calibration`` is ``[n, seq_len]`` token ids.

    Example::

        result = prune_(model, SparseGPTConfig(sparsity=0.5), calibration=windows)
        model.save_pretrained("pruned")  # zeros in place, `sparsity` block in config.json
    """
    if not isinstance(config, PruningConfig):
        raise TypeError(f"config must be a PruningConfig, got {type(config).__name__}")
    grouped = resolve_targets(model, config)
    if config.needs_calibration and calibration is None:
        raise ValueError(
            f"{config.method} needs calibration data: pass calibration=<[n, seq_len] token ids> "
            "(e.g. hf_sparse.data.calibration_windows(...)), or use MagnitudeConfig"
        )
    if not isinstance(config, MagnitudeConfig | WandaConfig | SparseGPTConfig):
        raise TypeError(f"no pruning implementation for {type(config).__name__}")
    resolve_device(config.device)  # a bad device fails before any work
    if config.needs_calibration:
        check_token_windows(calibration, model, "calibration")
        check_batch_size(batch_size, "batch_size")
    start = time.perf_counter()
    masks: dict[str, torch.Tensor] = {}
    fallbacks: dict[str, str] = {}
    owl = _owl_plan(model, config, grouped, calibration, batch_size, show_progress)
    plan = owl.layer_sparsity if owl is not None else None
    if isinstance(config, MagnitudeConfig) and config.refine == "none":
        compute = resolve_device(config.device)
        for block_name, block in find_decoder_blocks(model, config.blocks):
            with onloaded(block, compute):
                for name, module in grouped.get(block_name, {}).items():
                    masks[name] = _prune_layer_magnitude(config, name, module, plan).cpu()
    else:

        def process_block(name: str, _block: nn.Module) -> Callable[[], None] | None:
            linears = grouped[name]
            return _block_pruner(config, linears, masks, fallbacks, plan) if linears else None

        run_sequential(
            model,
            calibration,
            process_block,
            batch_size=batch_size,
            blocks=config.blocks,
            show_progress=show_progress,
            after_block=broadcast_block,
            device=config.device,
            offload_inputs=config.offload_inputs,
        )
    seconds = time.perf_counter() - start
    pruned = {name: module for linears in grouped.values() for name, module in linears.items()}
    result = PruningResult(masks, seconds, measured_sparsity(pruned), fallbacks, owl)
    record_sparsity_config(model, config, result)
    logger.info(
        "%s pruned %d layers to %.2f%% (measured in the weights) in %.1fs%s",
        config.method,
        len(masks),
        100 * result.measured_sparsity,
        seconds,
        f"; {len(fallbacks)} by magnitude fallback" if fallbacks else "",
    )
    return result


def resolve_targets(model: nn.Module, config: PruningConfig) -> dict[str, dict[str, nn.Module]]:
    """The linears ``config`` prunes, grouped by block, with every pattern checked (targets,
    ignore, ``sparsity_per_layer`` keys, N:M shapes): the checks ``prune_`` runs before work,
    also callable before building calibration data."""
    grouped = target_linears(model, config.targets, config.ignore, config.blocks)
    _check_per_layer_keys(config, grouped)
    _check_nm_shapes(config, grouped)
    return grouped


def _check_per_layer_keys(config: PruningConfig, grouped: dict[str, dict[str, nn.Module]]) -> None:
    """Every ``sparsity_per_layer`` key must match a pruned layer (else its value would be
    silently unused)."""
    named = [(n, m) for linears in grouped.values() for n, m in linears.items()]
    for pattern in config.sparsity_per_layer:
        if not any(matches_pattern(n, m, pattern) for n, m in named):
            raise ValueError(
                f"sparsity_per_layer key {pattern!r} matches none of the layers being pruned; "
                f"{near_names(pattern, named)}"
            )


def _owl_plan(
    model: nn.Module,
    config: PruningConfig,
    grouped: dict[str, dict[str, nn.Module]],
    calibration: torch.Tensor | None,
    batch_size: int,
    show_progress: bool,
) -> OWLPlan | None:
    """OWL's per-layer budgets, from outlier shares on the dense model's activations."""
    if not config.owl:
        return None
    norms = dense_input_sq_norms(
        model, calibration, grouped, batch_size, config.blocks, show_progress, config.device
    )
    return plan_owl(grouped, norms, float(config.sparsity), config.owl_m, config.owl_lambda)


def _check_nm_shapes(config: PruningConfig, grouped: dict[str, dict[str, nn.Module]]) -> None:
    pattern = config.pattern
    if pattern is None:
        return
    for linears in grouped.values():
        for name, module in linears.items():
            cols = weight_matrix(module).shape[1]
            if cols % pattern.m:
                raise ValueError(
                    f"mask {pattern} needs input sizes divisible by {pattern.m}; "
                    f"{name} has {cols} inputs: ignore it or choose another M"
                )


def record_sparsity_config(model: nn.Module, config: PruningConfig, result: PruningResult) -> None:
    """Write the ``sparsity`` block that ``save_pretrained`` puts into ``config.json``."""
    if getattr(model, "config", None) is None:
        return
    settings = to_dict(config)
    model.config.sparsity = {
        "method": config.method,
        "sparsity": config.sparsity,
        "structure": config.mask,
        "targets": settings.pop("targets"),
        "ignore": settings.pop("ignore"),
        "pruned_layers": len(result.masks),
        "measured_sparsity": round(
            result.sparsity if result.measured_sparsity is None else result.measured_sparsity, 6
        ),
        "fallback_layers": dict(result.fallbacks),
        **({"owl": result.owl.summary()} if result.owl is not None else {}),
        "settings": settings,
        "library": "hf_sparse",
    }


def apply_masks_(model: nn.Module, masks: dict[str, torch.Tensor]) -> None:
    """Zero every weight whose mask entry is False (masks in ``[out, in]`` layout)."""
    for name, keep in masks.items():
        try:
            module = find_linear(model, name)
        except KeyError as error:
            raise KeyError(
                f"mask names module {name!r}, which this model does not have as a linear layer "
                f"({error.args[0]})"
            ) from None
        weight = weight_matrix(module)
        if keep.shape != weight.shape:
            raise ValueError(
                f"mask for {name} has shape {tuple(keep.shape)}, weight is {tuple(weight.shape)}"
            )
        with torch.no_grad():
            weight.mul_(keep.to(device=weight.device, dtype=weight.dtype))
