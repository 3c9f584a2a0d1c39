"""Data-parallel SparseGPT on the tiny Mixtral where some experts see no tokens on some ranks;
run by tests/test_distributed_moe.py as

    torchrun --nproc_per_node 2 tests/distributed_moe.py OUT_DIR

Rank 1 never routes block 0's tokens to expert 3 (rank 0 does); no rank routes block 1's
tokens to expert 2. Every rank must still call the same all-reduces (a rank whose expert saw
nothing reduces zeros) and end with the same masks. Each rank writes
``OUT_DIR/rank<r>.safetensors`` (its pruned weights and ``mask.<linear>`` tensors) and
``OUT_DIR/rank<r>.json`` (``fallbacks`` and ``measured_sparsity``).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from conftest import VOCAB, avoid_expert, build_tiny_model, make_token_windows
from safetensors.torch import save_file

from hf_sparse.calibration import distributed_world
from hf_sparse.data import shard_for_rank
from hf_sparse.pruning import SparseGPTConfig, prune_

N_WINDOWS, SEQ_LEN, BATCH_SIZE = 8, 16, 2
STARVED_ON_RANK_1 = (0, 3)  # (block, expert): tokens only on rank 0
STARVED_EVERYWHERE = (1, 2)  # (block, expert): tokens on no rank


def prune_shard(rank: int, world: int) -> tuple[torch.nn.Module, object]:
    model = build_tiny_model("mixtral", seed=0)
    layers = model.model.layers
    handles = [layers[STARVED_EVERYWHERE[0]].mlp.gate.register_forward_hook(avoid_expert(2))]
    if rank == 1:
        block, expert = STARVED_ON_RANK_1
        handles.append(layers[block].mlp.gate.register_forward_hook(avoid_expert(expert)))
    windows = make_token_windows(VOCAB, N_WINDOWS, SEQ_LEN, seed=0)
    shard = shard_for_rank(windows, rank, world)
    result = prune_(
        model, SparseGPTConfig(sparsity=0.5), shard, batch_size=BATCH_SIZE, show_progress=False
    )
    for handle in handles:
        handle.remove()
    return model, result


def main(out_dir: str) -> None:
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True)  # initialises the gloo process group under torchrun
    rank, world = distributed_world()
    assert world == 2, world
    model, result = prune_shard(rank, world)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    state.update({f"mask.{k}": v.contiguous() for k, v in result.masks.items()})
    save_file(state, str(out / f"rank{rank}.safetensors"))
    summary = {"fallbacks": result.fallbacks, "measured_sparsity": result.measured_sparsity}
    (out / f"rank{rank}.json").write_text(json.dumps(summary))
    accelerator.wait_for_everyone()
    accelerator.end_training()


if __name__ == "__main__":
    main(sys.argv[1])
