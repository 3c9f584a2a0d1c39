"""Prune what a full fine-tune changed, and save it as a sparse-delta adapter.

Lifecycle:
  on_train_begin   remember the base: the target linears' weights before training (or those of
                   ``base_model`` when given, which a resumed run needs); for ``sparsegpt_tv``
                   also the base model's layer-input Hessians on the first
                   ``config.calibration_samples`` training samples (padding removed), summed
                   over ranks
  on_train_end     tau = trained - base per target linear; prune each to ``config.density``
                   (SparseGPT's OBS solver with the base Hessians, or TIES' magnitude trim
                   for ``magnitude_prune``); save it under
                   ``<output_dir>/<output_subdir>`` as a ``MASKED_LR`` adapter of the base
                   (``PeftModel.from_pretrained(base, path)`` after ``import hf_sparse``); with
                   ``apply_to_model`` the trained model's weights become base + pruned tau,
                   and every later save of the model (``trainer.save_model()``) gets the
                   results, recipe and card of that model

Example::

    callback = TaskVectorPruneCallback(TaskVectorPruneConfig(density=0.1))
    trainer = Trainer(model=model, args=args, train_dataset=ds, callbacks=[callback])
    trainer.train()   # -> <output_dir>/pruned_task_vector/adapter_model.safetensors
"""

from __future__ import annotations

import copy
import logging
import os
from dataclasses import asdict
from pathlib import Path

import torch
from transformers import TrainerCallback

from hf_sparse.importance.samples import first_samples
from hf_sparse.loading import base_model_id
from hf_sparse.merging.config import TaskVectorPruneConfig
from hf_sparse.merging.core import ObsOptions
from hf_sparse.merging.sparse_delta import (
    base_hessians,
    prune_deltas,
    save_sparse_delta_adapter,
    stored_to_matrix_names,
)
from hf_sparse.models import reject_expert_views, target_linears
from hf_sparse.outputs import results_record

from .saving import add_save_writer, write_callback_outputs

logger = logging.getLogger(__name__)

OUTPUT_SUBDIR = "pruned_task_vector"


def _first_samples(dataloader, count: int) -> list[dict]:
    if dataloader is None:
        raise ValueError("sparsegpt_tv needs calibration samples: the train dataloader is missing")
    return first_samples(dataloader, count, "the base Hessians")


class TaskVectorPruneCallback(TrainerCallback):
    """Prune the fine-tuning delta to ``config.density`` at ``on_train_end`` and save it as a
    sparse-delta adapter of the base (see the module docstring for the lifecycle)."""

    def __init__(
        self,
        config: TaskVectorPruneConfig | None = None,
        output_subdir: str = OUTPUT_SUBDIR,
        base_model: str | os.PathLike | None = None,
        apply_to_model: bool = False,
    ) -> None:
        """``base_model``: folder or name of the base weights, needed when the run resumes from
        a checkpoint (the weights at the start are then not the base). ``apply_to_model``: the
        trained model's weights become base + pruned task vector."""
        config = config if config is not None else TaskVectorPruneConfig()
        if not isinstance(config, TaskVectorPruneConfig):
            raise TypeError(f"config must be a TaskVectorPruneConfig, got {type(config).__name__}")
        self.config = config
        self.output_subdir = output_subdir
        self.base_model = base_model
        self.apply_to_model = apply_to_model
        self.options = ObsOptions(config.block_size, config.dampening, config.rescale)
        self.base_weights: dict[str, torch.Tensor] = {}
        self.hessians: dict[str, torch.Tensor] | None = None
        self.errors: dict[str, float] = {}
        self.saved_to: Path | None = None

    def _linears(self, model) -> dict:
        grouped = target_linears(model, self.config.targets, blocks=self.config.blocks)
        reject_expert_views(grouped, "TaskVectorPruneCallback")
        return {name: module for linears in grouped.values() for name, module in linears.items()}

    def on_train_begin(self, args, state, control, model=None, train_dataloader=None, **kwargs):
        if model is None:
            raise ValueError("TaskVectorPruneCallback needs the model (run it inside a Trainer)")
        base = model
        if self.base_model is not None:
            from hf_sparse.loading import load_model_and_tokenizer

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
        if self.config.method == "sparsegpt_tv":
            samples = _first_samples(train_dataloader, self.config.calibration_samples)
            self.hessians = base_hessians(base, samples, linears)
        logger.info(
            "task-vector pruning: %d target linears remembered (%s)",
            len(linears),
            self.config.method,
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
        config = self.config
        pruned, self.errors = prune_deltas(
            deltas, config.method, config.density, self.hessians, transposed, self.options
        )
        if state.is_world_process_zero:
            base_copy = copy.deepcopy(model).cpu()
            base_modules = dict(base_copy.named_modules())
            with torch.no_grad():
                for name, weight in self.base_weights.items():
                    base_modules[name].weight.copy_(weight)
            errors = self.errors
            record = results_record(
                "TaskVectorPruneCallback",
                config=asdict(config),
                metrics={
                    "mean_relative_output_error": (
                        sum(errors.values()) / len(errors) if errors else None
                    ),
                },
                base_model=base_model_id(str(self.base_model) if self.base_model else model),
                global_step=state.global_step,
                relative_output_error=errors,
            )
            recipe = {"callback": "TaskVectorPruneCallback", "task_vector_prune": asdict(config)}
            output = Path(args.output_dir) / self.output_subdir
            self.saved_to = save_sparse_delta_adapter(
                base_copy, pruned, output, record, recipe, overwrite=True
            )
        if self.apply_to_model:
            with torch.no_grad():
                for name, module in linears.items():
                    weight = module.weight
                    value = self.base_weights[name] + pruned[name]
                    weight.copy_(value.to(device=weight.device, dtype=weight.dtype))
            self.global_step = state.global_step
            add_save_writer(model, "TaskVectorPruneCallback", self._write_outputs, ("task-vector",))

    def _write_outputs(self, folder: Path, model) -> None:
        """Results, recipe and card of the model with the pruned task vector applied."""
        errors = self.errors
        write_callback_outputs(
            folder, "TaskVectorPruneCallback", model, asdict(self.config),
            {"task_vector_prune": asdict(self.config), "apply_to_model": True},
            {"mean_relative_output_error": sum(errors.values()) / len(errors) if errors else None},
            global_step=getattr(self, "global_step", None), applied_to_model=True,
            adapter=str(self.saved_to) if self.saved_to else None,
        )  # fmt: skip
