#!/usr/bin/env python3
"""Downstream effect of zeroing a metric's top-k weights on SmolLM2-135M, with a random control.

    .venv/bin/python benchmarks/critical_downstream.py --limit 200

Scores the decoder-block linear weights with ``--metric`` on 16 WikiText-2 validation windows
of 256 tokens (seed 0), then runs LAMBADA (OpenAI) and HellaSwag through lm-eval on the local
files in ``../shared/data`` (first ``--limit`` examples each) for: the dense model, the top
``--top-k-percent`` zeroed, and the same number of uniformly random weights zeroed (seed 0).
Prints and writes ``benchmarks/out/critical_downstream.json``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import time
from pathlib import Path

import torch

from hf_sparse.analysis import perturbed, random_entries, resolve_count, top_k_entries
from hf_sparse.analysis.downstream import downstream_eval
from hf_sparse.data import calibration_windows
from hf_sparse.importance import compute_importance
from hf_sparse.loading import load_model_and_tokenizer

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--metric", default="fisher")
    parser.add_argument("--top-k-percent", type=float, default=0.01)
    parser.add_argument("--limit", type=int, default=200)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--json", type=Path, default=ROOT / "benchmarks" / "out" / "critical_downstream.json"
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    model, tokenizer = load_model_and_tokenizer(args.model)
    windows = calibration_windows(tokenizer, "wikitext2", 16, 256, 0)
    scores = compute_importance(model, windows, args.metric, show_progress=False)
    total = sum(s.numel() for s in scores.values())
    count = resolve_count(args.top_k_percent, total, "top_k")
    shapes = {n: s.shape for n, s in scores.items()}
    rows = {"dense": downstream_eval(model, tokenizer, limit=args.limit)}
    print("dense", json.dumps(rows["dense"]))
    with perturbed(model, top_k_entries(scores, count), "zero"):
        rows["top_k_zeroed"] = downstream_eval(model, tokenizer, limit=args.limit)
    print("top-k zeroed", json.dumps(rows["top_k_zeroed"]))
    with perturbed(model, random_entries(shapes, count, 0), "zero"):
        rows["random_zeroed"] = downstream_eval(model, tokenizer, limit=args.limit)
    print("random zeroed", json.dumps(rows["random_zeroed"]))
    out = {
        "date": datetime.date.today().isoformat(),
        "command": f"benchmarks/critical_downstream.py {' '.join(sys.argv[1:])}",
        "metric": args.metric,
        "top_k": count,
        "scored_entries": total,
        "limit": args.limit,
        "results": rows,
        "wall_seconds": round(time.perf_counter() - start, 1),
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {args.json} ({out['wall_seconds']} s)")


if __name__ == "__main__":
    main()
