#!/usr/bin/env python3
"""Hutchinson's Hessian-diagonal estimate against the exact diagonal (``hessian_diag``):
relative error vs number of probes, on a small model.

    .venv/bin/python benchmarks/hessian_diag_vs_hutchinson.py

Model: SmolLM2-135M (dequantized to fp32 from the Q4_1 GGUF, not the Hub's bf16 checkpoint)
cut to its first ``--layers`` decoder blocks (``from_pretrained(..., num_hidden_layers=N)``:
the later blocks' weights are not loaded), so the exact diagonal stays affordable. Target:
``--params`` (default: the two RMSNorm weights of the last kept block, 2 x 576 entries).
Data: ``--windows`` WikiText-2 calibration windows of ``--length`` tokens (seed 0). Both
metrics score ``|mean over windows of diag H|``. For each probe count, ``--seeds`` Hutchinson
runs (different probe seeds): relative error ``||est - exact||_2 / ||exact||_2``, Spearman
correlation of the entries, and the overlap of the top-10% sets. Wall time of each.
The machine is shared with other jobs: timings are skewed.
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from hf_sparse.analysis.stability import spearman_matrix
from hf_sparse.data import calibration_windows
from hf_sparse.importance import compute_importance
from hf_sparse.loading import load_model_and_tokenizer
from hf_sparse.real_model import resolve_model_path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "out" / "hessian_diag_vs_hutchinson.json"


def flat(scores: dict) -> torch.Tensor:
    return torch.cat([scores[n].reshape(-1).double() for n in sorted(scores)])


def top_overlap(a: torch.Tensor, b: torch.Tensor, share: float = 0.1) -> float:
    count = max(1, int(share * a.numel()))
    first, second = set(a.topk(count).indices.tolist()), set(b.topk(count).indices.tolist())
    return len(first & second) / count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--params", nargs="+", default=None)
    parser.add_argument("--windows", type=int, default=2)
    parser.add_argument("--length", type=int, default=64)
    parser.add_argument("--probes", type=int, nargs="+", default=[1, 4, 16, 64, 256])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--chunk", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    path = resolve_model_path(args.model)
    _, tokenizer = load_model_and_tokenizer(path)
    model = AutoModelForCausalLM.from_pretrained(
        path, dtype=torch.float32, num_hidden_layers=args.layers
    ).eval()
    last = args.layers - 1
    params = args.params or [
        f"model.layers.{last}.input_layernorm.weight",
        f"model.layers.{last}.post_attention_layernorm.weight",
    ]
    windows = calibration_windows(tokenizer, "wikitext2", args.windows, args.length, seed=0)
    t0 = time.perf_counter()
    exact = compute_importance(model, windows, "hessian_diag", params, False, chunk=args.chunk)
    exact_seconds = time.perf_counter() - t0
    reference = flat(exact)
    print(json.dumps({"exact_seconds": round(exact_seconds, 1), "entries": reference.numel()}))
    rows = []
    for probes in args.probes:
        errors, spearmans, overlaps, seconds = [], [], [], []
        for seed in range(args.seeds):
            t0 = time.perf_counter()
            estimate = compute_importance(
                model, windows, "hutchinson", params, False, probes=probes, seed=seed
            )
            seconds.append(time.perf_counter() - t0)
            values = flat(estimate)
            errors.append(float((values - reference).norm() / reference.norm()))
            spearmans.append(float(spearman_matrix([{"s": values}, {"s": reference}])[0, 1]))
            overlaps.append(top_overlap(values, reference))
        row = {
            "probes": probes,
            "relative_error_mean": statistics.fmean(errors),
            "relative_error_std": statistics.pstdev(errors),
            "spearman_mean": statistics.fmean(spearmans),
            "top10_overlap_mean": statistics.fmean(overlaps),
            "seconds_mean": round(statistics.fmean(seconds), 2),
        }
        rows.append(row)
        print(json.dumps(row), flush=True)
    results = {
        "rows": rows,
        "exact_seconds": round(exact_seconds, 1),
        "entries": reference.numel(),
        "params": params,
        "settings": vars(args),
        "date": datetime.date.today().isoformat(),
        "command": " ".join(sys.argv),
        "wall_seconds": round(time.perf_counter() - start, 1),
    }
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
