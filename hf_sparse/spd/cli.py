"""``hf-sparse decompose EXPERIMENT|RECIPE.yaml``: SPD on a toy model or a language model.

Wire into ``hf_sparse/cli.py``::

    from .spd.cli import add_decompose_parser
    add_decompose_parser(sub)          # sets func=cmd_decompose

Errors (unknown experiment, bad recipe keys, C < 1, p <= 0, non-linear targets, an existing
output folder) are raised as ``ValueError`` / ``FileExistsError`` before any work; the main
entry point prints them and exits with status 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from typing import Any

from .experiments import EXPERIMENTS


def add_decompose_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``decompose`` sub-command to an ``argparse`` sub-parser set."""
    p = subparsers.add_parser(
        "decompose",
        help="stochastic parameter decomposition (SPD) of a toy model or LM linears",
        description=(
            "Decompose weights into rank-one subcomponents with causal-importance gates "
            "(Bushnaq et al. 2025). TARGET is a toy experiment name "
            f"({', '.join(EXPERIMENTS)}) or a recipe YAML (recipes/spd-*.yaml)."
        ),
    )
    p.add_argument("target", metavar="EXPERIMENT|RECIPE.yaml")
    p.add_argument(
        "--output-dir", default=None, help="where to write (default: recipe or spd-<name>)"
    )
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    p.add_argument("--steps", type=int, default=None, help="override train.steps")
    p.add_argument("--batch-size", type=int, default=None, help="override train.batch_size")
    p.add_argument("--lr", type=float, default=None, help="override train.lr")
    p.add_argument("--seed", type=int, default=None, help="override train.seed")
    p.add_argument("--no-plots", action="store_true", help="skip the matplotlib figures")
    p.set_defaults(func=cmd_decompose)
    return p


def _with_overrides(experiment, args: argparse.Namespace):
    changes = {
        "steps": args.steps,
        "batch_size": args.batch_size,
        "lr": args.lr,
        "seed": args.seed,
    }
    changes = {key: value for key, value in changes.items() if value is not None}
    if changes:
        experiment.train = dataclasses.replace(experiment.train, **changes)  # re-validated
        if "steps" in changes:
            steps = changes["steps"]
            experiment.train.logging_steps = min(experiment.train.logging_steps, steps)
    return experiment


def cmd_decompose(args: argparse.Namespace) -> int:
    """Run a decomposition; print the summary as JSON; 0 on success."""
    from ..io import check_output_dir
    from .lm import LMExperiment, run_lm_decomposition
    from .recipe import load_decompose_target
    from .toy_run import run_toy_experiment

    experiment, recipe_output = load_decompose_target(args.target)
    experiment = _with_overrides(experiment, args)
    output_dir = args.output_dir or recipe_output or f"spd-{experiment.name}"
    check_output_dir(output_dir, args.overwrite)
    if isinstance(experiment, LMExperiment):
        results = run_lm_decomposition(experiment, output_dir, overwrite=args.overwrite)
        shown = {
            "kl": results["metrics"]["kl"],
            "mean_active_per_token": results["metrics"]["mean_active_per_token"],
            "layers": results["metrics"]["layers"],
            "round_trip": results["round_trip"],
            "timings": results["timings"],
        }
    else:
        results = run_toy_experiment(
            experiment, output_dir, overwrite=args.overwrite, plots=not args.no_plots
        )
        shown = {
            "summary": results["summary"],
            "published": results["published"],
            "timings": results["timings"],
        }
    print(json.dumps({"experiment": experiment.name, **shown}, indent=2, default=str))
    print(f"wrote {results['output_dir']}", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    """Stand-alone entry point (``python -m hf_sparse.spd.cli``) until ``hf-sparse`` has it."""
    parser = argparse.ArgumentParser(prog="hf-sparse")
    sub = parser.add_subparsers(dest="command", required=True)
    add_decompose_parser(sub)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    args = parser.parse_args(argv)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, FileExistsError) as error:
        print(f"hf-sparse decompose: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
