"""The Python verbs' bad-input table: ``prune_``, ``merge_``, ``get_*_model``, ``golden_masks``,
``compute_importance``, ``run_recipe`` and the real-model fetch. Every case raises the named
exception type with a message whose first line names the input and the fix, before any work:
the model it was given is left exactly as it was, and nothing is written.
"""

from __future__ import annotations

import re
import subprocess

import pytest
import torch

from hf_sparse import real_model
from hf_sparse.basis_sharing import BasisSharingConfig, get_basis_sharing_model
from hf_sparse.importance import compute_importance
from hf_sparse.masked_lr import GoldenConfig, MaskedLRConfig, get_masked_lr_model, golden_masks
from hf_sparse.merging import MergeConfig, merge_
from hf_sparse.pruning import MagnitudeConfig, SparseGPTConfig, WandaConfig, prune_
from hf_sparse.recipes import run_recipe
from hf_sparse.spd import SPDConfig, get_spd_model
from tests.bad_input.common import (
    Case,
    Workspace,
    assert_nothing_written,
    first_line,
    make_workspace,
    snapshot,
)
from tests.conftest import build_tiny_model, make_token_windows

# Models handed to a verb by a case, with a copy of their weights: a refused call must leave
# them untouched.
_GIVEN: list[tuple[torch.nn.Module, dict[str, torch.Tensor]]] = []


def fresh(arch: str = "llama") -> torch.nn.Module:
    model = build_tiny_model(arch)
    _GIVEN.append((model, {k: v.clone() for k, v in model.state_dict().items()}))
    return model


IDS = make_token_windows(n=2, length=16, seed=0)
WANDA = WandaConfig(sparsity=0.5)
ALL_ROLES = ["q", "k", "v", "o", "gate", "up", "down"]
SAMPLES = [{"input_ids": list(range(1, 9))}, {"input_ids": list(range(2, 10))}]


def verb(id: str, entry: str, run, error: type[BaseException], message: str) -> Case:
    return Case(id=id, entry=entry, message=message, error=error, run=run)


def _no_install(ws: Workspace, monkeypatch) -> None:
    """The real model is not fetched and its package not installed: nothing may install it."""

    def refuse(*args, **kwargs):
        raise AssertionError(f"tried to run {args[0]!r}")

    monkeypatch.setattr(subprocess, "run", refuse)
    monkeypatch.setattr(real_model, "_find_gguf", lambda spec: None)
    monkeypatch.setenv("HF_SPARSE_CACHE", str(ws.root / "empty-cache"))
    monkeypatch.delenv("HF_SPARSE_ALLOW_INSTALL", raising=False)


def _tampered_gguf(ws: Workspace, monkeypatch) -> None:
    fake = ws.root / "fake.gguf"  # written with the workspace
    monkeypatch.setattr(real_model, "_find_gguf", lambda spec: fake)
    monkeypatch.setenv("HF_SPARSE_CACHE", str(ws.root / "empty-cache"))


def _recipe(ws: Workspace, name: str, **pruning) -> dict:
    """A small pruning recipe writing to its own output folder ``out-<name>``."""
    return {
        "model": str(ws.llama),
        "pruning": {"wanda": {"sparsity": 0.5, **pruning}},
        "calibration": {"dataset": str(ws.text), "num_samples": 2, "sequence_length": 16},
        "evaluation": None,
        "output_dir": str(ws.root / f"out-{name}"),
    }


