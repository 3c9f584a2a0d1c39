"""Merge task vectors into a base model in place (the HF-facing side of ``core``).

Lifecycle of ``merge_(model, config, sources, calibration)``:
  1. check the config, every source (architecture, vocabulary, names, shapes, an adapter's
     recorded base) and the calibration data, before any tensor is read;
  2. load the task vectors (only the tensors that changed);
  3. data-free methods (task arithmetic, magnitude, TIES, DARE): merge every changed tensor;
  4. OBS methods (``sparsegpt_tv``, ``sparsegpt_ties``): tensors outside the targeted
     decoder-block linears are trimmed by magnitude; the targeted linears go through the
     sequential engine: per block, input statistics (per task or shared) are collected on
     inputs that passed through the already merged earlier blocks (``sequential=True``) or
     through the base model (``sequential=False``), each task vector is pruned with SparseGPT's
     solver on its Hessian, the pruned task vectors are combined and written into the block
     before it is re-run for the next block;
  5. record a ``merging`` block in ``model.config`` and return the merged task vectors.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from ..calibration import StatsCollector, all_reduce_stats, broadcast_block, run_sequential
from ..data import check_batch_size, check_token_windows
from ..linalg import damped_inverse_cholesky
from ..models import ExpertLinear, target_linears, weight_matrix
from .config import MergeConfig, MergeSource
from .core import (
    MERGE_METHODS,
    MergeRule,
    ObsOptions,
    check_merge_method,
    combine,
    prune_task_vector_obs,
    reconstruction_error,
    sparsify,
)
from .owl import owl_densities
from .task_vectors import SourceInfo, check_sources, inspect_source, load_task_vector

logger = logging.getLogger(__name__)

TaskVector = dict[str, torch.Tensor]


@dataclass
class MergeResult:
    """The merged model, its merged task vector (float32, stored layout, changed tensors
    only), and for OBS methods the relative output error of each pruned task vector per
    linear: ``||X (tau - tau_pruned)||^2 / ||X tau||^2`` on that task's calibration inputs."""

    model: nn.Module
    deltas: TaskVector
    sources: list[str]
    seconds: float
    layer_errors: dict[str, list[float]] = field(default_factory=dict)

    @property
    def density(self) -> float:
        """Fraction of non-zero entries in the merged task vector (over changed tensors)."""
        total = sum(d.numel() for d in self.deltas.values())
        return sum(int(d.count_nonzero()) for d in self.deltas.values()) / max(total, 1)

    @property
    def mean_layer_error(self) -> float | None:
        errors = [e for per_task in self.layer_errors.values() for e in per_task]
        return sum(errors) / len(errors) if errors else None


@dataclass
class _Task:
    label: str
    weight: float
    density: float
    info: SourceInfo | None = None
    vector: TaskVector | None = None


def _as_tasks(
    sources: Sequence[MergeSource | str | os.PathLike | Mapping[str, torch.Tensor]],
    weights: Sequence[float] | None,
    config: MergeConfig,
) -> list[_Task]:
    if isinstance(sources, str | os.PathLike | Mapping) or not sources:
        raise ValueError("sources must be a non-empty list of model folders, adapters or tensors")
    if weights is not None and len(weights) != len(sources):
        raise ValueError(
            f"{len(weights)} weights for {len(sources)} models: give one weight per model"
        )
    tasks = []
    for index, source in enumerate(sources):
        if isinstance(source, Mapping):
            label, weight, density = f"task_vector_{index}", 1.0, None
        else:
            if not isinstance(source, MergeSource):
                source = MergeSource(model=os.fspath(source))
            label, weight, density = source.model, source.weight, source.density
        if weights is not None:
            weight = float(weights[index])
            MergeSource(model=label, weight=weight)  # validates the number
        task = _Task(label, weight, config.density if density is None else density)
        if isinstance(source, Mapping):
            task.vector = {name: t.detach().float().cpu() for name, t in source.items()}
        tasks.append(task)
    return tasks


