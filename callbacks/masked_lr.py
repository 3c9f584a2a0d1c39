"""Find golden parameters when training starts and train them at their own learning rate.

Lifecycle:
  on_train_begin     masks: from the checkpoint being resumed, else ``masks_file``, else golden
                     masks computed from the first batches of the train dataloader; they go
                     to the ``MaskedAdamW`` optimizer (``GoldenParamsTrainer`` makes one), so
                     masked entries learn at ``inside_lr_scale * lr`` and the rest at
                     ``outside_lr_scale * lr``
                     (tensors without a mask are frozen unless ``freeze_unmasked=False``)
  on_save            write the packed masks next to the checkpoint, so a resumed run reuses them
  every save         after each ``save_pretrained`` of the model (checkpoints and
                     ``trainer.save_model()``): the packed masks, ``hf_sparse_results.json``,
                     ``recipe.yaml`` and the card

Example::

    callback = GoldenMaskCallback(GoldenConfig(top_k_percent=5, num_samples=8))
    trainer = GoldenParamsTrainer(model=model, args=args, train_dataset=ds, callbacks=[callback])
    trainer.train()

For a masked-LR PEFT adapter (``MaskedLRConfig``) the masks are part of the adapter's
structure and must exist before the model is wrapped: compute them first with
``hf_sparse.masked_lr.golden_masks`` or ``hf-sparse mask golden``.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch
from transformers import TrainerCallback

from hf_sparse.config_utils import to_dict
from hf_sparse.importance.samples import first_samples
from hf_sparse.masked_lr import GoldenConfig, golden_masks
from hf_sparse.masked_lr.trainer import freeze_parameters_without_masks, set_optimizer_masks
from hf_sparse.masks import ParameterMasks

from .saving import add_save_writer, write_callback_outputs

logger = logging.getLogger(__name__)

GOLDEN_MASKS_FILE = "golden_masks.safetensors"  # saved in each checkpoint folder


def _examples_from_batches(dataloader, num_samples: int) -> list[dict[str, torch.Tensor]]:
    """The first ``num_samples`` samples of the collated train batches, padding removed."""
    if dataloader is None:
        raise ValueError("no masks_file and no train dataloader to compute golden masks from")
    return first_samples(dataloader, num_samples, "golden masks")


class GoldenMaskCallback(TrainerCallback):
    """Golden masks at ``on_train_begin`` (``config``: the search; or a ``masks_file``), handed
    to the Trainer's ``MaskedAdamW`` so only the masked entries learn; saved with checkpoints.

    ``trainer.compare_generations_with_mask`` of a ``GoldenParamsTrainer`` finds these masks.
    """

    def __init__(
        self,
        config: GoldenConfig | None = None,
        masks_file: str | os.PathLike | None = None,
        inside_lr_scale: float = 1.0,
        outside_lr_scale: float = 0.0,
        freeze_unmasked: bool = True,
    ) -> None:
        if config is not None and not isinstance(config, GoldenConfig):
            raise TypeError(f"config must be a GoldenConfig, got {type(config).__name__}")
        if masks_file is not None and not Path(masks_file).is_file():
            raise FileNotFoundError(f"masks_file {masks_file} does not exist")
        if inside_lr_scale <= 0 or outside_lr_scale < 0:
            raise ValueError(
                f"inside_lr_scale must be > 0 and outside_lr_scale >= 0, got "
                f"{inside_lr_scale} and {outside_lr_scale}"
            )
        self.config = config if config is not None else GoldenConfig(num_samples=8)
        self.masks_file = masks_file
        self.inside_lr_scale = inside_lr_scale
        self.outside_lr_scale = outside_lr_scale
        self.freeze_unmasked = freeze_unmasked
        self.masks: ParameterMasks | None = None

    def _find_masks(self, args, state, model, train_dataloader) -> ParameterMasks:
        checkpoint = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if state.global_step > 0 and (checkpoint / GOLDEN_MASKS_FILE).is_file():
            logger.info("resuming with the golden masks saved in %s", checkpoint)
            return ParameterMasks.load(checkpoint / GOLDEN_MASKS_FILE)
        if self.masks_file is not None:
            return ParameterMasks.load(self.masks_file)
        examples = _examples_from_batches(train_dataloader, self.config.num_samples)
        result = golden_masks(
            model, self.config, examples, None, show_progress=state.is_local_process_zero
        )
        return result.masks

    def on_train_begin(
        self, args, state, control, model=None, train_dataloader=None, optimizer=None, **kwargs
    ):
        self.state = state
        add_save_writer(model, "GoldenMaskCallback", self._write_outputs, ("golden-parameters",))
        if self.masks is None:
            self.masks = self._find_masks(args, state, model, train_dataloader)
            self.masks.check_against(model)
            logger.info("golden masks: %s", self.masks)
        if self.freeze_unmasked:
            freeze_parameters_without_masks(model, self.masks)
        set_optimizer_masks(
            optimizer, model, self.masks, self.inside_lr_scale, self.outside_lr_scale
        )

    def _settings(self) -> dict:
        return {
            **to_dict(self.config),
            "masks_file": str(self.masks_file) if self.masks_file is not None else None,
            "inside_lr_scale": self.inside_lr_scale,
            "outside_lr_scale": self.outside_lr_scale,
            "freeze_unmasked": self.freeze_unmasked,
        }

    def _write_outputs(self, folder: Path, model) -> None:
        """Masks, results, recipe and card into a folder the model was just saved into."""
        if self.masks is None:
            return
        self.masks.save(folder / GOLDEN_MASKS_FILE)
        write_callback_outputs(
            folder, "GoldenMaskCallback", model, self._settings(), {"golden": self._settings()},
            masks={"file": GOLDEN_MASKS_FILE, "kept": self.masks.count(),
                   "density": self.masks.density()},
            global_step=getattr(getattr(self, "state", None), "global_step", None),
        )  # fmt: skip

    def on_save(self, args, state, control, **kwargs):
        if self.masks is not None and state.is_world_process_zero:
            checkpoint = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            checkpoint.mkdir(parents=True, exist_ok=True)
            self.masks.save(checkpoint / GOLDEN_MASKS_FILE)


class SparseGradientAccumulationCallback(TrainerCallback):
    """Gradient accumulation at the mask's positions only (``SparseGradientAccumulator``).

    Lifecycle:
      on_step_begin (first)  masks: ``masks`` given here, else those of the Trainer's
                             ``MaskedAdamW`` (e.g. set by ``GoldenMaskCallback``); hooks fold
                             each micro-step's gradients into per-position sums and free the
                             dense ones; on the last micro-step (accelerate's
                             ``sync_gradients``) the dense gradient is rebuilt, 0 off the mask
      on_train_end           hooks removed

    The entries outside the mask get a zero gradient, so they must be frozen: the optimizer
    must be a ``MaskedAdamW`` with ``outside_lr_scale`` 0 (checked). Gradient clipping then
    measures the norm of the masked entries only.
    """

    def __init__(self, masks: ParameterMasks | dict | None = None) -> None:
        self.masks = masks
        self.accumulator = None

    def on_step_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        if self.accumulator is not None:
            return
        from accelerate.state import GradientState

        from hf_sparse.masked_lr import SparseGradientAccumulator
        from hf_sparse.masked_lr.trainer import unwrap_optimizer

        inner = unwrap_optimizer(optimizer)
        scales = [g.get("outside_lr_scale") for g in getattr(inner, "param_groups", [])]
        if not hasattr(inner, "get_masks") or any(s != 0 for s in scales):
            raise ValueError(
                "SparseGradientAccumulationCallback drops the gradients outside the mask: it needs "
                f"a MaskedAdamW with outside_lr_scale 0 (got {type(inner).__name__}, outside "
                f"scales {scales}); use GoldenParamsTrainer with outside_lr_scale=0"
            )
        masks = self.masks
        if masks is None:
            names = {id(p): n for n, p in model.named_parameters()}
            masks = {names[id(p)]: m for p, m in inner.get_masks().items()}
        if not masks:
            raise ValueError("no masks: pass masks= or give the optimizer masks before training")
        self.accumulator = SparseGradientAccumulator(model, masks)
        gradient_state = GradientState()
        self.accumulator.attach(lambda: gradient_state.sync_gradients)
        logger.info(
            "sparse gradient accumulation on %d tensors: %d bytes instead of %d",
            len(masks),
            self.accumulator.storage_bytes(),
            self.accumulator.dense_bytes(),
        )

    def on_train_end(self, args, state, control, **kwargs):
        if self.accumulator is not None:
            self.accumulator.detach()
            self.accumulator = None
