"""Golden masks and the reverse search on two ranks; run by test_distributed_search.py as

    torchrun --nproc_per_node 2 tests/masked_lr/distributed_search.py OUT_DIR

Every rank builds the same seeded tiny Llama and takes its own, unequal share of the examples
(rank 0 five, rank 1 three; held-out two each). Each rank writes ``rank<r>.safetensors``:
``golden.<param>`` and ``reverse.<param>`` masks and ``reverse_kl``. The single-process side
of the comparison imports ``run`` from here, so both sides run the very same code.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from conftest import build_tiny_model, make_token_windows
from safetensors.torch import save_file

from hf_sparse.masked_lr import (
    GoldenConfig,
    ReverseGoldenConfig,
    golden_masks,
    reverse_golden_masks,
)

PARAMS = ["up", "down"]
SHARDS = {0: (slice(0, 5), slice(8, 10)), 1: (slice(5, 8), slice(10, 12))}
EVERYTHING = (slice(0, 8), slice(8, 12))


def examples() -> list[dict[str, torch.Tensor]]:
    return [{"input_ids": row} for row in make_token_windows(n=12, length=12, seed=3)]


def run(samples: slice, held_out: slice) -> dict[str, torch.Tensor]:
    """Golden masks and reverse-search masks + KL on ``examples()[samples]``."""
    data = examples()
    model = build_tiny_model("llama")
    chosen = data[samples]
    golden_config = GoldenConfig(top_k_percent=30, num_samples=len(chosen), params=PARAMS)
    golden = golden_masks(model, golden_config, chosen, show_progress=False)
    reverse_config = ReverseGoldenConfig(
        target_percent=5.0, num_samples=len(chosen), rounds=4, params=PARAMS
    )
    reverse = reverse_golden_masks(
        model, reverse_config, chosen, eval_dataset=data[held_out], show_progress=False
    )
    out = {f"golden.{n}": m for n, m in golden.masks.items()}
    out.update({f"reverse.{n}": m for n, m in reverse.masks.items()})
    out["reverse_kl"] = torch.tensor([reverse.kl], dtype=torch.float64)
    out["samples_used"] = torch.tensor([golden.samples_used])
    return {k: v.contiguous() for k, v in out.items()}


def main(out_dir: str) -> None:
    torch.distributed.init_process_group("gloo")
    try:
        rank = torch.distributed.get_rank()
        result = run(*SHARDS[rank])
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        save_file(result, str(out / f"rank{rank}.safetensors"))
        torch.distributed.barrier()
    finally:
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
