"""Golden masks and the reverse search on two CPU ranks (torchrun + gloo) with unequal shards
give every rank the result of one process on all samples."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import distributed_search as script
import pytest
import torch
from safetensors.torch import load_file

from hf_sparse.masks import ParameterMasks

pytestmark = pytest.mark.distributed

SCRIPT = Path(__file__).with_name("distributed_search.py")
TESTS_DIR = Path(__file__).parents[1]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _masks(result: dict[str, torch.Tensor], prefix: str) -> ParameterMasks:
    return ParameterMasks(
        {k.removeprefix(prefix): v for k, v in result.items() if k.startswith(prefix)}
    )


def test_two_ranks_with_unequal_shards_match_one_process(tmp_path):
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
    }
    path = os.pathsep.join(filter(None, [str(TESTS_DIR), env.get("PYTHONPATH")]))
    env.update(PYTHONPATH=path, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
        "--master_addr", "127.0.0.1", "--master_port", str(_free_port()),
        str(SCRIPT), str(tmp_path),
    ]  # fmt: skip
    proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"torchrun failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    ranks = [load_file(str(tmp_path / f"rank{r}.safetensors")) for r in (0, 1)]
    single = script.run(*script.EVERYTHING)

    assert all(torch.equal(ranks[0][k], ranks[1][k]) for k in ranks[0])  # every rank agrees
    assert int(ranks[0]["samples_used"]) == 8
    assert _masks(ranks[0], "golden.") == _masks(single, "golden.")  # exact intersection
    distributed, alone = _masks(ranks[0], "reverse."), _masks(single, "reverse.")
    assert distributed.count() == alone.count()
    # Summed scores and KLs add up in another order: near-ties may fall the other way.
    assert distributed.jaccard(alone) > 0.95
    assert float(ranks[0]["reverse_kl"]) == pytest.approx(float(single["reverse_kl"]), rel=1e-3)
