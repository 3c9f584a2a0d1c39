"""``BasisSharingCallback``: compress at ``on_train_begin`` from the train data, then recover.

One Trainer run does Basis Sharing compression (Wang et al., ICLR 2025) and recovery
fine-tuning: the model handed to Trainer is built with ``get_basis_sharing_model(..., defer=True)``
(dense weights still in place, factors allocated), so the optimizer Trainer creates already holds
the trainable factors; at ``on_train_begin`` this callback collects ``X^T X`` on the first
``num_batches`` train batches and fills the factors in place (``fill_deferred_factors_``).
Every folder the adapter is then saved into (checkpoints, ``trainer.save_model()``) gets
``hf_sparse_results.json`` (the parameter counts), ``recipe.yaml`` and the card.

Example::

    model = get_basis_sharing_model(base, BasisSharingConfig(ratio=0.4), defer=True)
    trainer = Trainer(model=model, args=args, train_dataset=data,
                      callbacks=[BasisSharingCallback(num_batches=32)])
    trainer.train()  # compresses, then trains the coefficients
"""

from __future__ import annotations

import logging

import torch
from transformers import TrainerCallback

from hf_sparse.basis_sharing import fill_deferred_factors_

from .saving import add_save_writer, write_callback_outputs

logger = logging.getLogger(__name__)


class BasisSharingCallback(TrainerCallback):
    """Compress the (deferred) ``BASIS_SHARING`` adapter once at ``on_train_begin``, from the
    first ``num_batches`` train batches, then let Trainer fine-tune its factors; each saved
    folder gets the results, recipe and card (module docstring)."""

    def __init__(self, num_batches: int = 16, adapter_name: str = "default") -> None:
        if not isinstance(num_batches, int) or isinstance(num_batches, bool) or num_batches < 1:
            raise ValueError(f"num_batches must be a positive integer, got {num_batches!r}")
        self.num_batches = num_batches
        self.adapter_name = adapter_name
        self.compressed = False
        self.counts: dict[str, int] | None = None

    def on_train_begin(self, args, state, control, model=None, train_dataloader=None, **kwargs):
        if model is None:
            return control
        add_save_writer(model, "BasisSharingCallback", self._write_outputs, ("basis-sharing",))
        if self.compressed:
            return control
        layers = model.base_model.layers(self.adapter_name)
        if not any(layer.basis_sharing_pending[self.adapter_name] for layer in layers.values()):
            self.compressed = True  # resumed run or an adapter compressed beforehand
            return control
        if train_dataloader is None:
            raise ValueError("BasisSharingCallback needs the train dataloader to calibrate")
        batches = []
        for batch in train_dataloader:
            batches.append(batch["input_ids"].detach().cpu())
            if len(batches) >= self.num_batches:
                break
        width = min(b.shape[1] for b in batches)
        calibration = torch.cat([b[:, :width] for b in batches])
        self.counts = fill_deferred_factors_(  # long: logged with progress by the library
            model, calibration=calibration, adapter_name=self.adapter_name
        )
        self.compressed = True
        logger.info("basis_sharing: compressed with %d windows: %s", len(calibration), self.counts)
        return control

    def _write_outputs(self, folder, model) -> None:
        """Results (parameter counts), recipe and card into a folder the adapter was saved in."""
        if not self.compressed:
            return
        config = model.peft_config[self.adapter_name].to_dict()
        settings = {k: config.get(k) for k in ("ratio", "group_size", "shared_roles")}
        counts = self.counts or model.base_model.parameter_counts(self.adapter_name)
        write_callback_outputs(
            folder, "BasisSharingCallback", model, {**settings, "num_batches": self.num_batches},
            {"basis_sharing": settings, "num_batches": self.num_batches},
            {"parameters": counts},
        )  # fmt: skip