CASES = [
    # ---- prune_: calibration tensors and batch sizes at the boundary (issue 15)
    verb("prune-float-calibration", "prune_", lambda ws, mp: prune_(fresh(), WANDA, IDS.float()),
         TypeError, r"calibration holds torch.float32 values; token ids must be integers"),
    verb("prune-ids-beyond-vocab", "prune_", lambda ws, mp: prune_(fresh(), WANDA, IDS + 500),
         ValueError, r"calibration holds token id \d+, outside the model's vocabulary "
                     r"\(ids 0..127\)"),
    verb("prune-negative-ids", "prune_", lambda ws, mp: prune_(fresh(), WANDA, IDS - 100),
         ValueError, r"calibration holds token id -\d+, outside the model's vocabulary"),
    verb("prune-empty-calibration", "prune_",
         lambda ws, mp: prune_(fresh(), WANDA, torch.empty(0, 16, dtype=torch.long)),
         ValueError, r"calibration is empty"),
    verb("prune-calibration-rank-1", "prune_", lambda ws, mp: prune_(fresh(), WANDA, IDS[0]),
         ValueError, r"calibration must be a \[n, seq_len\] tensor of token ids, got shape "
                     r"\(16,\)"),
    verb("prune-calibration-a-list", "prune_", lambda ws, mp: prune_(fresh(), WANDA, [[1, 2]]),
         TypeError, r"calibration must be a \[n, seq_len\] tensor of token ids, got list"),
    verb("prune-batch-size-zero", "prune_",
         lambda ws, mp: prune_(fresh(), WANDA, IDS, batch_size=0),
         ValueError, r"batch_size must be a positive integer, got 0"),
    verb("prune-length-over-positions", "prune_",
         lambda ws, mp: prune_(fresh("gpt2"), WANDA, make_token_windows(n=1, length=256)),
         ValueError, r"calibration sequence length 256 exceeds the model's maximum positions "
                     r"128 \(config.max_position_embeddings\)"),
    # ---- prune_: selections
    verb("prune-ignore-everything", "prune_",
         lambda ws, mp: prune_(fresh(), WandaConfig(sparsity=0.5, ignore=ALL_ROLES), IDS),
         ValueError, r"leave no layer to work on"),
    verb("prune-ignore-typo", "prune_",
         lambda ws, mp: prune_(fresh(), WandaConfig(sparsity=0.5, ignore=["lm_head", "q_prj"]),
                               IDS),
         ValueError, r"ignore pattern 'q_prj' matches no module.*did you mean 'q_proj'"),
    verb("prune-per-layer-key-typo", "prune_",
         lambda ws, mp: prune_(fresh(), MagnitudeConfig(sparsity=0.5,
                                                        sparsity_per_layer={"mlp.down": 0.7})),
         ValueError, r"sparsity_per_layer key 'mlp.down' matches none of the layers"),
    verb("prune-target-typo", "prune_",
         lambda ws, mp: prune_(fresh(), WandaConfig(sparsity=0.5, targets=["q_prj"]), IDS),
         ValueError, r"target pattern 'q_prj' matches no linear layer"),
    verb("prune-no-calibration", "prune_",
         lambda ws, mp: prune_(fresh(), SparseGPTConfig(sparsity=0.5)),
         ValueError, r"sparsegpt needs calibration data"),
    verb("prune-config-not-a-config", "prune_", lambda ws, mp: prune_(fresh(), {"sparsity": 0.5}),
         TypeError, r"config must be a PruningConfig, got dict"),
    # ---- merge_
    verb("merge-float-calibration", "merge_",
         lambda ws, mp: merge_(fresh(), MergeConfig("sparsegpt_tv", 0.5), [ws.finetuned],
                               calibration=IDS.float()),
         TypeError, r"calibration holds torch.float32 values"),
    verb("merge-ids-beyond-vocab", "merge_",
         lambda ws, mp: merge_(fresh(), MergeConfig("sparsegpt_tv", 0.5), [ws.finetuned],
                               calibration=IDS + 500),
         ValueError, r"calibration holds token id \d+, outside the model's vocabulary"),
    verb("merge-batch-size-zero", "merge_",
         lambda ws, mp: merge_(fresh(), MergeConfig("sparsegpt_tv", 0.5), [ws.finetuned],
                               calibration=IDS, batch_size=0),
         ValueError, r"batch_size must be a positive integer, got 0"),
    verb("merge-identical-source", "merge_",
         lambda ws, mp: merge_(fresh(), MergeConfig("task_arithmetic"), [ws.llama]),
         ValueError, r"no source differs from the base model.*nothing to merge"),
    verb("merge-pickle-only-source", "merge_",
         lambda ws, mp: merge_(fresh(), MergeConfig("ties", 0.5), [ws.pickle_only]),
         ValueError, r"holds no \*.safetensors weights \(found \['pytorch_model.bin'\]: convert "
        r"them to safetensors; pickles are never loaded\)"),
    verb("merge-no-sources", "merge_", lambda ws, mp: merge_(fresh(), MergeConfig("ties"), []),
         ValueError, r"sources must be a non-empty list"),
    # ---- get_basis_sharing_model
    verb("basis-sharing-float-calibration", "get_basis_sharing_model",
         lambda ws, mp: get_basis_sharing_model(fresh(), BasisSharingConfig(), IDS.float()),
         TypeError, r"calibration holds torch.float32 values"),
    verb("basis-sharing-ids-beyond-vocab", "get_basis_sharing_model",
         lambda ws, mp: get_basis_sharing_model(fresh(), BasisSharingConfig(), IDS + 500),
         ValueError, r"calibration holds token id \d+, outside the model's vocabulary"),
    verb("basis-sharing-empty-calibration", "get_basis_sharing_model",
         lambda ws, mp: get_basis_sharing_model(fresh(), BasisSharingConfig(), IDS[:0]),
         ValueError, r"calibration is empty"),
    verb("basis-sharing-batch-size-zero", "get_basis_sharing_model",
         lambda ws, mp: get_basis_sharing_model(fresh(), BasisSharingConfig(), IDS, batch_size=0),
         ValueError, r"batch_size must be a positive integer, got 0"),
    verb("basis-sharing-role-ratio-unused", "get_basis_sharing_model",
         lambda ws, mp: get_basis_sharing_model(
             fresh(), BasisSharingConfig(role_ratios={"fc1": 0.1}), IDS),
         ValueError, r"role_ratios has \['fc1'\], which are not compressed here"),
    verb("basis-sharing-role-absent", "get_basis_sharing_model",
         lambda ws, mp: get_basis_sharing_model(
             fresh(), BasisSharingConfig(target_roles=["fc1"]), IDS),
         ValueError, r"target_roles has \['fc1'\], which this llama model lacks"),
    verb("basis-sharing-no-calibration", "get_basis_sharing_model",
         lambda ws, mp: get_basis_sharing_model(fresh(), BasisSharingConfig()),
         ValueError, r"calibration data is missing"),
    # ---- get_spd_model / get_masked_lr_model
    verb("spd-target-typo", "get_spd_model",
         lambda ws, mp: get_spd_model(fresh(), SPDConfig(target_modules=["up_prj"])),
         ValueError, r"target_modules \{'up_prj'\} matches no module"),
    verb("spd-not-linear", "get_spd_model",
         lambda ws, mp: get_spd_model(fresh(), SPDConfig(target_modules=["embed_tokens"])),
         ValueError, r"SPD decomposes linear layers only"),
    verb("masked-lr-masks-of-another-model", "get_masked_lr_model",
         lambda ws, mp: get_masked_lr_model(
             fresh(), MaskedLRConfig(), {"model.layers.9.mlp.up_proj.weight": torch.ones(2, 2)}),
         ValueError, r"name parameters the model does not have.*another model"),
    # ---- golden_masks / compute_importance
    verb("golden-params-typo", "golden_masks",
         lambda ws, mp: golden_masks(fresh(), GoldenConfig(params=["q_prj"], num_samples=2),
                                     SAMPLES),
         ValueError, r"parameter pattern 'q_prj' matches no parameter.*did you mean 'q_proj'"),
    verb("golden-float-ids", "golden_masks",
         lambda ws, mp: golden_masks(fresh(), GoldenConfig(num_samples=1),
                                     [{"input_ids": [0.5, 1.5, 2.5]}]),
         TypeError, r"input_ids holds torch.float32 values"),
    verb("golden-ids-beyond-vocab", "golden_masks",
         lambda ws, mp: golden_masks(fresh(), GoldenConfig(num_samples=1),
                                     [{"input_ids": [1, 2, 999]}]),
         ValueError, r"sample 0 holds token id 999, outside the model's vocabulary"),
    verb("golden-empty-dataset", "golden_masks",
         lambda ws, mp: golden_masks(fresh(), GoldenConfig(num_samples=1), []),
         ValueError, r"no samples|empty"),
    verb("importance-float-windows", "compute_importance",
         lambda ws, mp: compute_importance(fresh(), IDS.float()),
         TypeError, r"batches holds torch.float32 values"),
    verb("importance-ids-beyond-vocab", "compute_importance",
         lambda ws, mp: compute_importance(fresh(), IDS + 500),
         ValueError, r"sample 0 holds token id \d+, outside the model's vocabulary"),
    verb("importance-empty-windows", "compute_importance",
         lambda ws, mp: compute_importance(fresh(), IDS[:0]),
         ValueError, r"batches is empty"),
    verb("importance-rank-3", "compute_importance",
         lambda ws, mp: compute_importance(fresh(), IDS[None]),
         ValueError, r"batches must be a \[n, seq_len\] tensor"),
    verb("importance-length-over-positions", "compute_importance",
         lambda ws, mp: compute_importance(fresh("gpt2"), make_token_windows(n=1, length=256)),
         ValueError, r"sample 0 length 256 exceeds the model's maximum positions 128"),
    verb("importance-params-typo", "compute_importance",
         lambda ws, mp: compute_importance(fresh(), IDS, params=["down_prj"]),
         ValueError, r"parameter pattern 'down_prj'.*did you mean 'down_proj'"),
    verb("importance-unknown-metric", "compute_importance",
         lambda ws, mp: compute_importance(fresh(), IDS, metric="fishr"),
         ValueError, r"unknown metric 'fishr'"),
    # ---- run_recipe
    verb("recipe-ignore-everything", "run_recipe",
         lambda ws, mp: run_recipe(_recipe(ws, "ignore", ignore=ALL_ROLES)),
         ValueError, r"leave no layer to work on"),
    verb("recipe-unknown-dataset", "run_recipe",
         lambda ws, mp: run_recipe({**_recipe(ws, "data"),
                                    "calibration": {"dataset": "wikitext-2"}}),
         ValueError, r"unknown dataset 'wikitext-2' \(did you mean 'wikitext2'\?\)"),
    verb("recipe-length-over-positions", "run_recipe",
         lambda ws, mp: run_recipe({**_recipe(ws, "length"),
                                    "calibration": {"dataset": str(ws.text),
                                                    "sequence_length": 129}}),
         ValueError, r"calibration.sequence_length 129 exceeds the model's maximum positions 128"),
    verb("recipe-unknown-kind", "run_recipe", lambda ws, mp: run_recipe({"model": "x"}),
         ValueError, r"is no known recipe kind"),
    # ---- the real model: never installed behind the user's back, pinned by hash
    verb("real-model-not-fetched", "resolve_model_path",
         lambda ws, mp: (_no_install(ws, mp), real_model.resolve_model_path("smollm2-135m")),
         FileNotFoundError, r"model 'smollm2-135m' has not been fetched.*hf-sparse fetch-model "
                            r"smollm2-135m"),
    verb("real-model-hash-mismatch", "fetch_model",
         lambda ws, mp: (_tampered_gguf(ws, mp), real_model.fetch_model("smollm2-135m")),
         ValueError, r"has sha256 [0-9a-f]{64}, not the pinned b179c952"),
]  # fmt: skip


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    workspace = make_workspace(tmp_path_factory.mktemp("bad-verbs"))
    (workspace.root / "fake.gguf").write_bytes(b"GGUF, but not the pinned file")
    return workspace


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def run_case(case: Case, ws: Workspace, monkeypatch) -> BaseException | None:
    try:
        case.run(ws, monkeypatch)
    except Exception as error:  # the table checks which one
        return error
    return None


def check_answer(case: Case, error: BaseException | None) -> str:
    """The table's assertions on one answer (and on the models the case handed over)."""
    assert error is not None, f"{case.entry} accepted the bad input"
    assert isinstance(error, case.error), repr(error)
    line = first_line(str(error))
    assert re.search(case.message, line), str(error)
    for model, state in _GIVEN:  # refused before any work: the model is as it was given
        for name, tensor in model.state_dict().items():
            assert torch.equal(tensor, state[name]), f"{case.entry} modified {name}"
    return line


@pytest.mark.parametrize("case", [c.param() for c in CASES])
def test_python_verb_bad_input(case: Case, ws, monkeypatch):
    _GIVEN.clear()
    before = snapshot(ws.root)
    check_answer(case, run_case(case, ws, monkeypatch))
    assert_nothing_written(before, snapshot(ws.root))
