"""The effect of a perturbation: perplexity and KL to the unperturbed model on fixed windows."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class Effect:
    perplexity: float
    kl: float  # mean per-token KL(unperturbed || perturbed)

    def to_dict(self) -> dict:
        return asdict(self)


class EffectProbe:
    """Reference next-token log-probabilities of the unperturbed model, computed once on
    ``windows`` (``[n, L]`` ids), then ``measure()`` of the model as it is now."""

    def __init__(self, model: nn.Module, windows: torch.Tensor, batch_size: int = 4) -> None:
        if windows.ndim != 2 or windows.shape[1] < 2:
            raise ValueError(f"windows must be [n, L>=2] token ids, got {tuple(windows.shape)}")
        self.model, self.windows, self.batch_size = model, windows, batch_size
        self.reference = [lp for lp, _ in self._passes()]
        self.baseline = self.measure()

    @torch.no_grad()
    def _passes(self):
        device = next(self.model.parameters()).device
        was_training = self.model.training
        self.model.eval()
        try:
            for batch in self.windows.split(self.batch_size):
                batch = batch.to(device)
                logits = self.model(input_ids=batch, use_cache=False).logits[:, :-1].float()
                yield F.log_softmax(logits, -1).cpu(), batch[:, 1:].cpu()
        finally:
            self.model.train(was_training)

    def measure(self) -> Effect:
        nll, kl, count = 0.0, 0.0, 0
        for (log_q, targets), log_p in zip(self._passes(), self._reference_or_none(), strict=True):
            nll += float(-log_q.gather(-1, targets.unsqueeze(-1)).sum())
            if log_p is not None:
                kl += float((log_p.exp() * (log_p - log_q)).sum())
            count += targets.numel()
        return Effect(math.exp(nll / count), kl / count)

    def _reference_or_none(self):
        reference = getattr(self, "reference", None)
        if reference is None:
            return [None] * math.ceil(self.windows.shape[0] / self.batch_size)
        return reference
