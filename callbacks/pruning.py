"""Prune when training starts and keep the mask while fine-tuning.

Lifecycle:
  on_train_begin     prune with the config (calibration: the given windows, else the first
                     batches of the train dataloader); when resuming from a checkpoint, load
                     the mask saved with it (or derive it from the zeros) instead of re-pruning
  on_optimizer_step  re-apply the mask (after ``optimizer.step()``, before ``zero_grad``)
  on_save            write the packed mask next to the checkpoint

Example::

    trainer = Trainer(model, args, train_dataset=ds,
                      callbacks=[PruningCallback(SparseGPTConfig(sparsity=0.5))])
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from transformers import TrainerCallback

from hf_sparse.masks.bitmask import MASKS_FILE, load_masks, save_masks
from hf_sparse.models import target_linears, weight_matrix
from hf_sparse.pruning import PruningConfig, apply_masks_, prune_

logger = logging.getLogger(__name__)


class PruningCallback(TrainerCallback):
    def __init__(
        self,
        config: PruningConfig,
        calibration: torch.Tensor | None = None,
        num_calibration_batches: int = 8,
    ) -> None:
        if not isinstance(config, PruningConfig):
            raise TypeError(f"config must be a PruningConfig, got {type(config).__name__}")
        if num_calibration_batches < 1:
            raise ValueError(f"num_calibration_batches must be >= 1, got {num_calibration_batches}")
        self.config = config
        self.calibration = calibration
        self.num_calibration_batches = num_calibration_batches
        self.masks: dict[str, torch.Tensor] | None = None

    def _calibration_from(self, dataloader) -> torch.Tensor:
        if dataloader is None:
            raise ValueError("no calibration windows and no train dataloader to take them from")
        batches = []
        for i, batch in enumerate(dataloader):
            if i >= self.num_calibration_batches:
                break
            batches.append(batch["input_ids"].cpu())
        if not batches:
            raise ValueError("the train dataloader is empty: no calibration data")
        length = min(b.shape[1] for b in batches)
        return torch.cat([b[:, :length] for b in batches])

    def on_train_begin(self, args, state, control, model=None, train_dataloader=None, **kwargs):
        if self.masks is not None:
            return
        checkpoint = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if state.global_step > 0:
            self.masks = self._resumed_masks(model, checkpoint)
            logger.info("resumed at step %d with the saved sparsity mask", state.global_step)
            return
        calibration = self.calibration
        if calibration is None and self.config.needs_calibration:
            calibration = self._calibration_from(train_dataloader)
        result = prune_(model, self.config, calibration, show_progress=state.is_local_process_zero)
        self.masks = result.masks

    def _resumed_masks(self, model, checkpoint: Path) -> dict[str, torch.Tensor]:
        if (checkpoint / MASKS_FILE).exists():
            masks = load_masks(checkpoint / MASKS_FILE)
            apply_masks_(model, masks)
            return masks
        grouped = target_linears(model, self.config.targets, self.config.ignore, self.config.blocks)
        return {
            n: weight_matrix(m).detach().ne(0).cpu() for g in grouped.values() for n, m in g.items()
        }

    def on_optimizer_step(self, args, state, control, model=None, **kwargs):
        if self.masks:
            apply_masks_(model, self.masks)

    def on_save(self, args, state, control, **kwargs):
        if self.masks and state.is_world_process_zero:
            checkpoint = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            checkpoint.mkdir(parents=True, exist_ok=True)
            save_masks(self.masks, checkpoint / MASKS_FILE)
