"""One fine-tuning delta, pruned against the base and saved as a sparse-delta adapter.

Lifecycle (what ``TaskVectorPruneCallback`` does around a full fine-tune):
    base_hessians(model, samples, linears)   -> X^T X / tokens of each linear's input on the base
                                                model (before training), all-reduced over ranks
    prune_deltas(deltas, method, density, ...) -> the task vector pruned per tensor (SparseGPT-TV
                                                with the Hessians, or TIES' magnitude trim)
    save_sparse_delta_adapter(base, deltas, dir) -> a MASKED_LR adapter: the kept values + their
                                                packed mask, loadable with PeftModel.from_pretrained
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from ..calibration import StatsCollector, all_reduce_stats
from ..io import atomic_output_dir
from ..masked_lr import sparse_delta_model
from ..models import weight_matrix
from ..outputs import write_outputs
from .config import TASK_VECTOR_PRUNE_METHODS
from .core import (
    ObsOptions,
    check_density,
    prune_task_vector_obs,
    reconstruction_error,
    trim_magnitude,
)

logger = logging.getLogger(__name__)


@torch.no_grad()
def base_hessians(
    model: nn.Module,
    samples: Iterable[Mapping[str, torch.Tensor]],
    linears: Mapping[str, nn.Module],
    show_progress: bool = False,
) -> dict[str, torch.Tensor]:
    """``{linear name: X^T X / tokens}`` of each linear's inputs while ``model`` runs on the
    samples (dicts with ``input_ids``, one unpadded sequence each), summed over ranks."""
    was_training = model.training
    model.eval()
    try:
        with StatsCollector(dict(linears), need_xtx=True, need_sq_norms=False) as collector:
            device = next(model.parameters()).device
            for sample in tqdm(samples, desc="base Hessians", disable=not show_progress):
                ids = torch.as_tensor(sample["input_ids"]).reshape(1, -1).to(device)
                model(input_ids=ids, use_cache=False)
    finally:
        model.train(was_training)
    missing = [name for name in linears if name not in collector.stats]
    if missing:
        raise RuntimeError(f"{missing[:4]} saw no input while measuring Hessians (unused layers?)")
    all_reduce_stats(collector.stats)
    return {name: collector.stats[name].hessian for name in linears}


def prune_deltas(
    deltas: Mapping[str, torch.Tensor],
    method: str,
    density: float,
    hessians: Mapping[str, torch.Tensor] | None = None,
    transposed: Iterable[str] = (),
    options: ObsOptions | None = None,
) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """Prune each delta (keyed by module name, stored layout) to ``density``.

    ``sparsegpt_tv`` uses ``hessians[name]`` (``[in, in]``); tensors stored as ``[in, out]``
    (GPT-2 Conv1D) are named in ``transposed``. Returns the pruned deltas and, with Hessians,
    each one's relative output error ``||X (tau - tau_pruned)||^2 / ||X tau||^2``.
    """
    if method not in TASK_VECTOR_PRUNE_METHODS:
        raise ValueError(
            f"task-vector pruning method must be one of {list(TASK_VECTOR_PRUNE_METHODS)}, "
            f"got {method!r}"
        )
    check_density(density)
    options = options or ObsOptions()
    if method == "sparsegpt_tv" and hessians is None:
        raise ValueError("sparsegpt_tv needs the base model's layer-input Hessians")
    transposed = set(transposed)
    pruned, errors = {}, {}
    for name, delta in deltas.items():
        matrix = delta.t() if name in transposed else delta
        if method == "sparsegpt_tv":
            hessian = hessians[name]
            kept = prune_task_vector_obs(matrix.to(hessian.device), hessian, density, options)
        else:
            kept = trim_magnitude(matrix.float(), density)
        if hessians is not None and name in hessians:
            error, norm = reconstruction_error(
                matrix.float(), kept.cpu().float(), hessians[name].cpu()
            )
            errors[name] = error / norm if norm > 0 else 0.0
        kept = kept.cpu()
        pruned[name] = kept.t().contiguous() if name in transposed else kept
    return pruned, errors


def save_sparse_delta_adapter(
    base: nn.Module,
    deltas: Mapping[str, torch.Tensor],
    output_dir: str | os.PathLike,
    record: dict,
    recipe: dict | None = None,
    extra_files: Mapping[str, str] | None = None,
    tokenizer=None,
    overwrite: bool = False,
) -> Path:
    """Save ``{module name or weight name: delta}`` (stored layout) as a ``MASKED_LR`` adapter
    on ``base`` (whose weights are the base weights), with the results ``record`` (see
    ``hf_sparse.outputs``), the recipe and ``extra_files`` (e.g. the card). ``base`` is wrapped
    in place (pass a copy to keep it)."""
    adapted = sparse_delta_model(base, deltas)
    with atomic_output_dir(output_dir, overwrite) as tmp:
        adapted.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        write_outputs(tmp, record, recipe)
        for filename, text in (extra_files or {}).items():
            (tmp / filename).write_text(text)
    logger.info("saved sparse-delta adapter (%d tensors) to %s", len(deltas), output_dir)
    return Path(output_dir)


def stored_to_matrix_names(model: nn.Module, names: Iterable[str]) -> set[str]:
    """The names among ``names`` (module names) whose weight is stored transposed (Conv1D)."""
    modules = dict(model.named_modules())
    return {
        n for n in names if tuple(weight_matrix(modules[n]).shape) != tuple(modules[n].weight.shape)
    }
