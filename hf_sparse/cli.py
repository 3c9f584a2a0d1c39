"""The ``hf-sparse`` command line.

hf-sparse fetch-model smollm2-135m
hf-sparse run recipes/quickstart.yaml [--output-dir DIR] [--overwrite]
hf-sparse prune MODEL --method sparsegpt --sparsity 0.5 [--mask 2:4] --output-dir DIR
hf-sparse eval MODEL [--dataset wikitext2] [--num-windows 32]
hf-sparse push FOLDER --repo-id NAMESPACE/NAME
hf-sparse mask golden MODEL --top-k-percent 5 --num-samples 16 --output-dir DIR
hf-sparse mask reverse MODEL --target-percent 1 --strategy momentum --output-dir DIR
hf-sparse mask score MODEL --metric fisher --top-k-percent 1 --scope global --output-dir DIR
hf-sparse merge recipes/merge-sparsegpt-tv.yaml [--output-dir DIR] [--overwrite]
hf-sparse analyze recipes/critical-weights.yaml
hf-sparse analyze MODEL --metric fisher --top-k 1000 --output-dir DIR
hf-sparse compress recipes/basis-sharing-20.yaml [--output-dir DIR] [--overwrite]
hf-sparse decompose tms_5-2 | recipes/spd-tms-5-2.yaml [--output-dir DIR] [--overwrite]
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

import torch

logger = logging.getLogger("hf_sparse")


def _print_metrics(result) -> None:
    metrics = result.metrics
    lines = []
    if "dense" in metrics:
        lines.append(f"dense perplexity:   {metrics['dense']['perplexity']:.3f}")
    if "pruned" in metrics:
        lines.append(
            f"pruned perplexity:  {metrics['pruned']['perplexity']:.3f} "
            f"({metrics['perplexity_ratio']:.3f}x dense)"
        )
    lines.append(f"sparsity:           {100 * metrics['sparsity']:.2f}% of the pruned layers")
    lines.append(f"pruning time:       {metrics['prune_seconds']:.1f} s")
    if result.output_dir is not None:
        lines.append(f"saved to:           {result.output_dir}")
    print("\n".join(lines))


def cmd_fetch_model(args: argparse.Namespace) -> int:
    from .real_model import fetch_model

    print(fetch_model(args.name, cache_dir=args.cache_dir))
    return 0


def _print_mask_summary(summary: dict, output_dir) -> None:
    lines = [
        f"job:       {summary['job']}",
        f"kept:      {summary['kept']:,} entries ({100 * summary['density']:.4f}%)",
        f"time:      {summary['seconds']:.1f} s",
    ]
    if summary.get("kl") is not None:
        lines.append(f"KL(original || masked removed): {summary['kl']:.5f}")
    if output_dir is not None:
        lines.append(f"saved to:  {output_dir}")
    print("\n".join(lines))


def cmd_mask(args: argparse.Namespace) -> int:
    from .mask_pipeline import MaskDataConfig, load_recipe_model, parse_mask_job, run_mask_job

    settings = {
        key: value
        for key, value in vars(args).items()
        if key in _MASK_JOB_FLAGS[args.job] and value is not None
    }
    job = parse_mask_job({args.job: settings}, where="command line")
    data = MaskDataConfig(
        dataset=args.dataset,
        format=args.format,
        num_samples=args.num_samples,
        eval_samples=args.eval_samples,
        max_length=args.max_length,
        seed=args.seed,
    )
    model, tokenizer = load_recipe_model(args.model, args.output_dir, args.overwrite)
    _, summary = run_mask_job(model, tokenizer, job, data, args.output_dir, args.overwrite)
    _print_mask_summary(summary, args.output_dir)
    return 0


# Command-line flags that become settings of each mask job (the rest are data / output flags).
_MASK_JOB_FLAGS = {
    "score": {"metric", "top_k_percent", "scope", "params"},
    "golden": {"metric", "top_k_percent", "scope", "params", "last_blocks_percent"},
    "reverse": {
        "metric",
        "target_percent",
        "strategy",
        "rounds",
        "patience",
        "params",
        "last_blocks_percent",
    },
}


def _add_mask_parser(sub) -> None:
    from .importance import FLUCTUATION_STRATEGIES, IMPORTANCE_METRICS
    from .masked import RANKING_SCOPES

    mask = sub.add_parser("mask", help="score parameters or search golden masks; save the masks")
    jobs = mask.add_subparsers(dest="job", required=True)
    for job, help_text in (
        ("score", "top-k of one importance metric"),
        ("golden", "intersection of per-sample top-k masks"),
        ("reverse", "mask whose removal changes the output distribution most (KL)"),
    ):
        p = jobs.add_parser(job, help=help_text)
        p.add_argument("model", help="known name (smollm2-135m), local folder or Hub id")
        p.add_argument("--metric", choices=sorted(IMPORTANCE_METRICS), default=None)
        p.add_argument("--params", nargs="+", default=None, help="parameter patterns to score")
        if job == "reverse":
            p.add_argument("--target-percent", type=float, default=None)
            p.add_argument("--strategy", choices=sorted(FLUCTUATION_STRATEGIES), default=None)
            p.add_argument("--rounds", type=int, default=None)
            p.add_argument("--patience", type=int, default=None)
        else:
            p.add_argument("--top-k-percent", type=float, default=None)
            p.add_argument("--scope", choices=list(RANKING_SCOPES), default=None)
        if job != "score":
            p.add_argument("--last-blocks-percent", type=float, default=None)
        p.add_argument("--dataset", default="alpaca", help="named set or local file")
        p.add_argument("--format", choices=["auto", "instruction", "text"], default="auto")
        p.add_argument("--num-samples", type=int, default=16)
        p.add_argument("--eval-samples", type=int, default=8)
        p.add_argument("--max-length", type=int, default=256)
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--output-dir", required=True)
        p.add_argument("--overwrite", action="store_true")
        p.set_defaults(func=cmd_mask)


def cmd_run(args: argparse.Namespace) -> int:
    from .pipeline import oneshot
    from .recipes import load_recipe, read_recipe_file

    data = read_recipe_file(args.recipe)
    if "merge_method" in data:
        return _run_merge_recipe(data, args)
    if "analysis" in data:
        return _run_analysis(data, args)
    if "finetune" in data:
        return _run_sft_recipe(data, args)
    if "mask" in data:
        return _run_mask_recipe(data, args)
    recipe = _with_overrides(load_recipe(args.recipe), args)
    result = oneshot(None, recipe, overwrite=args.overwrite)
    _print_metrics(result)
    return 0


def cmd_analyze(args: argparse.Namespace) -> int:
    from .recipes import read_recipe_file

    if args.target.endswith((".yaml", ".yml")):
        return _run_analysis(read_recipe_file(args.target), args)
    analysis: dict = {"metric": args.metric, "mode": args.mode}
    if args.top_k is not None and args.top_k_percent is not None:
        raise ValueError("give --top-k (a count) or --top-k-percent, not both")
    if args.top_k is not None:
        analysis["top_k"] = args.top_k
    elif args.top_k_percent is not None:
        analysis["top_k"] = float(args.top_k_percent)
    for key in ("num_samples", "dataset"):
        if getattr(args, key) is not None:
            analysis[key] = getattr(args, key)
    data = {"model": args.target, "analysis": analysis, "output_dir": args.output_dir}
    return _run_analysis(data, args)


def _run_analysis(data: dict, args: argparse.Namespace) -> int:
    from .analysis.pipeline import analysis_recipe_from_dict, run_analysis_recipe

    recipe = analysis_recipe_from_dict(data, where=str(getattr(args, "recipe", "command line")))
    if getattr(args, "model", None):
        recipe.model = args.model
    if args.output_dir:
        recipe.output_dir = args.output_dir
    study = run_analysis_recipe(recipe, overwrite=args.overwrite)
    results = study["results"]
    print(f"dense perplexity:  {results['dense']['perplexity']:.3f}")
    for point in results["points"]:
        mean, std = point["random_mean"]["perplexity"], point["random_std"]["perplexity"]
        print(
            f"{point['kind']} x{point['strength']:g} top-{point['k']} ({point['target']}): "
            f"{point['top']['perplexity']:.3f} vs random {mean:.3f} +- {std:.3f}, "
            f"bottom {point['bottom']['perplexity']:.3f}"
        )
    worst = (results.get("single_weights") or {}).get("worst")
    if worst:
        print(
            f"most damaging single weight: {worst['parameter']}{worst['index']} -> "
            f"{worst['perplexity']:.3f} ({worst['ratio_to_dense']:.2f}x dense)"
        )
    print(f"report: {recipe.output_dir}/report.html")
    return 0


def cmd_merge(args: argparse.Namespace) -> int:
    from .recipes import read_recipe_file

    return _run_merge_recipe(read_recipe_file(args.recipe), args)


def _run_merge_recipe(data: dict, args: argparse.Namespace) -> int:
    from .merging.pipeline import merge_recipe_from_dict, run_merge_recipe

    recipe = merge_recipe_from_dict(data, where=str(args.recipe))
    if getattr(args, "model", None):
        recipe.base_model = args.model
    if args.output_dir:
        recipe.output_dir = args.output_dir
    run = run_merge_recipe(recipe, overwrite=args.overwrite)
    metrics = run.metrics
    lines = [f"method:             {recipe.config.method} at density {recipe.config.density}"]
    if "base" in metrics:
        lines.append(f"base perplexity:    {metrics['base']['perplexity']:.3f}")
    if "merged" in metrics:
        lines.append(f"merged perplexity:  {metrics['merged']['perplexity']:.3f}")
    lines.append(f"merged task vector: {100 * metrics['density']:.2f}% non-zero")
    if "mean_relative_reconstruction_error" in metrics:
        error = metrics["mean_relative_reconstruction_error"]
        lines.append(f"mean ||X(tau - tau_pruned)||^2 / ||X tau||^2: {error:.4f}")
    lines.append(f"merge time:         {metrics['merge_seconds']:.1f} s")
    if run.output_dir is not None:
        lines.append(f"saved to:           {run.output_dir} ({recipe.output})")
    print("\n".join(lines))
    return 0


def _run_mask_recipe(data: dict, args: argparse.Namespace) -> int:
    from .mask_pipeline import mask_recipe_from_dict, run_mask_recipe

    recipe = _with_overrides(mask_recipe_from_dict(data, where=str(args.recipe)), args)
    summary = run_mask_recipe(recipe, overwrite=args.overwrite)
    _print_mask_summary(summary, recipe.output_dir)
    return 0


def _run_sft_recipe(data: dict, args: argparse.Namespace) -> int:
    from .sft import run_sft_recipe, sft_recipe_from_dict

    recipe = _with_overrides(sft_recipe_from_dict(data, where=str(args.recipe)), args)
    results = run_sft_recipe(recipe, overwrite=args.overwrite, recipe_dict=data)
    print(
        f"held-out loss: {results['eval_loss_before']:.4f} -> {results['eval_loss_after']:.4f}\n"
        f"trainable parameters: {results['trainable_parameters']:,}"
        + (f"\nsaved to: {recipe.output_dir}" if recipe.output_dir else "")
    )
    return 0


def _with_overrides(recipe, args: argparse.Namespace):
    """``--model`` / ``--output-dir`` of ``hf-sparse run`` replace the recipe's."""
    if args.model:
        recipe.model = args.model
    if args.output_dir:
        recipe.output_dir = args.output_dir
    return recipe


