"""Track which weights are critical while a model trains, and how much that set drifts.

Lifecycle:
  on_train_begin   fix the probe samples (the first ``num_samples`` training samples, padding
                   removed) so every snapshot scores the same inputs; snapshot step 0
  on_step_end      at the chosen steps (``steps`` or every ``every`` steps), score the selected
                   parameters with ``metric`` and keep the top-k set (packed on CPU) and a
                   seeded subsample of the scores; with ``max_jaccard_drift`` /
                   ``min_spearman`` set, compare with the previous snapshot at once and log
                   a warning + record an event in ``drift_events`` when the set moved more
  on_train_end     Jaccard overlap of the top-k sets and Spearman correlation of the scores
                   between every pair of snapshots, written to
                   ``<output_dir>/sensitivity_drift.json``; ``drift`` holds the same in memory

Example::

    callback = SensitivityCallback(SensitivityConfig(metric="fisher", top_k=1.0, every=50))
    Trainer(model, args, train_dataset=ds, callbacks=[callback]).train()
    callback.drift["jaccard_to_first"]   # overlap of each snapshot's top-1% with step 0's
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from transformers import TrainerCallback

from hf_sparse.analysis import jaccard_matrix, resolve_count, spearman_matrix, top_k_entries
from hf_sparse.analysis.config import SensitivityConfig
from hf_sparse.importance import compute_importance
from hf_sparse.importance.samples import first_samples
from hf_sparse.io import write_json_atomic

logger = logging.getLogger(__name__)

DRIFT_FILE = "sensitivity_drift.json"


class SensitivityCallback(TrainerCallback):
    """Top-k snapshots of the critical set during training and their drift (lifecycle above)."""

    def __init__(self, config: SensitivityConfig) -> None:
        if not isinstance(config, SensitivityConfig):
            raise TypeError(f"config must be a SensitivityConfig, got {type(config).__name__}")
        self.config = config
        self.samples: list[dict] = []
        self.snapshots: dict[int, tuple] = {}  # step -> (top-k masks, subsampled scores)
        self.drift: dict | None = None
        self.drift_events: list[dict] = []

    def _due(self, step: int) -> bool:
        every = self.config.every
        return step in set(self.config.steps or ()) or (every is not None and step % every == 0)

    def _snapshot(self, model, step: int) -> None:
        was_training = model.training
        try:
            scores = compute_importance(
                model,
                self.samples,
                self.config.metric,
                self.config.params,
                show_progress=False,
                blocks=self.config.blocks,
            )
        finally:
            model.train(was_training)
        total = sum(s.numel() for s in scores.values())
        count = resolve_count(self.config.top_k, total, "top_k")
        masks = top_k_entries(scores, count)
        flat = torch.cat([s.reshape(-1) for s in scores.values()])
        if flat.numel() > self.config.spearman_entries:
            generator = torch.Generator().manual_seed(0)  # the same positions at every step
            flat = flat[
                torch.randperm(flat.numel(), generator=generator)[: self.config.spearman_entries]
            ]
        self.snapshots[step] = (masks, {"scores": flat})
        logger.info("sensitivity snapshot at step %d: top-%d of %d entries", step, count, total)
        self._check_drift(step)

    def _check_drift(self, step: int) -> None:
        """Compare the snapshot of ``step`` with the previous one against the thresholds."""
        config = self.config
        earlier = [s for s in self.snapshots if s < step]
        if not earlier or (config.max_jaccard_drift is None and config.min_spearman is None):
            return
        previous = max(earlier)
        (masks_a, scores_a), (masks_b, scores_b) = self.snapshots[previous], self.snapshots[step]
        jaccard = float(jaccard_matrix([masks_a, masks_b])[0, 1])
        spearman = float(
            spearman_matrix([scores_a, scores_b], max_entries=config.spearman_entries)[0, 1]
        )
        reasons = []
        if config.max_jaccard_drift is not None and 1 - jaccard > config.max_jaccard_drift:
            reasons.append(f"1 - Jaccard = {1 - jaccard:.4f} > {config.max_jaccard_drift}")
        if config.min_spearman is not None and spearman < config.min_spearman:
            reasons.append(f"Spearman = {spearman:.4f} < {config.min_spearman}")
        if reasons:
            event = {
                "step": step,
                "previous_step": previous,
                "jaccard": jaccard,
                "spearman": spearman,
                "reasons": reasons,
            }
            self.drift_events.append(event)
            logger.warning(
                "critical set drifted between steps %d and %d: %s",
                previous,
                step,
                "; ".join(reasons),
            )

    def on_train_begin(self, args, state, control, model=None, train_dataloader=None, **kwargs):
        if train_dataloader is None:
            raise ValueError("SensitivityCallback needs the train dataloader for its samples")
        self.samples = first_samples(
            train_dataloader, self.config.num_samples, "sensitivity scores"
        )
        if self._due(state.global_step):
            self._snapshot(model, state.global_step)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if self._due(state.global_step) and state.global_step not in self.snapshots:
            self._snapshot(model, state.global_step)

    def on_train_end(self, args, state, control, model=None, **kwargs):
        steps = sorted(self.snapshots)
        if len(steps) < 2:
            logger.warning("fewer than two sensitivity snapshots: no drift to report")
            return
        masks = [self.snapshots[s][0] for s in steps]
        scores = [self.snapshots[s][1] for s in steps]
        jaccard = jaccard_matrix(masks)
        spearman = spearman_matrix(scores, max_entries=self.config.spearman_entries)
        self.drift = {
            "metric": self.config.metric,
            "top_k": self.config.top_k,
            "steps": steps,
            "jaccard": jaccard.tolist(),
            "spearman": spearman.tolist(),
            "jaccard_to_first": jaccard[0].tolist(),
            "jaccard_to_previous": [1.0] + [float(jaccard[i, i - 1]) for i in range(1, len(steps))],
            "thresholds": {
                "max_jaccard_drift": self.config.max_jaccard_drift,
                "min_spearman": self.config.min_spearman,
            },
            "drift_events": self.drift_events,
        }
        if state.is_world_process_zero:
            Path(args.output_dir).mkdir(parents=True, exist_ok=True)
            write_json_atomic(self.drift, Path(args.output_dir) / DRIFT_FILE)
