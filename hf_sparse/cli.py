"""The ``hf-sparse`` command line: parse flags into a recipe mapping and dispatch.

hf-sparse fetch-model smollm2-135m
hf-sparse run RECIPE.yaml [--model M] [--output-dir DIR] [--overwrite]     (any recipe kind)
hf-sparse prune MODEL --method sparsegpt --sparsity 0.5 [--mask 2:4] --output-dir DIR
hf-sparse mask golden|reverse|score MODEL [--top-k-percent 5] --output-dir DIR
hf-sparse merge RECIPE.yaml [--output-dir DIR]
hf-sparse analyze RECIPE.yaml | MODEL --metric fisher --top-k 1000 --output-dir DIR
hf-sparse compress [RECIPE.yaml] [--model M --ratio 0.2] --output-dir DIR
hf-sparse decompose tms_5-2[,resid_mlp1,...] | RECIPE.yaml [--output-dir DIR]
hf-sparse eval DIR [--base B] [--dataset wikitext2] [--num-windows 32] [--tasks lambada,hellaswag]
hf-sparse push DIR --repo-id NAMESPACE/NAME [--dry-run] [--private] [--revision BRANCH]

The method subcommands are aliases of ``run``: each builds the recipe mapping of its kind from
its flags (or reads the recipe file and lets the flags override it), then runs it through the
recipe registry (``hf_sparse.recipes``); each method's pipeline prints its own summary.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
from dataclasses import dataclass, field
from typing import Any

logger = logging.getLogger("hf_sparse")


class _Parser(argparse.ArgumentParser):
    """argparse that reports a usage error on one line (and where the help is) with exit 2."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


class _Formatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Every flag's help ends with its default: argparse's own, ``off`` for a switch, ``not
    set`` for None (then the recipe or the text says what applies); a help text that already
    names its default is left as it is."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        if "default" in text or action.default is argparse.SUPPRESS or action.required:
            return text
        if isinstance(action, argparse._StoreTrueAction):
            return f"{text} (default: off)"
        if action.default is None:
            if not action.option_strings and action.nargs is None:
                return text  # a required positional has no default
            return f"{text} (default: not set)"
        return super()._get_help_string(action)


_FORMATTER = _Formatter


@dataclass(frozen=True)
class Flag:
    """One command-line flag and the recipe key it sets (``{job}``/``{method}`` are filled from
    the parsed arguments). ``shown`` is the default the recipe applies when the flag is left
    out (printed in ``--help``); argparse's own default stays None so the recipe decides."""

    option: str
    path: str
    help: str
    shown: Any = None
    kwargs: dict[str, Any] = field(default_factory=dict)

    def add_to(self, parser: argparse.ArgumentParser) -> None:
        text = self.help if self.shown is None else f"{self.help} (default: {self.shown})"
        parser.add_argument(self.option, help=text, default=None, **self.kwargs)

    @property
    def dest(self) -> str:
        return self.option.lstrip("-").replace("-", "_")


def default_of(cls: type, name: str) -> Any:
    """The default of a dataclass field (for help texts)."""
    found = next(f for f in dataclasses.fields(cls) if f.name == name)
    if found.default is not dataclasses.MISSING:
        return found.default
    return found.default_factory()  # type: ignore[misc]


def _set_path(data: dict[str, Any], path: str, value: Any) -> None:
    *parents, leaf = path.split(".")
    node = data
    for key in parents:
        child = node.get(key)
        if not isinstance(child, dict):
            child = {}
            node[key] = child
        node = child
    node[leaf] = value


def apply_flags(data: dict[str, Any], args: argparse.Namespace, flags: list[Flag]) -> None:
    """Write every flag that was given into ``data`` at its recipe path."""
    names = vars(args)
    for flag in flags:
        value = names.get(flag.dest)
        if value is not None:
            _set_path(data, flag.path.format(**names), value)


def _blocks_flag(path: str, note: str = "") -> Flag:
    """``--blocks``: where the decoder blocks are, for models whose blocks are not found."""
    text = "dotted path or 're:' pattern of the decoder-block ModuleList, e.g. model.layers"
    return Flag("--blocks", path, f"{text}{'; ' + note if note else ''}",
                "found from the model's _no_split_modules")  # fmt: skip