def cmd_prune(args: argparse.Namespace) -> int:
    from .pipeline import oneshot
    from .recipes import recipe_from_dict

    settings = {"sparsity": args.sparsity, "mask": args.mask}
    if args.ignore is not None:
        settings["ignore"] = args.ignore
    if args.targets is not None:
        settings["targets"] = args.targets
    recipe = recipe_from_dict(
        {
            "model": args.model,
            "calibration": {
                "dataset": args.dataset,
                "num_samples": args.num_samples,
                "sequence_length": args.sequence_length,
                "seed": args.seed,
            },
            "pruning": {args.method: settings},
            "evaluation": None
            if args.no_eval
            else {"dataset": args.eval_dataset, "num_windows": args.num_windows},
            "output_dir": args.output_dir,
        },
        where="command line",
    )
    result = oneshot(None, recipe, overwrite=args.overwrite)
    _print_metrics(result)
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from .data import evaluation_windows
    from .evaluation import format_sparsity_report, perplexity, sparsity_report
    from .pipeline import load_model_and_tokenizer

    model, tokenizer = load_model_and_tokenizer(args.model)
    windows = evaluation_windows(tokenizer, args.dataset, args.sequence_length, args.num_windows)
    result = perplexity(model, windows, args.batch_size)
    report = sparsity_report(model)
    if args.layers:
        print(format_sparsity_report(report))
    print(
        json.dumps(
            {
                "model": args.model,
                **result.to_dict(),
                "linear_sparsity": sum(r.zeros for r in report)
                / max(sum(r.total for r in report), 1),
            },
            indent=2,
        )
    )
    return 0


