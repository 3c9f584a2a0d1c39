"""Two CPU processes (torchrun + gloo) prune a tiny Mixtral whose experts see no tokens on one
rank or on every rank: no hang, the same masks on both ranks, magnitude fallback only where no
rank saw a token."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import distributed_moe as script
import pytest
import torch
from safetensors.torch import load_file
from test_distributed import DIST_ENV, _free_port

pytestmark = pytest.mark.distributed

SCRIPT = Path(__file__).with_name("distributed_moe.py")


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[tuple[dict[str, torch.Tensor], dict]]:
    out_dir = tmp_path_factory.mktemp("distributed_moe")
    env = {
        k: v for k, v in os.environ.items() if k not in DIST_ENV and not k.startswith("ACCELERATE_")
    }
    env.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    command = [
        sys.executable, "-m", "torch.distributed.run",
        "--nproc_per_node", "2", "--master_addr", "127.0.0.1", "--master_port", str(_free_port()),
        str(SCRIPT), str(out_dir),
    ]  # fmt: skip
    # A rank calling a different sequence of all-reduces would hang: the timeout catches it.
    proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"torchrun failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}"
    return [
        (
            load_file(str(out_dir / f"rank{r}.safetensors")),
            json.loads((out_dir / f"rank{r}.json").read_text()),
        )
        for r in range(2)
    ]


def _expert(block: int, param: str, expert: int) -> str:
    return f"model.layers.{block}.mlp.experts.{param}.{expert}"


def test_ranks_agree_and_only_experts_no_rank_saw_fall_back(ranks):
    (state0, summary0), (state1, summary1) = ranks
    assert state0.keys() == state1.keys()
    for name in state0:
        assert torch.equal(state0[name], state1[name]), name
    block, expert = script.STARVED_EVERYWHERE
    expected = {_expert(block, p, expert) for p in ("gate_up_proj", "down_proj")}
    assert set(summary0["fallbacks"]) == set(summary1["fallbacks"]) == expected
    # Rank 0's tokens reached this expert: it was solved by SparseGPT, not the fallback.
    block, expert = script.STARVED_ON_RANK_1
    assert _expert(block, "down_proj", expert) not in summary0["fallbacks"]
    assert summary0["measured_sparsity"] == summary1["measured_sparsity"] >= 0.5 - 1e-9