def _calibration_flags() -> list[Flag]:
    from .recipes import CalibrationConfig as C

    return [
        Flag("--dataset", "calibration.dataset", "calibration text: named set or file",
             default_of(C, "dataset")),
        Flag("--num-samples", "calibration.num_samples", "calibration windows",
             default_of(C, "num_samples"), {"type": int}),
        Flag("--sequence-length", "calibration.sequence_length", "tokens per calibration window",
             default_of(C, "sequence_length"), {"type": int}),
        Flag("--seed", "calibration.seed", "seed of the calibration windows",
             default_of(C, "seed"), {"type": int}),
    ]  # fmt: skip


def _prune_flags() -> list[Flag]:
    from .pruning.config import PruningConfig as P

    return [
        Flag("--sparsity", "pruning.{method}.sparsity", "fraction removed per layer, in [0, 1)",
             "0.5, or 1 - N/M with an N:M --mask", {"type": float}),
        Flag("--mask", "pruning.{method}.mask", "'unstructured' or N:M, e.g. 2:4",
             default_of(P, "mask")),
        Flag("--targets", "pruning.{method}.targets", "patterns of layers to prune",
             "every decoder-block linear", {"nargs": "+"}),
        Flag("--ignore", "pruning.{method}.ignore", "patterns never pruned",
             default_of(P, "ignore"), {"nargs": "+"}),
        _blocks_flag("pruning.{method}.blocks"),
        *_calibration_flags(),
        Flag("--eval-dataset", "evaluation.dataset", "perplexity text", "wikitext2"),
        Flag("--num-windows", "evaluation.num_windows", "perplexity windows", 32, {"type": int}),
        Flag("--eval-sequence-length", "evaluation.sequence_length", "tokens per perplexity "
             "window", 512, {"type": int}),
    ]  # fmt: skip


def _mask_flags(job: str) -> list[Flag]:
    from .masked_lr.config import GoldenConfig, MaskDataConfig, ReverseGoldenConfig, ScoreConfig

    cls = {"score": ScoreConfig, "golden": GoldenConfig, "reverse": ReverseGoldenConfig}[job]
    flags = [
        Flag("--metric", "mask.{job}.metric", "importance metric", default_of(cls, "metric")),
        Flag("--params", "mask.{job}.params", "parameter patterns to score",
             "decoder-block linear weights", {"nargs": "+"}),
    ]  # fmt: skip
    if job == "reverse":
        flags += [
            Flag("--target-percent", "mask.{job}.target_percent", "mask size, percent",
                 default_of(cls, "target_percent"), {"type": float}),
            Flag("--strategy", "mask.{job}.strategy", "fluctuation strategy",
                 default_of(cls, "strategy")),
            Flag("--rounds", "mask.{job}.rounds", "search rounds", default_of(cls, "rounds"),
                 {"type": int}),
            Flag("--patience", "mask.{job}.patience", "rounds without gain before stopping",
                 default_of(cls, "patience"), {"type": int}),
        ]  # fmt: skip
    else:
        flags += [
            Flag("--top-k-percent", "mask.{job}.top_k_percent", "top-k, percent",
                 default_of(cls, "top_k_percent"), {"type": float}),
            Flag("--scope", "mask.{job}.scope", "ranking scope", default_of(cls, "scope")),
        ]  # fmt: skip
    if job != "score":
        flags.append(
            Flag("--last-blocks-percent", "mask.{job}.last_blocks_percent",
                 "only the last N%% of decoder blocks", "all blocks", {"type": float})
        )  # fmt: skip
    flags.append(_blocks_flag("mask.{job}.blocks"))
    D = MaskDataConfig
    flags += [
        Flag("--dataset", "data.dataset", "named set or local file", default_of(D, "dataset")),
        Flag("--format", "data.format", "auto, instruction or text", default_of(D, "format")),
        Flag("--num-samples", "data.num_samples", "samples scored", default_of(D, "num_samples"),
             {"type": int}),
        Flag("--eval-samples", "data.eval_samples", "held-out samples (reverse)",
             default_of(D, "eval_samples"), {"type": int}),
        Flag("--max-length", "data.max_length", "tokens per sample", default_of(D, "max_length"),
             {"type": int}),
        Flag("--seed", "data.seed", "seed of the sample draw", default_of(D, "seed"),
             {"type": int}),
    ]  # fmt: skip
    return flags