def cmd_push(args: argparse.Namespace) -> int:
    from .hub import push_to_hub

    push_to_hub(args.folder, args.repo_id, token=args.token, private=args.private)
    print(f"pushed {args.folder} to https://huggingface.co/{args.repo_id}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from .pruning.config import PRUNING_METHODS

    parser = argparse.ArgumentParser(
        prog="hf-sparse", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("fetch-model", help="fetch a known model and cache a float32 copy")
    p.add_argument("name", nargs="?", default="smollm2-135m")
    p.add_argument("--cache-dir", default=None)
    p.set_defaults(func=cmd_fetch_model)

    p = sub.add_parser("run", help="run a YAML recipe")
    p.add_argument("recipe")
    p.add_argument("--model", default=None, help="override the recipe's model")
    p.add_argument("--output-dir", default=None, help="override the recipe's output_dir")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("prune", help="prune a model one-shot and save it")
    p.add_argument("model", help="known name (smollm2-135m), local folder or Hub id")
    p.add_argument("--method", choices=sorted(PRUNING_METHODS), default="sparsegpt")
    p.add_argument("--sparsity", type=float, default=None, help="fraction removed, in [0, 1)")
    p.add_argument("--mask", default="unstructured", help="'unstructured' or N:M, e.g. 2:4")
    p.add_argument("--targets", nargs="+", default=None, help="patterns of layers to prune")
    p.add_argument("--ignore", nargs="+", default=None, help="patterns never pruned")
    p.add_argument("--dataset", default="wikitext2", help="calibration set (name or file)")
    p.add_argument("--num-samples", type=int, default=64)
    p.add_argument("--sequence-length", type=int, default=512)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--eval-dataset", default="wikitext2")
    p.add_argument("--num-windows", type=int, default=32)
    p.add_argument("--no-eval", action="store_true", help="skip perplexity")
    p.add_argument("--output-dir", required=True)
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=cmd_prune)

    p = sub.add_parser("eval", help="perplexity and sparsity of a model")
    p.add_argument("model")
    p.add_argument("--dataset", default="wikitext2")
    p.add_argument("--sequence-length", type=int, default=512)
    p.add_argument("--num-windows", type=int, default=32, help="first N windows")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--layers", action="store_true", help="print the per-layer sparsity table")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("push", help="upload a saved pruned model to the Hub")
    p.add_argument("folder")
    p.add_argument("--repo-id", required=True)
    p.add_argument("--token", default=None)
    p.add_argument("--private", action="store_true")
    p.set_defaults(func=cmd_push)

    p = sub.add_parser("merge", help="merge fine-tuned models or adapters per a YAML recipe")
    p.add_argument("recipe", help="mergekit-like YAML: merge_method, base_model, models, ...")
    p.add_argument("--output-dir", default=None, help="override the recipe's output_dir")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    p.set_defaults(func=cmd_merge)

    from .importance import IMPORTANCE_METRICS

    p = sub.add_parser("analyze", help="critical-weight study: scores, perturbations, report")
    p.add_argument("target", help="an analysis recipe (.yaml) or a model (name, folder, Hub id)")
    p.add_argument("--metric", choices=sorted(IMPORTANCE_METRICS), default="fisher")
    p.add_argument("--top-k", type=int, default=None, help="size of the critical set (count)")
    p.add_argument("--top-k-percent", type=float, default=None, help="... or a percentage")
    p.add_argument("--mode", choices=["global", "layer", "head"], default="global")
    p.add_argument("--num-samples", type=int, default=None)
    p.add_argument("--dataset", default=None, help="scoring text (named set or file)")
    p.add_argument("--output-dir", default=None)
    p.add_argument("--overwrite", action="store_true")
    p.set_defaults(func=cmd_analyze)

    from .basis_sharing.cli import add_compress_parser
    from .spd.cli import add_decompose_parser

    add_compress_parser(sub)
    add_decompose_parser(sub)
    _add_mask_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(levelname)s %(name)s: %(message)s",
    )
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, FileExistsError, KeyError, TypeError) as error:
        if args.verbose:
            raise
        print(f"hf-sparse {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