def _check_in_memory(model: nn.Module, task: _Task) -> None:
    params = dict(model.named_parameters())
    for name, tensor in task.vector.items():
        if name not in params:
            raise ValueError(f"{task.label}: {name} is not a parameter of the base model")
        if tuple(tensor.shape) != tuple(params[name].shape):
            raise ValueError(
                f"{task.label}: {name} has shape {tuple(tensor.shape)}, the base's is "
                f"{tuple(params[name].shape)}"
            )


def _streams(
    calibration: torch.Tensor | Sequence[torch.Tensor] | None, tasks: list[_Task], method: str
) -> list[torch.Tensor]:
    if calibration is None:
        raise ValueError(
            f"{method} needs calibration data (token windows) for the layer-input Hessians: "
            "pass calibration=<[n, seq_len] ids> or one tensor per model, or set `calibration:` "
            "in the recipe; data-free methods: ties, dare_ties, task_arithmetic"
        )
    if isinstance(calibration, torch.Tensor):
        return [calibration]
    calibration = list(calibration)
    if len(calibration) not in (1, len(tasks)):
        raise ValueError(
            f"{len(calibration)} calibration sets for {len(tasks)} models: give one shared set "
            "or one per model"
        )
    return calibration


def merge_(
    model: nn.Module,
    config: MergeConfig,
    sources: Sequence[MergeSource | str | os.PathLike | Mapping[str, torch.Tensor]],
    calibration: torch.Tensor | Sequence[torch.Tensor] | None = None,
    weights: Sequence[float] | None = None,
    batch_size: int = 8,
    base_name: str | None = None,
    show_progress: bool = True,
) -> MergeResult:
    """Merge ``sources`` (fine-tuned folders, adapter folders, or ``{name: delta}`` tensors)
    into the base ``model`` in place.

    ``calibration`` (OBS methods): ``[n, seq_len]`` token ids shared by all tasks, or a list
    with one tensor per source (per-task Hessians when ``config.hessians == "per_task"``).
    ``base_name``: the name or path ``model`` was loaded from, checked against the base an
    adapter records.

    Example::

        base, tok = load_model_and_tokenizer("smollm2-135m")
        result = merge_(base, MergeConfig("sparsegpt_tv", 0.2), ["ft_alpaca", "ft_stories"],
                        calibration=[alpaca_windows, stories_windows])
        base.save_pretrained("merged")
    """
    if not isinstance(config, MergeConfig):
        raise TypeError(f"config must be a MergeConfig, got {type(config).__name__}")
    rule = check_merge_method(config.method)
    tasks = _as_tasks(sources, weights, config)
    streams = _streams(calibration, tasks, config.method) if config.needs_calibration else []
    for index, stream in enumerate(streams):
        check_token_windows(
            stream, model, "calibration" if len(streams) == 1 else f"calibration[{index}]"
        )
    if streams:
        check_batch_size(batch_size, "batch_size")
    base_name = base_name or getattr(model, "name_or_path", None)
    path_tasks = [t for t in tasks if t.vector is None]
    for task in path_tasks:
        task.info = inspect_source(task.label)
    if path_tasks:
        check_sources(model, [t.info for t in path_tasks], base_name, config.check_base)
    for task in tasks:
        if task.vector is None:
            task.vector = load_task_vector(model, task.info)
        else:
            _check_in_memory(model, task)
        logger.info("task vector of %s: %d changed tensors", task.label, len(task.vector))
    if not any(task.vector for task in tasks):
        raise ValueError(
            f"no source differs from the base model ({[t.label for t in tasks]}): there is "
            "nothing to merge; check that the sources are fine-tuned from this base"
        )
    start = time.perf_counter()
    generator = torch.Generator().manual_seed(config.seed)
    params = dict(model.named_parameters())
    obs_linears = _obs_targets(model, config, tasks) if rule.sparsify == "obs" else {}
    changed = sorted({name for task in tasks for name in task.vector})
    others = [n for n in changed if n not in obs_linears]
    options = obs_options(config)
    deltas: TaskVector = {}
    for name in others:  # data-free merge (or magnitude fallback of OBS methods)
        vectors = [t.vector.get(name, torch.zeros(params[name].shape)) for t in tasks]
        sparse = [
            sparsify(v, rule, t.density, None, generator, options)
            for v, t in zip(vectors, tasks, strict=True)
        ]
        deltas[name] = combine(
            sparse, [t.weight for t in tasks], rule, config.sign_method, config.normalize
        )
    applied_early = rule.sparsify != "obs" or config.sequential
    if applied_early:
        _add_deltas_(params, {n: deltas[n] for n in others})
    errors: dict[str, list[float]] = {}
    if obs_linears:
        pending = _merge_obs(
            model, tasks, rule, config, streams, obs_linears, batch_size, show_progress, errors
        )
        deltas.update(pending)
        if not config.sequential:  # measured on the base throughout; written at the end
            _add_deltas_(params, pending)
    if not applied_early:
        _add_deltas_(params, {n: deltas[n] for n in others})
    seconds = time.perf_counter() - start
    result = MergeResult(model, deltas, [t.label for t in tasks], seconds, errors)
    _record_merge_config(model, config, tasks, result)
    logger.info(
        "%s merged %d tasks into %d tensors (density %.3f) in %.1fs",
        config.method,
        len(tasks),
        len(deltas),
        result.density,
        seconds,
    )
    return result