def _analyze_flags() -> list[Flag]:
    from .analysis.config import AnalysisConfig as A

    return [
        Flag("--metric", "analysis.metric", "importance metric", default_of(A, "metric")),
        Flag("--top-k", "analysis.top_k", "size of the critical set (a count)",
             "--top-k-percent's", {"type": int}),
        Flag("--top-k-percent", "analysis.top_k", "... or a percentage", default_of(A, "top_k"),
             {"type": float}),
        Flag("--mode", "analysis.mode", "global, layer or head", default_of(A, "mode")),
        Flag("--num-samples", "analysis.num_samples", "scoring windows",
             default_of(A, "num_samples"), {"type": int}),
        Flag("--dataset", "analysis.dataset", "scoring text (named set or file)",
             default_of(A, "dataset")),
        _blocks_flag("analysis.blocks"),
    ]  # fmt: skip


def _compress_flags() -> list[Flag]:
    from .basis_sharing.config import DEFAULT_SHARED_ROLES
    from .basis_sharing.config import BasisSharingConfig as B

    return [
        Flag("--ratio", "basis_sharing.ratio", "share of targeted parameters removed, in (0, 1)",
             default_of(B, "ratio"), {"type": float}),
        Flag("--group-size", "basis_sharing.group_size", "consecutive layers sharing a basis",
             default_of(B, "group_size"), {"type": int}),
        Flag("--shared-roles", "basis_sharing.shared_roles", "roles that share bases",
             "the paper's, those present: " + " ".join(DEFAULT_SHARED_ROLES), {"nargs": "+"}),
        Flag("--target-roles", "basis_sharing.target_roles", "roles to compress", "all",
             {"nargs": "+"}),
        _blocks_flag("basis_sharing.blocks"),
        Flag("--output", "output", "what to save: the PEFT adapter, or a standalone "
             "compressed model that loads without hf_sparse", "adapter",
             {"choices": ["adapter", "compressed"]}),
        *_calibration_flags(),
        Flag("--eval-windows", "evaluation.num_windows", "perplexity windows", 32,
             {"type": int}),
        Flag("--eval-sequence-length", "evaluation.sequence_length", "tokens per perplexity "
             "window", 512, {"type": int}),
    ]  # fmt: skip


def _decompose_flags() -> list[Flag]:
    return [
        Flag("--steps", "train.steps", "SPD training steps", "the experiment's",
             {"type": int}),
        Flag("--batch-size", "train.batch_size", "SPD batch size", "the experiment's",
             {"type": int}),
        Flag("--lr", "train.lr", "SPD learning rate", "the experiment's", {"type": float}),
        Flag("--seed", "train.seed", "SPD seed", "the experiment's", {"type": int}),
        _blocks_flag("blocks", "language-model recipes only"),
    ]  # fmt: skip


def _is_recipe_file(target: str) -> bool:
    from pathlib import Path

    return target.endswith((".yaml", ".yml")) or Path(target).is_file()


def _read(target: str | None) -> dict[str, Any]:
    from .recipes import read_recipe_file

    return dict(read_recipe_file(target)) if target else {}


def _run(
    data_or_path, args: argparse.Namespace, kind: str | None = None, model: str | None = None
) -> int:
    """Run a recipe (``model``: the --model override) and print its kind's summary."""
    from .recipes import run_recipe

    found, result = run_recipe(
        data_or_path, kind=kind, model=model, output_dir=args.output_dir, overwrite=args.overwrite
    )
    print(found.summarize(result))
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    return _run(args.recipe, args, model=args.model)


def cmd_prune(args: argparse.Namespace) -> int:
    data: dict[str, Any] = {"model": args.model, "pruning": {args.method: {}}}
    data["evaluation"] = None if args.no_eval else {}
    apply_flags(data, args, _prune_flags())
    if args.no_eval:
        data["evaluation"] = None
    return _run(data, args, "pruning")


