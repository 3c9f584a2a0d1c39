"""Data-parallel pruning of the tiny test model; run by tests/test_distributed.py as

    torchrun --nproc_per_node 2 tests/distributed_prune.py OUT_DIR
    accelerate launch --multi_gpu --num_processes 2 tests/distributed_prune.py OUT_DIR

(the README's commands; ``accelerate launch --cpu`` would start a single process).

Every rank builds the same seeded tiny Llama and the same calibration set, calibrates on its
own shard (``shard_for_rank``), and statistics are all-reduced inside ``prune_``. Rank 0
writes to OUT_DIR:

  sparsegpt.safetensors / wanda.safetensors   pruned state_dict + ``mask.<linear>`` tensors
  importance.safetensors                      all-reduced importance scores
                                              (``<metric>.<parameter>``)
  merge.safetensors                           SparseGPT-TV merged state_dict (per-task
                                              Hessians, sequential)
  stats.safetensors                           all-reduced block-0 statistics
                                              (``xtx.<linear>``, ``sq_norms.<linear>``,
                                              ``tokens.<linear>``)

The single-process side of the comparison imports ``build_model``, ``calibration_set`` and
``block0_stats`` from here, so both sides run the very same code.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from conftest import VOCAB, build_tiny_model, make_token_windows
from safetensors.torch import save_file

from hf_sparse.calibration import (
    StatsCollector,
    all_reduce_stats,
    distributed_world,
    run_sequential,
)
from hf_sparse.data import shard_for_rank
from hf_sparse.importance import compute_importance
from hf_sparse.models import target_linears
from hf_sparse.pruning import SparseGPTConfig, WandaConfig, prune_

N_WINDOWS, SEQ_LEN, BATCH_SIZE = 8, 32, 2
IMPORTANCE_METRICS = ("gradient", "fisher", "hutchinson", "obs")
CONFIGS = {"sparsegpt": SparseGPTConfig(sparsity=0.5), "wanda": WandaConfig(sparsity=0.5)}


def build_model() -> torch.nn.Module:
    return build_tiny_model("llama", seed=0)


def calibration_set() -> torch.Tensor:
    return make_token_windows(VOCAB, N_WINDOWS, SEQ_LEN, seed=0)


def prune_state(name: str, calibration: torch.Tensor) -> dict[str, torch.Tensor]:
    """Prune a fresh model with ``CONFIGS[name]``; its state_dict plus ``mask.*`` entries."""
    model = build_model()
    result = prune_(model, CONFIGS[name], calibration, batch_size=BATCH_SIZE, show_progress=False)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    state.update({f"mask.{k}": v.contiguous() for k, v in result.masks.items()})
    return state


def importance_scores(calibration: torch.Tensor) -> dict[str, torch.Tensor]:
    """Scores of each metric in ``IMPORTANCE_METRICS`` on the up/down projections."""
    model = build_model()
    out = {}
    for metric in IMPORTANCE_METRICS:
        scores = compute_importance(model, calibration, metric, ["up", "down"], False)
        out.update({f"{metric}.{name}": score.contiguous() for name, score in scores.items()})
    return out


def task_vectors() -> list[dict[str, torch.Tensor]]:
    """Two seeded in-memory task vectors on every block linear of the tiny model."""
    model = build_model()
    names = [f"{n}.weight" for g in target_linears(model).values() for n in g]
    params = dict(model.named_parameters())
    generator = torch.Generator().manual_seed(7)
    return [
        {n: torch.randn(params[n].shape, generator=generator) * 0.02 for n in names}
        for _ in range(2)
    ]


def merge_state(streams: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """SparseGPT-TV, sequential, per-task Hessians (one calibration stream per task)."""
    from hf_sparse.merging import MergeConfig, merge_

    model = build_model()
    config = MergeConfig("sparsegpt_tv", density=0.3, sequential=True, hessians="per_task")
    merge_(model, config, task_vectors(), calibration=streams, batch_size=BATCH_SIZE,
           show_progress=False)  # fmt: skip
    return {k: v.detach().contiguous() for k, v in model.state_dict().items()}


def merge_streams() -> list[torch.Tensor]:
    return [make_token_windows(VOCAB, N_WINDOWS, SEQ_LEN, seed=s) for s in (11, 12)]


def block0_stats(calibration: torch.Tensor) -> dict[str, torch.Tensor]:
    """X^T X and squared column norms at the inputs of block 0's linears (all-reduced)."""
    model = build_model()
    grouped = target_linears(model, None, ["lm_head"], None)
    first = next(iter(grouped))
    out: dict[str, torch.Tensor] = {}

    def process_block(name, _block):
        if name != first:
            return None
        collector = StatsCollector(grouped[name], need_xtx=True, need_sq_norms=True).__enter__()

        def finish():
            collector.__exit__()
            all_reduce_stats(collector.stats)
            for linear, stats in collector.stats.items():
                out[f"xtx.{linear}"] = stats.xtx.clone()
                out[f"sq_norms.{linear}"] = stats.sq_norms.clone()
                out[f"tokens.{linear}"] = torch.tensor([stats.tokens])

        return finish

    run_sequential(model, calibration, process_block, batch_size=BATCH_SIZE, show_progress=False)
    return out


def main(out_dir: str) -> None:
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True)  # initialises the gloo process group under torchrun
    rank, world = distributed_world()
    assert world == accelerator.num_processes > 1, (world, accelerator.num_processes)
    shard = shard_for_rank(calibration_set(), rank, world)
    assert shard.shape[0] == N_WINDOWS // world

    results = {name: prune_state(name, shard) for name in CONFIGS}
    stats = block0_stats(shard)
    scores = importance_scores(shard)
    merged = merge_state([shard_for_rank(w, rank, world) for w in merge_streams()])
    if rank == 0:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        for name, state in results.items():
            save_file(state, str(out / f"{name}.safetensors"))
        save_file(stats, str(out / "stats.safetensors"))
        save_file(scores, str(out / "importance.safetensors"))
        save_file(merged, str(out / "merge.safetensors"))
    accelerator.wait_for_everyone()
    accelerator.end_training()  # destroys the process group


if __name__ == "__main__":
    main(sys.argv[1])
