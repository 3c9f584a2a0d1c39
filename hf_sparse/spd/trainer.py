"""``SPDTrainer``: a ``transformers.Trainer`` that learns an SPD decomposition.

Lifecycle:
    train()          -> faithfulness warm-up of U, V (unless resuming), then Trainer.train
    compute_loss()   -> the SPD loss against the frozen target (objective.spd_loss), with the
                        importance-minimality weight from its schedule at the current step
    log()            -> each loss term averaged since the last log, as ``spd/<term>``, so
                        callbacks see them in ``on_log`` and they land in ``log_history``

The frozen target is the same model with its decomposed layers switched to the base weights,
so no second copy is held in memory.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import torch
from torch.utils.data import DataLoader
from transformers import Trainer

from .config import SPDLossConfig
from .objective import faithfulness_warmup_, spd_loss
from .toy_models import ToyBatches


class SPDTrainer(Trainer):
    """Trainer for an SPD-decomposed model (``get_spd_model``).

    Example::

        model = get_spd_model(toy, SPDConfig(C=20, target_modules=["linear1", "linear2"]))
        args = TrainingArguments("out", max_steps=5000, learning_rate=1e-3,
                                 lr_scheduler_type="cosine", report_to=[])
        SPDTrainer(model=model, args=args, train_dataset=ToyBatches(tms, 1024),
                   spd_loss=SPDLossConfig(importance_minimality_coeff=3e-3)).train()
    """

    def __init__(
        self,
        *args,
        spd_loss: SPDLossConfig | None = None,
        blocks: str | None = None,
        **kwargs,
    ) -> None:
        """``blocks``: dotted path or ``re:`` pattern of a language model's decoder-block
        ModuleList (None = found from the model; only used to skip the undecomposed first
        blocks on repeated passes)."""
        super().__init__(*args, **kwargs)
        self.spd_loss_config = spd_loss or SPDLossConfig()
        self.spd_blocks = blocks
        self._spd_sums: dict[str, float] = defaultdict(float)
        self._spd_count = 0
        self.spd_warmup_loss: float | None = None

    def get_train_dataloader(self) -> DataLoader:
        if isinstance(self.train_dataset, ToyBatches):  # yields whole batches already
            return DataLoader(self.train_dataset, batch_size=None)
        return super().get_train_dataloader()

    def train(self, resume_from_checkpoint: str | bool | None = None, **kwargs) -> Any:
        config = self.spd_loss_config
        if not resume_from_checkpoint and config.faithfulness_warmup_steps > 0:
            self.spd_warmup_loss = faithfulness_warmup_(
                self.model,
                config.faithfulness_warmup_steps,
                config.faithfulness_warmup_lr,
                config.faithfulness_warmup_weight_decay,
            )
        return super().train(resume_from_checkpoint=resume_from_checkpoint, **kwargs)

    def compute_loss(
        self,
        model: torch.nn.Module,
        inputs: dict[str, Any],
        return_outputs: bool = False,
        num_items_in_batch: Any = None,
    ):
        inputs = {key: value for key, value in inputs.items() if key != "labels"}
        coeff = self.spd_loss_config.importance_coeff(self.state.global_step, self.state.max_steps)
        result = spd_loss(
            model, inputs, self.spd_loss_config, importance_coeff=coeff, blocks=self.spd_blocks
        )
        if model.training:
            for key, value in result.terms.items():
                self._spd_sums[key] += value
            self._spd_count += 1
        return (result.total, None) if return_outputs else result.total

    def log(self, logs: dict[str, float], *args, **kwargs) -> None:
        if self._spd_count:
            for key, value in self._spd_sums.items():
                logs[f"spd/{key}"] = value / self._spd_count
            self._spd_sums.clear()
            self._spd_count = 0
        super().log(logs, *args, **kwargs)