def cmd_mask(args: argparse.Namespace) -> int:
    data: dict[str, Any] = {"model": args.model, "mask": {args.job: {}}}
    apply_flags(data, args, _mask_flags(args.job))
    return _run(data, args, "masks")


def cmd_merge(args: argparse.Namespace) -> int:
    data = _read(args.recipe)
    if args.blocks is not None:
        _set_path(data, "parameters.blocks", args.blocks)
    return _run(data, args, "merging", model=args.model)


def cmd_analyze(args: argparse.Namespace) -> int:
    if args.top_k is not None and args.top_k_percent is not None:
        raise ValueError("give --top-k (a count) or --top-k-percent, not both")
    if _is_recipe_file(args.target):
        data = _read(args.target)
    else:
        data = {"model": args.target, "analysis": {}}
    data.setdefault("analysis", {})
    apply_flags(data, args, _analyze_flags())
    return _run(data, args, "analysis")


def cmd_compress(args: argparse.Namespace) -> int:
    data = _read(args.recipe)
    data.setdefault("basis_sharing", {})
    apply_flags(data, args, _compress_flags())
    if args.no_whitening:
        _set_path(data, "basis_sharing.whitening", False)
    if args.update:
        _set_path(data, "basis_sharing.update_coefficients", True)
    if "ratio" not in data["basis_sharing"]:
        raise ValueError("no ratio: pass --ratio (e.g. 0.2) or set basis_sharing.ratio")
    if args.no_eval:
        data["evaluation"] = None
    elif "evaluation" not in data:
        data["evaluation"] = {}
    return _run(data, args, "basis_sharing", model=args.model)


def cmd_decompose(args: argparse.Namespace) -> int:
    from .spd.pipeline import experiment_names

    names = None if _is_recipe_file(args.target) else experiment_names(args.target)
    if names is not None:
        return _decompose_several(names, args)
    data = _read(args.target) if _is_recipe_file(args.target) else {"experiment": args.target}
    if args.blocks is not None and "experiment" in data:
        raise ValueError(
            f"--blocks applies to language-model recipes (model: ...); the toy experiment "
            f"{data['experiment']!r} has no decoder blocks: leave --blocks out"
        )
    apply_flags(data, args, _decompose_flags())
    if args.no_plots and "model" not in data:  # language-model recipes draw no figures
        data["plots"] = False
    return _run(data, args, "spd")


def _decompose_several(names: list[str], args: argparse.Namespace) -> int:
    """``decompose a,b``: each experiment with the same flags, into ``--output-dir/<name>``."""
    from .spd.pipeline import prepare_experiments, run_spd_recipe, summarize

    recipes = []
    for name in names:
        data: dict[str, Any] = {"experiment": name}
        apply_flags(data, args, _decompose_flags())
        if args.no_plots:
            data["plots"] = False
        recipes.append(data)
    for recipe in prepare_experiments(recipes, args.output_dir, args.overwrite):
        print(summarize(run_spd_recipe(recipe, overwrite=args.overwrite)))
    return 0


def cmd_fetch_model(args: argparse.Namespace) -> int:
    from .real_model import fetch_model

    print(
        fetch_model(args.name, cache_dir=args.cache_dir, install=True)
    )  # the one place that may install
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from .evaluation import EvalSettings, LayerSparsity, evaluate_output, format_sparsity_report

    tasks = tuple(t for t in (args.tasks or "").split(",") if t)
    settings = EvalSettings(args.dataset, args.sequence_length, args.num_windows,
                            args.batch_size, tasks, args.limit, args.layers)  # fmt: skip
    summary = evaluate_output(args.model, settings, base=args.base)
    layers = summary.pop("layers", None)
    if layers:
        print(format_sparsity_report([LayerSparsity(**row) for row in layers]))
    print(json.dumps(summary, indent=2))
    return 0


def cmd_push(args: argparse.Namespace) -> int:
    from .push import push_to_hub

    result = push_to_hub(
        args.folder, args.repo_id, token=args.token, private=args.private,
        commit_message=args.commit_message, revision=args.revision, dry_run=args.dry_run,
    )  # fmt: skip
    if args.dry_run:
        print(result.describe())
        print(f"--- {result.folder / 'README.md'} as uploaded ---")
        print(result.card)
        return 0
    url = getattr(result, "commit_url", None) or f"https://huggingface.co/{args.repo_id}"
    print(f"pushed {args.folder} to {url}")
    return 0


