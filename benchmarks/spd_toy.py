"""Reproduce the SPD acceptance figures on toy models (and optionally the SmolLM2 round trip).

    .venv/bin/python benchmarks/spd_toy.py                         # tms_5-2, tms_40-10, resid_mlp1
    .venv/bin/python benchmarks/spd_toy.py --experiments tms_5-2 --steps 2000
    .venv/bin/python benchmarks/spd_toy.py --experiments none --lm  # SmolLM2 recipe only
    .venv/bin/python benchmarks/spd_toy.py --summarize out.json      # re-print a run's LM figures

Each experiment trains its target toy model, decomposes it with SPDTrainer and measures it
against the ground truth (hf_sparse.spd.toy_run). Prints what it measured with the wall time
and writes everything to a JSON file. One CPU thread by default (the machine is shared).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

DEFAULT_EXPERIMENTS = ["tms_5-2", "tms_40-10", "resid_mlp1"]


def _row(name: str, value: object) -> str:
    return f"  {name:<34} {value}"


def cluster_summary(clusters: list[list[str]], n_clusters: int, top: int = 5) -> dict:
    """What the stored co-activation clusters hold. ``hf_sparse.spd.lm`` keeps the 20 largest
    clusters of two or more components (``clusters``) and the count of all, singletons
    included (``n_clusters``). Members count per matrix (``model.layers.3.mlp.up_proj:17``
    counts for ``3.up_proj``)."""

    def where(member: str) -> tuple[str, str]:
        parts = member.rsplit(":", 1)[0].split(".")
        return next((p for p in parts if p.isdigit()), "?"), parts[-1]

    largest = []
    for cluster in clusters[:top]:
        members: dict[str, int] = {}
        for block, role in map(where, cluster):
            members[f"{block}.{role}"] = members.get(f"{block}.{role}", 0) + 1
        largest.append({"size": len(cluster), "members": members})
    return {
        "all (singletons included)": n_clusters,
        "stored (largest, >= 2 members)": len(clusters),
        "components in stored": sum(len(c) for c in clusters),
        "stored spanning >1 block": sum(len({where(m)[0] for m in c}) > 1 for c in clusters),
        "largest sizes": [len(c) for c in clusters[:top]],
        "largest": largest,
    }


def print_lm(results: dict, recipe: str) -> None:
    metrics = results["metrics"]
    print(f"\n== {recipe} ({results['steps']} steps) ==")
    for mode, kl in metrics["kl"].items():
        print(_row(f"KL {mode}", f"{kl:.4f}"))
    print(_row("mean active components / token", f"{metrics['mean_active_per_token']:.2f}"))
    for name, entry in metrics["layers"].items():
        print(_row(f"{name} alive", f"{entry['n_alive']} / {entry['C']}"))
        print(_row(f"{name} L0 / token", f"{entry['mean_active_per_token']:.2f}"))
        if "relative_weight_error" in entry:  # runs before 2026-12-03 lack it
            print(_row(f"{name} |W-UV|^2/|W|^2", f"{entry['relative_weight_error']:.4f}"))
    warmup = results.get("faithfulness_after_warmup")
    if warmup is not None:
        print(_row("faithfulness loss after warm-up", f"{warmup:.3e}"))
    for key, value in results["round_trip"].items():
        print(_row(key, value))
    summary = cluster_summary(metrics["clusters"], metrics["n_clusters"])
    for key, value in summary.items():
        if key != "largest":
            print(_row(f"clusters {key}", value))
    for rank, cluster in enumerate(summary["largest"], 1):
        print(_row(f"cluster {rank} ({cluster['size']})", cluster["members"]))
    print(_row("wall time (s)", f"{results['wall_s']:.1f}"))
    print(_row("process CPU time (s)", f"{results['process_cpu_s']:.1f}"))
    print(_row("SPD wall s / step", f"{results['spd_wall_s_per_step']:.2f}"))


def run_toy(name: str, args: argparse.Namespace) -> dict:
    from hf_sparse.spd.pipeline import check_toy_experiment, load_experiment
    from hf_sparse.spd.toy_run import run_toy_experiment

    experiment = load_experiment(name).experiment  # a name or a toy recipe file
    changes = {"steps": args.steps, "batch_size": args.batch_size, "seed": args.seed}
    for key, value in changes.items():
        if value is not None:
            setattr(experiment.train, key, value)
    experiment.train.logging_steps = max(1, experiment.train.steps // 10)
    check_toy_experiment(experiment)
    output_dir = Path(args.output_root) / Path(name).stem if args.output_root else None
    start = time.perf_counter()
    results = run_toy_experiment(experiment, output_dir, overwrite=True, plots=True)
    wall = time.perf_counter() - start
    results["wall_s"] = wall
    results["settings"] = {
        "train": vars(experiment.train),
        "spd": {k: v for k, v in experiment.spd.items() if k != "target_modules"},
        "loss": {
            "importance_minimality_coeff": experiment.loss.importance_minimality_coeff,
            "pnorm": experiment.loss.pnorm,
        },
        "note": experiment.note,
    }
    print(
        f"\n== {name}  ({experiment.train.steps} steps x {experiment.train.batch_size}, "
        f"{torch.get_num_threads()} thread(s)) =="
    )
    for key, value in results["summary"].items():
        print(_row(key, value))
    for key, value in results["published"].items():
        print(_row(f"reference implementation {key}", value))
    timings = results["timings"]
    print(_row("target training (s)", f"{timings['target_train_s']:.1f}"))
    print(_row("SPD training (s)", f"{timings['spd_train_s']:.1f}"))
    print(_row("wall time (s)", f"{wall:.1f}"))
    return results


def run_lm(args: argparse.Namespace) -> dict:
    from hf_sparse.spd.lm import run_lm_decomposition
    from hf_sparse.spd.pipeline import load_experiment

    experiment = load_experiment(args.lm_recipe).experiment
    if args.lm_steps is not None:
        experiment.train.steps = args.lm_steps
        experiment.train.logging_steps = max(1, args.lm_steps // 5)
    output_dir = Path(args.output_root) / experiment.name if args.output_root else None
    start, cpu_start = time.perf_counter(), time.process_time()
    results = run_lm_decomposition(experiment, output_dir, overwrite=True)
    results["wall_s"] = time.perf_counter() - start
    results["process_cpu_s"] = time.process_time() - cpu_start  # wall is skewed on a shared box
    results["load_average_at_end"] = os.getloadavg()
    results["steps"] = experiment.train.steps
    results["spd_wall_s_per_step"] = results["timings"]["spd_train_s"] / experiment.train.steps
    print_lm(results, args.lm_recipe)
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--experiments",
        nargs="+",
        default=DEFAULT_EXPERIMENTS,
        help="names or toy recipe files, or 'none'",
    )
    parser.add_argument("--steps", type=int, default=None, help="override every train.steps")
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--lm", action="store_true", help="also run the SmolLM2 recipe")
    parser.add_argument("--lm-recipe", default="recipes/spd-smollm2.yaml")
    parser.add_argument("--lm-steps", type=int, default=None)
    parser.add_argument("--output-root", default=None, help="save each run's folder here")
    parser.add_argument("--json", default="spd_toy_results.json", help="where to write results")
    parser.add_argument(
        "--summarize", default=None, help="print the LM runs of this JSON, run nothing"
    )
    args = parser.parse_args(argv)
    if args.summarize:
        for recipe, run in json.loads(Path(args.summarize).read_text())["runs"].items():
            if "round_trip" in run:
                print_lm(run, recipe)
        return 0
    torch.set_num_threads(args.threads)
    names = [] if args.experiments == ["none"] else args.experiments
    report: dict = {"command": " ".join(sys.argv), "threads": args.threads, "runs": {}}
    for name in names:
        report["runs"][name] = run_toy(name, args)
    if args.lm:
        report["runs"][Path(args.lm_recipe).stem] = run_lm(args)
    for run in report["runs"].values():  # the per-feature CI matrices stay in the run folders
        run.get("metrics", {}).pop("ci_one_hot", None)
    Path(args.json).write_text(json.dumps(report, indent=2, default=str) + "\n")
    print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
