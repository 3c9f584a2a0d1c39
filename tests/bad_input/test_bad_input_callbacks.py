"""The callbacks' bad-input table: a callback refuses a bad config when it is made, and bad
calibration data or selections at ``on_train_begin`` before it touches the model (the
Trainer events are called directly, on a tiny model, with the Trainer's own state objects).
"""

from __future__ import annotations

import re

import pytest
import torch
from hf_sparse.callbacks import (
    BasisSharingCallback,
    GoldenMaskCallback,
    PruningCallback,
    SensitivityCallback,
    TaskVectorPruneCallback,
)
from transformers import TrainerControl, TrainerState

from hf_sparse.basis_sharing import BasisSharingConfig, get_basis_sharing_model
from hf_sparse.masked_lr import GoldenConfig
from hf_sparse.merging import TaskVectorPruneConfig
from hf_sparse.pruning import SparseGPTConfig, WandaConfig
from tests.bad_input.common import Case, first_line
from tests.conftest import build_tiny_model, make_token_windows, tiny_training_args

IDS = make_token_windows(n=2, length=16, seed=0)
ALL_ROLES = ["q", "k", "v", "o", "gate", "up", "down"]


def _begin(callback, model=None, batches=None):
    """``on_train_begin`` as the Trainer calls it, on a fresh tiny model (or ``model``)."""
    model = model if model is not None else build_tiny_model("llama")
    loader = [{"input_ids": b} for b in batches] if batches is not None else None
    state = TrainerState()
    args = tiny_training_args("/nonexistent-output")
    callback.on_train_begin(args, state, TrainerControl(), model=model, train_dataloader=loader)


def _deferred():
    base = build_tiny_model("llama")
    config = BasisSharingConfig(ratio=0.2, target_roles=["up"])
    return get_basis_sharing_model(base, config, defer=True)


def cb(id: str, run, error: type[BaseException], message: str, entry: str) -> Case:
    return Case(id=id, entry=entry, message=message, error=error, run=run)


CASES = [
    cb("pruning-config-not-a-config", lambda: PruningCallback({"sparsity": 0.5}), TypeError,
       r"config must be a PruningConfig, got dict", "PruningCallback"),
    cb("pruning-zero-batches", lambda: PruningCallback(WandaConfig(sparsity=0.5),
                                                       num_calibration_batches=0),
       ValueError, r"num_calibration_batches must be >= 1", "PruningCallback"),
    cb("pruning-float-calibration",
       lambda: _begin(PruningCallback(WandaConfig(sparsity=0.5), calibration=IDS.float())),
       TypeError, r"calibration holds torch.float32 values", "PruningCallback"),
    cb("pruning-ids-beyond-vocab",
       lambda: _begin(PruningCallback(WandaConfig(sparsity=0.5)), batches=[IDS + 500]),
       ValueError, r"calibration holds token id \d+, outside the model's vocabulary",
       "PruningCallback"),
    cb("pruning-ignore-everything",
       lambda: _begin(PruningCallback(WandaConfig(sparsity=0.5, ignore=ALL_ROLES)), batches=[IDS]),
       ValueError, r"leave no layer to work on", "PruningCallback"),
    cb("pruning-empty-dataloader",
       lambda: _begin(PruningCallback(SparseGPTConfig(sparsity=0.5)), batches=[]),
       ValueError, r"the train dataloader is empty", "PruningCallback"),
    cb("basis-sharing-zero-batches", lambda: BasisSharingCallback(num_batches=0), ValueError,
       r"num_batches must be a positive integer", "BasisSharingCallback"),
    cb("basis-sharing-ids-beyond-vocab",
       lambda: _begin(BasisSharingCallback(), model=_deferred(), batches=[IDS + 500]),
       ValueError, r"calibration holds token id \d+, outside the model's vocabulary",
       "BasisSharingCallback"),
    cb("golden-config-not-a-config", lambda: GoldenMaskCallback(config={"top_k_percent": 5}),
       TypeError, r"config must be a GoldenConfig", "GoldenMaskCallback"),
    cb("golden-missing-masks-file", lambda: GoldenMaskCallback(masks_file="/no/such.safetensors"),
       FileNotFoundError, r"masks_file /no/such.safetensors does not exist",
       "GoldenMaskCallback"),
    cb("golden-params-typo",
       lambda: _begin(GoldenMaskCallback(GoldenConfig(params=["q_prj"], num_samples=1)),
                      batches=[IDS]),
       ValueError, r"parameter pattern 'q_prj' matches no parameter.*did you mean 'q_proj'",
       "GoldenMaskCallback"),
    cb("task-vector-config-not-a-config", lambda: TaskVectorPruneCallback({"density": 0.1}),
       TypeError, r"config must be a TaskVectorPruneConfig", "TaskVectorPruneCallback"),
    cb("task-vector-target-typo",
       lambda: _begin(TaskVectorPruneCallback(TaskVectorPruneConfig(targets=["q_prj"]))),
       ValueError, r"target pattern 'q_prj' matches no linear", "TaskVectorPruneCallback"),
    cb("sensitivity-config-not-a-config", lambda: SensitivityCallback({"every": 1}), TypeError,
       r"config must be a SensitivityConfig", "SensitivityCallback"),
]  # fmt: skip


@pytest.mark.parametrize("case", [c.param() for c in CASES])
def test_callback_bad_input(case: Case):
    torch.set_num_threads(1)
    with pytest.raises(case.error) as raised:
        case.run()
    assert re.search(case.message, first_line(str(raised.value))), str(raised.value)
