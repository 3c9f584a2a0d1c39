#!/usr/bin/env python3
"""Time the SparseGPT (OBS) solver alone on SmolLM2-135M's layer shapes: the two-level lazy
column updates (``inner_block=32``, the default) against the one-level loop of the paper
(``inner_block=block_size``), interleaved, same random targets and Hessians.

    .venv/bin/python benchmarks/obs_solver_speed.py --threads 2 --repeats 2

Shapes of one decoder block as the pruner stacks them: q/k/v (960 x 576), o (576 x 576),
gate/up (3072 x 576), down (576 x 1536). Prints seconds per block and the largest weight
difference between the two (float rounding only) and the number of mask entries that differ.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch

from hf_sparse.pruning.core import NMPattern, obs_prune

SHAPES = [(960, 576), (576, 576), (3072, 576), (576, 1536)]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    cases = []
    for rows, cols in SHAPES:
        x = torch.randn(4096, cols, generator=g)
        cases.append((torch.randn(rows, cols, generator=g), x.t() @ x / 4096))
    record: dict = {"load_at_start": os.getloadavg(), "threads": args.threads}
    for mask in ("unstructured", "2:4"):
        pattern = NMPattern(2, 4) if mask == "2:4" else None
        times: dict[str, list[float]] = {"inner 32": [], "one level": []}
        for _ in range(args.repeats):
            for label, inner in (("inner 32", 32), ("one level", 128)):
                start = time.perf_counter()
                outputs = [obs_prune(w, h, 0.5, pattern, inner_block=inner) for w, h in cases]
                times[label].append(time.perf_counter() - start)
                if label == "inner 32":
                    two_level = outputs
        pairs = list(zip(two_level, outputs, strict=True))
        diff = max(float((a[0] - b[0]).abs().max()) for a, b in pairs)
        masks = sum(int((a[1] != b[1]).sum()) for a, b in pairs)
        record[mask] = {k: statistics.median(v) for k, v in times.items()}
        record[mask].update(max_weight_diff=diff, mask_entries_differing=masks)
    record["load_at_end"] = os.getloadavg()
    print(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