def obs_options(config: MergeConfig) -> ObsOptions:
    """The OBS solver's settings in ``config`` (DARE's 1/density rescale from the method or
    ``dare_rescale``)."""
    by_density = MERGE_METHODS[config.method].density_rescale or config.dare_rescale
    return ObsOptions(config.block_size, config.dampening, config.rescale, by_density)


@torch.no_grad()
def _add_deltas_(params: dict[str, nn.Parameter], deltas: TaskVector) -> None:
    for name, delta in deltas.items():
        param = params[name]
        param.copy_((param.float() + delta.to(param.device)).to(param.dtype))


def _obs_targets(
    model: nn.Module, config: MergeConfig, tasks: list[_Task]
) -> dict[str, tuple[str, str, nn.Module]]:
    """``{weight name: (block, linear name, module)}`` of targeted linears that changed."""
    changed = {name for task in tasks for name in task.vector}
    chosen, experts = {}, set()
    for block, linears in target_linears(model, config.targets, ["lm_head"], config.blocks).items():
        for linear, module in linears.items():
            if isinstance(module, ExpertLinear):
                experts.add(linear.rpartition(".")[0])
            elif f"{linear}.weight" in changed:
                chosen[f"{linear}.weight"] = (block, linear, module)
    if experts & changed:
        logger.warning(
            "%s: stacked MoE expert weights (%s) are not solved by OBS yet; they are merged by "
            "the magnitude fallback used for tensors outside the OBS targets",
            config.method,
            sorted(experts & changed)[:3],
        )
    return chosen


class _StreamCollectors:
    """One statistics collector per calibration stream (per-task Hessians) or one for all."""

    def __init__(self, linears: dict[str, nn.Module], count: int) -> None:
        self.collectors = [StatsCollector(linears, True, False) for _ in range(count)]
        self.active: StatsCollector | None = None

    def switch(self, stream: int) -> None:
        chosen = self.collectors[stream if len(self.collectors) > 1 else 0]
        if chosen is self.active:
            return
        if self.active is not None:
            self.active.__exit__()
        self.active = chosen.__enter__()

    def close(self) -> None:
        if self.active is not None:
            self.active.__exit__()
            self.active = None


def _merge_obs(
    model: nn.Module,
    tasks: list[_Task],
    rule: MergeRule,
    config: MergeConfig,
    streams: list[torch.Tensor],
    obs_linears: dict[str, tuple[str, str, nn.Module]],
    batch_size: int,
    show_progress: bool,
    errors: dict[str, list[float]],
) -> TaskVector:
    by_block: dict[str, dict[str, nn.Module]] = {}
    for block, linear, module in obs_linears.values():
        by_block.setdefault(block, {})[linear] = module
    per_task = config.hessians == "per_task" and len(streams) > 1
    merged: TaskVector = {}
    options = obs_options(config)
    measuring: list[_StreamCollectors] = []  # the collectors of the block being measured
    owl = owl_densities(model, tasks, config, streams, by_block, batch_size, show_progress)

    def on_stream(stream: int) -> None:
        if measuring:
            measuring[0].switch(stream)

    def process_block(name: str, _block: nn.Module) -> Callable[[], None] | None:
        linears = by_block.get(name)
        if not linears:
            return None
        collectors = _StreamCollectors(linears, len(streams) if per_task else 1)
        measuring[:] = [collectors]
        collectors.switch(0)

        def finish() -> None:
            collectors.close()
            stats = [c.stats for c in collectors.collectors]
            for item in stats:
                missing = [n for n in linears if n not in item]
                if missing:
                    raise RuntimeError(f"{missing} saw no input during calibration (unused?)")
                all_reduce_stats(item)
            block_deltas = _merge_block(linears, stats, tasks, rule, config, options, errors, owl)
            merged.update(block_deltas)
            if config.sequential:
                _add_deltas_(dict(model.named_parameters()), block_deltas)

        return finish

    run_sequential(
        model,
        streams,
        process_block,
        batch_size=batch_size,
        blocks=config.blocks,
        show_progress=show_progress,
        after_block=broadcast_block,
        on_stream=on_stream if per_task else None,
    )
    return merged


