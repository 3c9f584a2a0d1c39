"""Prune when training starts and keep the mask while fine-tuning.

Lifecycle:
  on_train_begin     prune with the config (calibration: the given windows, else the first
                     batches of the train dataloader); when resuming from a checkpoint, load
                     the mask saved with it (or derive it from the zeros) instead of re-pruning
  on_optimizer_step  re-apply the mask (after ``optimizer.step()``, before ``zero_grad``)
  on_save            write the packed mask next to the checkpoint
  every save         after each ``save_pretrained`` of the model (checkpoints and
                     ``trainer.save_model()``): the packed mask, the ``sparsity`` block in
                     ``config.json``, ``hf_sparse_results.json``, ``recipe.yaml`` and the card

Example::

    trainer = Trainer(model, args, train_dataset=ds,
                      callbacks=[PruningCallback(SparseGPTConfig(sparsity=0.5))])
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from transformers import TrainerCallback

from hf_sparse.config_utils import to_dict
from hf_sparse.masks.bitmask import MASKS_FILE, load_masks, save_masks
from hf_sparse.models import target_linears, weight_matrix
from hf_sparse.pruning import PruningConfig, apply_masks_, prune_

from .saving import add_save_writer, write_callback_outputs

logger = logging.getLogger(__name__)


class PruningCallback(TrainerCallback):
    """Prune at ``on_train_begin`` with ``config`` (calibration: ``calibration`` windows, else the
    first ``num_calibration_batches`` train batches) and keep the mask while training; every
    folder the model is saved into gets the mask, the ``sparsity`` block and a card (the
    lifecycle is in the module docstring). ``masks`` holds the keep-masks once pruned."""

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
        self.state = state
        add_save_writer(
            model, "PruningCallback", self._write_outputs, ("pruned", self.config.method)
        )
        if self.masks is not None:
            return
        checkpoint = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if state.global_step > 0:
            self.masks = self._resumed_masks(model, checkpoint)
            self._ensure_sparsity_block(model)
            logger.info("resumed at step %d with the saved sparsity mask", state.global_step)
            return
        calibration = self.calibration
        if calibration is None and self.config.needs_calibration:
            calibration = self._calibration_from(train_dataloader)
        result = prune_(model, self.config, calibration, show_progress=state.is_local_process_zero)
        self.masks = result.masks

    def _measured(self) -> float:
        total = sum(m.numel() for m in self.masks.values())
        kept = sum(int(m.sum()) for m in self.masks.values())
        return 1 - kept / total if total else 0.0

    def _ensure_sparsity_block(self, model) -> None:
        """A resumed run's model was built from the base: give its config the block again."""
        config = getattr(model, "config", None)
        if config is None or getattr(config, "sparsity", None):
            return
        settings = to_dict(self.config)
        config.sparsity = {
            "method": self.config.method,
            "sparsity": self.config.sparsity,
            "structure": self.config.mask,
            "targets": settings.pop("targets"),
            "ignore": settings.pop("ignore"),
            "pruned_layers": len(self.masks),
            "measured_sparsity": round(self._measured(), 6),
            "settings": settings,
            "library": "hf_sparse",
        }

    def _write_outputs(self, folder: Path, model) -> None:
        """Mask, results, recipe and card into a folder the model was just saved into."""
        if not self.masks:
            return
        save_masks(self.masks, folder / MASKS_FILE)
        settings = to_dict(self.config)
        write_callback_outputs(
            folder, "PruningCallback", model,
            {"method": self.config.method, "structure": self.config.mask, **settings},
            {"pruning": {self.config.method: settings}}, {"sparsity": self._measured()},
            global_step=getattr(getattr(self, "state", None), "global_step", None),
        )  # fmt: skip

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