def _add_output_flags(p: argparse.ArgumentParser, required: bool = False) -> None:
    p.add_argument(
        "--output-dir",
        required=required,
        default=None,
        help="where the output goes (written to a temporary folder, then renamed)"
        + ("" if required else " (default: the recipe's output_dir)"),
    )
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing non-empty output folder")  # fmt: skip


def _add_flags(p: argparse.ArgumentParser, flags: list[Flag]) -> None:
    for flag in flags:
        flag.add_to(p)


def build_parser() -> argparse.ArgumentParser:
    from .pruning.config import PRUNING_METHODS
    from .spd.experiments import EXPERIMENTS

    parser = _Parser(prog="hf-sparse", description=__doc__, formatter_class=_FORMATTER)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("--debug", action="store_true", help="show tracebacks of errors")
    parser.add_argument(
        "--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)"
    )
    sub = parser.add_subparsers(dest="command", required=True)

    def command(name: str, help: str, func) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help, description=help, formatter_class=_FORMATTER)
        p.set_defaults(func=func)
        return p

    p = command("fetch-model", "fetch a known model and cache a float32 copy", cmd_fetch_model)
    p.add_argument("name", nargs="?", default="smollm2-135m", help="known model name")
    p.add_argument("--cache-dir", default=None, help="cache folder (default: $HF_SPARSE_CACHE)")

    p = command("run", "run a YAML recipe of any kind", cmd_run)
    p.add_argument("recipe", help="recipe file (see recipes/)")
    p.add_argument(
        "--model", default=None, help="override the recipe's model (default: the recipe's)"
    )
    _add_output_flags(p)

    p = command("prune", "prune a model one-shot and save it", cmd_prune)
    p.add_argument("model", help="known name (smollm2-135m), local folder or Hub id")
    p.add_argument("--method", choices=sorted(PRUNING_METHODS), default="sparsegpt",
                   help="pruning method")  # fmt: skip
    _add_flags(p, _prune_flags())
    p.add_argument("--no-eval", action="store_true", help="skip perplexity")
    _add_output_flags(p, required=True)

    mask = sub.add_parser(
        "mask", help="score parameters or search golden masks; save the masks",
        formatter_class=_FORMATTER,
    )  # fmt: skip
    jobs = mask.add_subparsers(dest="job", required=True)
    for job, help_text in (
        ("score", "top-k of one importance metric"),
        ("golden", "intersection of per-sample top-k masks"),
        ("reverse", "mask whose removal changes the output distribution most (KL)"),
    ):
        p = jobs.add_parser(job, help=help_text, description=help_text, formatter_class=_FORMATTER)
        p.set_defaults(func=cmd_mask)
        p.add_argument("model", help="known name (smollm2-135m), local folder or Hub id")
        _add_flags(p, _mask_flags(job))
        _add_output_flags(p, required=True)

    p = command("merge", "merge fine-tuned models or adapters per a YAML recipe", cmd_merge)
    p.add_argument("recipe", help="mergekit-like YAML: merge_method, base_model, models, ...")
    p.add_argument("--model", default=None,
                   help="override the recipe's base_model (default: the recipe's)")  # fmt: skip
    _blocks_flag("parameters.blocks").add_to(p)
    _add_output_flags(p)

    p = command("analyze", "critical-weight study: scores, perturbations, report", cmd_analyze)
    p.add_argument("target", help="an analysis recipe (.yaml) or a model (name, folder, Hub id)")
    _add_flags(p, _analyze_flags())
    _add_output_flags(p)

    p = command("compress", "compress a model with Basis Sharing and save it", cmd_compress)
    p.add_argument(
        "recipe", nargs="?", help="recipe YAML (the flags override it; default: none, flags only)"
    )
    p.add_argument("--model", default=None,
                   help="known name, local folder or Hub id (default: the recipe's)")  # fmt: skip
    _add_flags(p, _compress_flags())
    p.add_argument("--no-whitening", action="store_true", help="plain SVD (no calibration)")
    p.add_argument("--update", action="store_true", help="refit coefficients after compressing")
    p.add_argument("--no-eval", action="store_true", help="skip the perplexity measurement")
    _add_output_flags(p)

    p = command("decompose", "stochastic parameter decomposition (SPD)", cmd_decompose)
    p.add_argument("target", metavar="EXPERIMENT|RECIPE.yaml",
                   help=f"a toy experiment ({', '.join(EXPERIMENTS)}), several separated by "
                   "commas (each into --output-dir/NAME), or a recipe")  # fmt: skip
    _add_flags(p, _decompose_flags())
    p.add_argument("--no-plots", action="store_true", help="skip the matplotlib figures")
    _add_output_flags(p)

    p = command("eval", "perplexity (and lm-eval tasks) of any output: model, adapter, ...",
                cmd_eval)  # fmt: skip
    p.add_argument("model", help="output folder (model or adapter), known name or Hub id")
    p.add_argument(
        "--base",
        default=None,
        help="base model of an adapter (default: the one the adapter records)",
    )
    p.add_argument("--dataset", default="wikitext2", help="evaluation text")
    p.add_argument("--sequence-length", type=int, default=512, help="tokens per window")
    p.add_argument("--num-windows", type=int, default=32, help="first N windows")
    p.add_argument("--batch-size", type=int, default=4, help="windows per forward pass")
    p.add_argument(
        "--tasks",
        default=None,
        help="comma-separated lm-eval tasks on the local task files: lambada,hellaswag",
    )
    p.add_argument("--limit", type=int, default=500, help="examples per lm-eval task")
    p.add_argument(
        "--layers",
        action="store_true",
        help="print the per-layer sparsity table (models, not adapters)",
    )

    p = command("push", "upload an output folder of any kind to the Hub (never modified)",
                cmd_push)  # fmt: skip
    p.add_argument("folder", help="an output folder: model, adapter or study")
    p.add_argument("--repo-id", required=True, help="NAMESPACE/NAME on the Hub")
    p.add_argument("--token", default=None, help="Hub token (default: the logged-in one)")
    p.add_argument("--private", action="store_true", help="create the repository private")
    p.add_argument("--revision", default=None, help="branch to commit to (default: main)")
    p.add_argument(
        "--commit-message",
        default=None,
        help="commit message (default: 'Upload <kind> (hf_sparse)')",
    )
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="print the files and the card as uploaded; no network",
    )
    return parser


