#!/usr/bin/env python3
"""Single weights whose zeroing alone is catastrophic, per importance metric, on SmolLM2-135M.

    .venv/bin/python benchmarks/critical_single_weights.py

For each metric: score the decoder-block linear weights on ``--windows`` WikiText-2
validation windows of ``--length`` tokens (seed 0); take its ``--candidates`` top-ranked
weights; zero each one alone and screen it with perplexity on ``--screen-windows`` windows of
the test text; the ``--confirm`` most damaging are measured again with protocol v1 (first 32
windows of 512 tokens of WikiText-2 raw test). Controls: ``--random`` uniformly random single
weights zeroed alone, protocol v1. Prints and writes what it measured.
"""

from __future__ import annotations

import argparse
import datetime
import json
import time
from pathlib import Path

import torch

from hf_sparse.analysis import perturbed, random_entries, top_k_entries
from hf_sparse.data import calibration_windows, evaluation_windows
from hf_sparse.evaluation import perplexity
from hf_sparse.importance import IMPORTANCE_METRICS, compute_importance
from hf_sparse.loading import load_model_and_tokenizer

ROOT = Path(__file__).resolve().parents[1]
ROLES = ["q", "k", "v", "o", "gate", "up", "down"]


def _single(scores: dict, name: str, index: tuple) -> dict:
    mask = torch.zeros(scores[name].shape, dtype=torch.bool)
    mask[index] = True
    return {name: mask}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--metrics", nargs="+", default=sorted(IMPORTANCE_METRICS))
    parser.add_argument("--windows", type=int, default=8)
    parser.add_argument("--length", type=int, default=256)
    parser.add_argument("--candidates", type=int, default=8)
    parser.add_argument("--screen-windows", type=int, default=4)
    parser.add_argument("--confirm", type=int, default=1)
    parser.add_argument("--random", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--json", type=Path, default=ROOT / "benchmarks" / "out" / "critical_single_weights.json"
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    model, tokenizer = load_model_and_tokenizer(args.model)
    windows = calibration_windows(tokenizer, "wikitext2", args.windows, args.length, 0)
    screen = evaluation_windows(tokenizer, "wikitext2", 512, args.screen_windows)
    protocol = evaluation_windows(tokenizer, "wikitext2", 512, 32)
    dense = perplexity(model, protocol, 4, False).perplexity
    print(f"dense protocol-v1 perplexity {dense:.3f}")
    rows = []
    shapes = None
    for metric in args.metrics:
        scores = compute_importance(model, windows, metric, ROLES, show_progress=False)
        shapes = {n: s.shape for n, s in scores.items()}
        top = top_k_entries(scores, args.candidates)
        screened = []
        for name in top:
            for position in top[name].reshape(-1).nonzero().squeeze(1).tolist():
                index = tuple(
                    int(i) for i in torch.unravel_index(torch.tensor(position), top[name].shape)
                )
                with perturbed(model, _single(scores, name, index), "zero"):
                    ppl = perplexity(model, screen, 4, False).perplexity
                screened.append((ppl, name, index, float(scores[name][index])))
        screened.sort(reverse=True)
        for ppl, name, index, score in screened[: args.confirm]:
            with perturbed(model, _single(scores, name, index), "zero"):
                confirmed = perplexity(model, protocol, 4, False).perplexity
            row = {
                "metric": metric,
                "parameter": name,
                "index": list(index),
                "score": score,
                "screen_perplexity": ppl,
                "perplexity": confirmed,
                "ratio_to_dense": confirmed / dense,
                "candidates_screened": len(screened),
            }
            rows.append(row)
            print(json.dumps(row))
    controls = []
    for seed in range(args.random):
        with perturbed(model, random_entries(shapes, 1, seed), "zero"):
            controls.append(perplexity(model, protocol, 4, False).perplexity)
    print(f"random single weights: {controls}")
    out = {
        "date": datetime.date.today().isoformat(),
        "command": "benchmarks/critical_single_weights.py "
        + " ".join(
            f"--{k.replace('_', '-')} {' '.join(map(str, v)) if isinstance(v, list) else v}"
            for k, v in vars(args).items()
            if k != "json"
        ),
        "dense": dense,
        "rows": rows,
        "random_controls": controls,
        "wall_seconds": round(time.perf_counter() - start, 1),
    }
    args.json.write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
