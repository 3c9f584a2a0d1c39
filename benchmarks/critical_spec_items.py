#!/usr/bin/env python3
"""The critical-weight specification items on SmolLM2-135M (dequantized to fp32 from the
Q4_1 GGUF, not the Hub's bf16 checkpoint): the all-k control beside top-k / random-k /
bottom-k, clustered perturbation with same-size random controls, and the correlation matrix
of the layers' sensitivity profiles, from one short study (few windows).

    .venv/bin/python benchmarks/critical_spec_items.py

Study: ``--metric`` scores on ``--samples`` WikiText-2 calibration windows of ``--length``
tokens; critical set = top ``--top-k`` % (global); zeroing it vs ``--controls`` random sets,
the bottom-k and all scored weights; tensor-level k-means clusters (``--clusters``), each
cluster's top-k entries zeroed vs same-size random sets of the same tensors; effects on the
first ``--eval-windows`` WikiText-2 test windows of ``--eval-length`` tokens. The study folder
(report.html with the correlation heatmap) is written under benchmarks/out/.
The machine is shared with other jobs.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from hf_sparse.analysis.config import AnalysisConfig
from hf_sparse.analysis.study import run_study
from hf_sparse.loading import load_model_and_tokenizer

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--metric", default="gradient")
    parser.add_argument("--top-k", type=float, default=0.01)
    parser.add_argument("--samples", type=int, default=2)
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--eval-windows", type=int, default=2)
    parser.add_argument("--eval-length", type=int, default=128)
    parser.add_argument("--controls", type=int, default=2)
    parser.add_argument("--clusters", type=int, default=4)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--out", type=Path, default=ROOT / "benchmarks" / "out" / "critical_spec_study"
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    model, tokenizer = load_model_and_tokenizer(args.model)
    config = AnalysisConfig(
        metric=args.metric, top_k=args.top_k, num_samples=args.samples,
        sequence_length=args.length, eval_windows=args.eval_windows,
        eval_length=args.eval_length, control_seeds=args.controls, stability_seeds=[0],
        stability_subsets=0, n_clusters=args.clusters, single_weight_candidates=0,
    )  # fmt: skip
    result = run_study(model, tokenizer, config, args.out, overwrite=True, model_name=args.model)
    points = result["results"]["points"]
    summary = {
        "command": " ".join(sys.argv),
        "dense": result["results"]["dense"],
        "points": [
            {
                k: p[k]
                for k in (
                    "kind",
                    "k",
                    "top",
                    "random_mean",
                    "random_std",
                    "bottom",
                    "all_k",
                    "all_count",
                )
            }
            for p in points
        ],
        "cluster_perturbations": result["results"].get("cluster_perturbations"),
        "clusters": result["stats"]["clusters"]["summary"],
        "layer_correlation": result["stats"]["layer_correlation"],
        "wall_seconds": round(time.perf_counter() - start, 1),
    }
    out = ROOT / "benchmarks" / "out" / "critical_spec_items.json"
    out.write_text(json.dumps(summary, indent=2) + "\n")
    print(
        json.dumps({k: summary[k] for k in ("dense", "points", "cluster_perturbations")}, indent=1)
    )
    print(f"wrote {out} and {args.out}")


if __name__ == "__main__":
    main()