# What a user's input can cause (bad values, paths, files, types); anything else is a bug and
# keeps its traceback. Inputs are checked where they enter (recipes, configs, data.check_*), so
# these are raised by our checks, not from deep inside torch or the Hub client.
USER_ERRORS = (ValueError, FileNotFoundError, FileExistsError, KeyError, TypeError, OSError)


def _one_line(error: BaseException) -> str:
    text = error.args[0] if isinstance(error, KeyError) and error.args else error
    lines = [line for line in str(text).splitlines() if line.strip()]
    return lines[0] if lines else type(error).__name__


def main(argv: list[str] | None = None) -> int:
    """Run one command; a user error prints one line on stderr and returns 2 (no traceback
    unless ``--debug``); Ctrl-C returns 130, SIGTERM/SIGHUP while writing 128 + signal."""
    from .io import Terminated

    command = "hf-sparse"
    debug = argv is not None and "--debug" in argv or argv is None and "--debug" in sys.argv
    try:
        args = build_parser().parse_args(argv)
        command, debug = f"hf-sparse {args.command}", args.debug
        logging.basicConfig(
            level=logging.DEBUG if args.verbose else logging.INFO,
            format="%(levelname)s %(name)s: %(message)s",
        )
        if args.threads is not None:
            if args.threads < 1:
                raise ValueError(f"--threads must be a positive integer, got {args.threads}")
            import torch

            torch.set_num_threads(args.threads)
        return args.func(args)
    except KeyboardInterrupt:
        if debug:
            raise
        print(f"{command}: interrupted; no half-written output is left", file=sys.stderr)
        return 130
    except Terminated as stop:
        print(f"{command}: {stop}; the temporary output was removed", file=sys.stderr)
        return int(stop.code)
    except USER_ERRORS as error:
        if debug:
            raise
        print(f"{command}: error: {_one_line(error)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
