"""Prune what a full fine-tune changed, and save it as a sparse-delta adapter.

Lifecycle:
  on_train_begin   remember the base: the target linears' weights before training (or those of
                   ``base_model`` when given, which a resumed run needs); for ``sparsegpt_tv``
                   also the base model's layer-input Hessians on the first
                   ``calibration_samples`` training samples (padding removed), summed over ranks
  on_train_end     tau = trained - base per target linear; prune each to ``density`` (SparseGPT's
                   OBS solver with the base Hessians, or TIES' magnitude trim); save it under
                   ``<output_dir>/<output_subdir>`` as a ``MASKED_LR`` adapter of the base
                   (``PeftModel.from_pretrained(base, path)`` after ``import hf_sparse``); with
                   ``apply_to_model`` the trained model's weights become base + pruned tau

Example::

    trainer = Trainer(model=model, args=args, train_dataset=ds,
                      callbacks=[TaskVectorPruneCallback(density=0.1)])
    trainer.train()   # -> <output_dir>/pruned_task_vector/adapter_model.safetensors
"""

from __future__ import annotations

import copy
import logging
import os
from pathlib import Path

import torch
from transformers import TrainerCallback

from hf_sparse.importance.samples import first_samples
from hf_sparse.merging.core import ObsOptions, check_density
from hf_sparse.merging.sparse_delta import (
    base_hessians,
    check_prune_method,
    prune_deltas,
    save_sparse_delta_adapter,
    stored_to_matrix_names,
)
from hf_sparse.models import reject_expert_views, target_linears

logger = logging.getLogger(__name__)

OUTPUT_SUBDIR = "pruned_task_vector"


def _first_samples(dataloader, count: int) -> list[dict]:
    if dataloader is None:
        raise ValueError("sparsegpt_tv needs calibration samples: the train dataloader is missing")
    return first_samples(dataloader, count, "the base Hessians")


class TaskVectorPruneCallback(TrainerCallback):
    def __init__(
        self,
        density: float = 0.1,
        method: str = "sparsegpt_tv",
        calibration_samples: int = 32,
        targets: list[str] | None = None,
        output_subdir: str = OUTPUT_SUBDIR,
        base_model: str | os.PathLike | None = None,
        apply_to_model: bool = False,
        block_size: int = 128,
        dampening: float = 0.01,
        rescale: bool = False,
    ) -> None:
        """``density``: kept fraction of each target's task vector, in (0, 1]. ``method``:
        ``sparsegpt_tv`` or ``magnitude``. ``targets``: decoder-block linears (roles, class names,
        suffixes, ``re:``), None = all. ``base_model``: folder or name of the base weights, needed
        when the run resumes from a checkpoint (the weights at the start are then not the base)."""
        self.density = check_density(density)
        self.method = check_prune_method(method)
        if not isinstance(calibration_samples, int) or calibration_samples < 1:
            raise ValueError(
                f"calibration_samples must be a positive integer, got {calibration_samples!r}"
            )
        self.calibration_samples = calibration_samples
        self.targets = targets
        self.output_subdir = output_subdir
        self.base_model = base_model
        self.apply_to_model = apply_to_model
        self.options = ObsOptions(block_size, dampening, rescale)
        self.base_weights: dict[str, torch.Tensor] = {}
        self.hessians: dict[str, torch.Tensor] | None = None
        self.errors: dict[str, float] = {}
        self.saved_to: Path | None = None

    def _linears(self, model) -> dict:
        grouped = target_linears(model, self.targets)
        reject_expert_views(grouped, "TaskVectorPruneCallback")
        return {name: module for linears in grouped.values() for name, module in linears.items()}

    def on_train_begin(self, args, state, control, model=None, train_dataloader=None, **kwargs):
        if model is None:
            raise ValueError("TaskVectorPruneCallback needs the model (run it inside a Trainer)")
        base = model
        if self.base_model is not None:
            from hf_sparse.pipeline import load_model_and_tokenizer

            base, _ = load_model_and_tokenizer(str(self.base_model))
            base.to(next(model.parameters()).device)
        elif state.global_step > 0:
            raise ValueError(
                "this run resumes from a checkpoint, so the weights at the start are not the "
                "base model: pass TaskVectorPruneCallback(base_model=<base folder or name>)"
            )
        linears = self._linears(base)
        self.base_weights = {
            name: module.weight.detach().float().cpu().clone() for name, module in linears.items()
        }
        if self.method == "sparsegpt_tv":
            samples = _first_samples(train_dataloader, self.calibration_samples)
            self.hessians = base_hessians(base, samples, linears)
        logger.info(
            "task-vector pruning: %d target linears remembered (%s)", len(linears), self.method
        )

    def on_train_end(self, args, state, control, model=None, **kwargs):
        if not self.base_weights:
            raise RuntimeError("on_train_end before on_train_begin: no base weights remembered")
        linears = self._linears(model)
        deltas = {
            name: module.weight.detach().float().cpu() - self.base_weights[name]
            for name, module in linears.items()
        }
        transposed = stored_to_matrix_names(model, deltas)
        pruned, self.errors = prune_deltas(
            deltas, self.method, self.density, self.hessians, transposed, self.options
        )
        if state.is_world_process_zero:
            base_copy = copy.deepcopy(model).cpu()
            base_modules = dict(base_copy.named_modules())
            with torch.no_grad():
                for name, weight in self.base_weights.items():
                    base_modules[name].weight.copy_(weight)
            summary = {
                "method": self.method,
                "density": self.density,
                "global_step": state.global_step,
                "relative_output_error": self.errors,
                "mean_relative_output_error": (
                    sum(self.errors.values()) / len(self.errors) if self.errors else None
                ),
            }
            output = Path(args.output_dir) / self.output_subdir
            self.saved_to = save_sparse_delta_adapter(
                base_copy, pruned, output, overwrite=True, summary=summary
            )
        if self.apply_to_model:
            with torch.no_grad():
                for name, module in linears.items():
                    weight = module.weight
                    value = self.base_weights[name] + pruned[name]
                    weight.copy_(value.to(device=weight.device, dtype=weight.dtype))
