#!/usr/bin/env python3
"""How stable critical-weight sets are on SmolLM2-135M: across seeds and across checkpoints.

    .venv/bin/python benchmarks/critical_stability.py seeds
    .venv/bin/python benchmarks/critical_stability.py checkpoints

``seeds``: each metric scores the decoder-block linear weights on ``--windows`` WikiText-2
validation windows of ``--length`` tokens drawn with seeds 0, 1, 2 (Hutchinson's probe vectors
take the same seed); for each top-k (a percentage of the ~106M scored entries, global ranking)
the Jaccard overlap of the sets and the Spearman correlation of all scores (on a fixed random
subset of 2M entries) between every pair of seeds.

``checkpoints``: a short full fine-tune with ``transformers.Trainer`` on Alpaca instructions
(``--steps`` steps of ``--batch`` x ``--seq-len`` tokens) with one ``SensitivityCallback`` per
metric snapshotting the top-k set at step 0 and at three checkpoints (steps/3, 2 steps/3,
steps) on the same probe samples; the matrices compare every pair of snapshots.

Prints and writes ``benchmarks/out/critical_stability_<mode>.json``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import time
from pathlib import Path

import torch

from hf_sparse.analysis import jaccard_matrix, resolve_count, spearman_matrix, top_k_entries
from hf_sparse.data import calibration_windows
from hf_sparse.loading import load_model_and_tokenizer

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "out"


def _off_diagonal_mean(matrix: torch.Tensor) -> float:
    n = matrix.shape[0]
    return float((matrix.sum() - matrix.diagonal().sum()) / (n * n - n))


def _summary(masks_by_k: dict[str, list], score_sets: list[dict], labels: list[str]) -> dict:
    out: dict = {"labels": labels, "top_k": {}}
    for key, masks in masks_by_k.items():
        jaccard = jaccard_matrix(masks)
        out["top_k"][key] = {
            "jaccard": jaccard.tolist(),
            "mean_jaccard": _off_diagonal_mean(jaccard),
        }
    if score_sets:
        spearman = spearman_matrix(score_sets)
        out["spearman"] = spearman.tolist()
        out["mean_spearman"] = _off_diagonal_mean(spearman)
    return out


def seeds(args: argparse.Namespace) -> dict:
    from hf_sparse.importance import compute_importance

    model, tokenizer = load_model_and_tokenizer(args.model)
    windows = [
        calibration_windows(tokenizer, "wikitext2", args.windows, args.length, seed)
        for seed in args.seeds
    ]
    results = {}
    for metric in args.metrics:
        start = time.perf_counter()
        score_sets = []
        for seed, batch in zip(args.seeds, windows, strict=True):
            options = {"seed": seed} if metric == "hutchinson" else {}
            score_sets.append(
                compute_importance(model, batch, metric, show_progress=False, **options)
            )
        total = sum(s.numel() for s in score_sets[0].values())
        masks_by_k = {
            f"{percent}%": [
                top_k_entries(s, resolve_count(percent, total, "top_k")) for s in score_sets
            ]
            for percent in args.top_k
        }
        results[metric] = _summary(masks_by_k, score_sets, [f"seed {s}" for s in args.seeds])
        results[metric]["seconds"] = round(time.perf_counter() - start, 1)
        print(
            metric,
            json.dumps({k: v for k, v in results[metric].items() if "mean" in k}),
            {k: round(v["mean_jaccard"], 4) for k, v in results[metric]["top_k"].items()},
        )
        del score_sets, masks_by_k
    return {"scored_entries": total, "metrics": results}


def checkpoints(args: argparse.Namespace) -> dict:
    from hf_sparse.callbacks import SensitivityCallback
    from transformers import Trainer, TrainingArguments

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from merge_finetunes import domain_tokens

    torch.manual_seed(args.seed)
    model, tokenizer = load_model_and_tokenizer(args.model)
    train_ids, _ = domain_tokens(tokenizer, "alpaca")
    generator = torch.Generator().manual_seed(args.seed)
    count = args.steps * args.batch
    starts = torch.randint(0, train_ids.numel() - args.seq_len, (count,), generator=generator)
    dataset = [
        {"input_ids": train_ids[s : s + args.seq_len], "labels": train_ids[s : s + args.seq_len]}
        for s in starts.tolist()
    ]
    third = args.steps // 3
    steps = [0, third, 2 * third, args.steps]
    callbacks = {
        metric: SensitivityCallback(
            metric=metric, top_k=args.top_k[0], steps=steps, num_samples=args.windows
        )
        for metric in args.metrics
    }
    training = TrainingArguments(
        output_dir=str(OUT / "critical_stability_run"),
        per_device_train_batch_size=args.batch,
        max_steps=args.steps,
        learning_rate=args.lr,
        lr_scheduler_type="constant",
        logging_steps=max(1, args.steps // 6),
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        seed=args.seed,
        dataloader_drop_last=True,
    )
    start = time.perf_counter()
    trainer = Trainer(model, training, train_dataset=dataset, callbacks=list(callbacks.values()))
    trainer.train()
    seconds = time.perf_counter() - start
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    results = {}
    for metric, callback in callbacks.items():
        labels = [f"step {s}" for s in callback.drift["steps"]]
        jaccard = torch.tensor(callback.drift["jaccard"])
        spearman = torch.tensor(callback.drift["spearman"])
        results[metric] = {
            "labels": labels,
            "top_k": {
                f"{args.top_k[0]}%": {
                    "jaccard": jaccard.tolist(),
                    "mean_jaccard_checkpoints": _off_diagonal_mean(jaccard[1:, 1:]),
                }
            },
            "spearman": spearman.tolist(),
            "mean_spearman_checkpoints": _off_diagonal_mean(spearman[1:, 1:]),
            "jaccard_to_base": callback.drift["jaccard_to_first"],
        }
        print(
            metric,
            json.dumps(results[metric]["jaccard_to_base"]),
            round(results[metric]["mean_spearman_checkpoints"], 4),
        )
    return {"train_seconds": round(seconds, 1), "losses": losses, "metrics": results}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("mode", choices=["seeds", "checkpoints"])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--metrics", nargs="+", default=None)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument(
        "--top-k",
        nargs="+",
        type=float,
        default=[0.01, 1.0],
        help="percentages of the scored entries (checkpoints: the first one)",
    )
    parser.add_argument("--windows", type=int, default=16, help="scoring windows / probe samples")
    parser.add_argument("--length", type=int, default=256)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--lr", type=float, default=5e-5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    if args.metrics is None:
        args.metrics = (
            ["fisher", "grad_x_weight", "wanda", "hutchinson", "gradient"]
            if args.mode == "seeds"
            else ["fisher", "magnitude"]
        )
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    body = seeds(args) if args.mode == "seeds" else checkpoints(args)
    out = {
        "date": datetime.date.today().isoformat(),
        "command": f"benchmarks/critical_stability.py {' '.join(sys.argv[1:])}",
        "settings": {k: v for k, v in vars(args).items()},
        **body,
        "wall_seconds": round(time.perf_counter() - start, 1),
    }
    OUT.mkdir(parents=True, exist_ok=True)
    path = OUT / f"critical_stability_{args.mode}.json"
    path.write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
