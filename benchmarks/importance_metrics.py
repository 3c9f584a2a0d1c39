#!/usr/bin/env python3
"""Each importance metric on SmolLM2-135M: zero its top 0.01% of weights vs as many random ones.

    .venv/bin/python benchmarks/importance_metrics.py

Scored set: the weights of every decoder-block linear layer (q, k, v, o, gate, up, down; the
set every metric, including the activation-based ``wanda`` and ``obs``, can score). Scores
come from ``--windows`` calibration windows of 512 tokens of WikiText-2 validation (seed 0;
``hutchinson`` uses the first ``--hutchinson-windows`` of them with ``--probes`` probes).
The top ``--percent`` % (global ranking) is zeroed and perplexity measured with protocol v1
(first 32 windows of 512 tokens of WikiText-2 raw test); the control zeroes the same number of
uniformly random weights, ``--random-seeds`` seeds, mean and standard deviation.
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import statistics
import time
from pathlib import Path

import torch

from hf_sparse.data import calibration_windows, evaluation_windows
from hf_sparse.evaluation import masked_weights_zeroed, perplexity
from hf_sparse.importance import IMPORTANCE_METRICS, compute_importance
from hf_sparse.loading import load_model_and_tokenizer
from hf_sparse.masks import ParameterMasks, count_for, top_k
from hf_sparse.real_model import resolve_model_path

ROOT = Path(__file__).resolve().parents[1]
ROLES = ["q", "k", "v", "o", "gate", "up", "down"]


def random_masks(shapes: dict[str, torch.Size], count: int, seed: int) -> ParameterMasks:
    total = sum(s.numel() for s in shapes.values())
    generator = torch.Generator().manual_seed(seed)
    flat = torch.zeros(total, dtype=torch.bool)
    flat[torch.randperm(total, generator=generator)[:count]] = True
    masks, start = {}, 0
    for name, shape in shapes.items():
        masks[name] = flat[start : start + shape.numel()].reshape(shape)
        start += shape.numel()
    return ParameterMasks(masks)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--metrics", nargs="+", default=None)
    parser.add_argument("--percent", type=float, default=0.01)
    parser.add_argument("--windows", type=int, default=8)
    parser.add_argument("--hutchinson-windows", type=int, default=2)
    parser.add_argument("--probes", type=int, default=4)
    parser.add_argument("--random-seeds", type=int, default=3)
    parser.add_argument("--eval-windows", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "out")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    metrics = args.metrics or list(IMPORTANCE_METRICS)

    model, tokenizer = load_model_and_tokenizer(resolve_model_path(args.model))
    calib = calibration_windows(tokenizer, "wikitext2", args.windows, 512, seed=0)
    wiki = evaluation_windows(tokenizer, "wikitext2", 512, args.eval_windows)
    dense = perplexity(model, wiki).perplexity

    rows = []
    shapes = None
    for metric in metrics:
        options = {"probes": args.probes} if metric == "hutchinson" else {}
        windows = calib[: args.hutchinson_windows] if metric == "hutchinson" else calib
        start = time.perf_counter()
        scores = compute_importance(model, windows, metric, ROLES, **options)
        seconds = time.perf_counter() - start
        shapes = {n: s.shape for n, s in scores.items()}
        masks = top_k(scores, args.percent, "global")
        with masked_weights_zeroed(model, masks):
            ppl = perplexity(model, wiki).perplexity
        rows.append({"metric": metric, "zeroed": masks.count(), "ppl": ppl, "score_s": seconds})
        logging.info("%s: ppl %.3f after zeroing %d weights", metric, ppl, masks.count())
        del scores

    total = sum(s.numel() for s in shapes.values())
    count = count_for(args.percent, total)
    random_ppl = []
    for seed in range(args.random_seeds):
        with masked_weights_zeroed(model, random_masks(shapes, count, seed)):
            random_ppl.append(perplexity(model, wiki).perplexity)
    mean = statistics.mean(random_ppl)
    spread = statistics.stdev(random_ppl) if len(random_ppl) > 1 else 0.0

    print(f"dense ppl {dense:.3f}; zeroing {count:,} of {total:,} linear weights ({args.percent}%)")
    print(f"random control ({args.random_seeds} seeds): {mean:.3f} +- {spread:.3f}")
    print("| metric | ppl after zeroing top | x dense | x random | scoring s |")
    print("|---|---|---|---|---|")
    for row in rows:
        print(
            f"| {row['metric']} | {row['ppl']:.3f} | {row['ppl'] / dense:.2f} | "
            f"{row['ppl'] / mean:.2f} | {row['score_s']:.0f} |"
        )
    args.out.mkdir(parents=True, exist_ok=True)
    result = {
        "date": datetime.date.today().isoformat(),
        "settings": vars(args) | {"out": str(args.out)},
        "dense_ppl": dense,
        "zeroed": count,
        "scored_weights": total,
        "random_ppl": random_ppl,
        "rows": rows,
    }
    (args.out / "importance_metrics.json").write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