def _merge_block(
    linears: dict[str, nn.Module],
    stats: list[dict],
    tasks: list[_Task],
    rule: MergeRule,
    config: MergeConfig,
    options: ObsOptions,
    errors: dict[str, list[float]],
    owl: list[dict[str, float]] | None = None,
) -> TaskVector:
    """Prune every task vector of a block's linears with its Hessian, then combine.
    ``owl``: per task, the sparsity of each linear's task vector (OWL); None = uniform."""
    groups: dict[int, list[str]] = {}
    for name in linears:  # layers reading the same input share one Hessian and one solve
        groups.setdefault(id(stats[0][name]), []).append(name)
    block_deltas: TaskVector = {}
    for names in groups.values():
        matrices = {n: weight_matrix(linears[n]) for n in names}
        conv = {n: tuple(matrices[n].shape) != tuple(linears[n].weight.shape) for n in names}
        pruned_rows: list[torch.Tensor] = []
        shared_factor = None
        for index, task in enumerate(tasks):
            item = stats[index if len(stats) > 1 else 0]
            hessian = item[names[0]].hessian
            device = hessian.device
            rows = []
            for n in names:
                delta = task.vector.get(f"{n}.weight")
                if delta is None:
                    delta = torch.zeros(matrices[n].shape)
                rows.append(delta.t() if conv[n] else delta)
            stacked = torch.cat(rows).to(device)
            if len(stats) == 1 and shared_factor is None:
                shared_factor = damped_inverse_cholesky(hessian, config.dampening)
            pruned = prune_task_vector_obs(
                stacked,
                hessian,
                task.density,
                options,
                hinv_upper=shared_factor if len(stats) == 1 else None,
                row_groups=[
                    (r.shape[0], owl[index][n] if owl else 1.0 - task.density)
                    for n, r in zip(names, rows, strict=True)
                ],
                exact_total=owl is not None,
            )
            first = 0
            for n, r in zip(names, rows, strict=True):
                part = slice(first, first + r.shape[0])
                error, norm = reconstruction_error(stacked[part], pruned[part], hessian)
                errors.setdefault(n, []).append(error / norm if norm > 0 else 0.0)
                first += r.shape[0]
            pruned_rows.append(pruned.cpu())
        first = 0
        for n in names:
            rows_n = matrices[n].shape[0]
            parts = [p[first : first + rows_n] for p in pruned_rows]
            merged = combine(
                parts, [t.weight for t in tasks], rule, config.sign_method, config.normalize
            )
            block_deltas[f"{n}.weight"] = merged.t().contiguous() if conv[n] else merged
            first += rows_n
    return block_deltas


def _record_merge_config(
    model: nn.Module, config: MergeConfig, tasks: list[_Task], result: MergeResult
) -> None:
    if getattr(model, "config", None) is None:
        return
    model.config.merging = {
        "method": config.method,
        "density": config.density,
        "models": [{"model": t.label, "weight": t.weight, "density": t.density} for t in tasks],
        "sequential": config.sequential if config.needs_calibration else None,
        "hessians": config.hessians if config.needs_calibration else None,
        "sparsity_profile": config.sparsity_profile,
        "merged_tensors": len(result.deltas),
        "measured_density": round(result.density, 6),
        "library": "hf_sparse",
    }
