"""``hf-sparse compress RECIPE.yaml | --model M --ratio R``: Basis Sharing from the command line.

Recipe (``recipes/basis-sharing-20.yaml``)::

    model: smollm2-135m
    calibration: {dataset: wikitext2, num_samples: 64, sequence_length: 512, seed: 0}
    basis_sharing: {ratio: 0.2, group_size: 4, shared_roles: [gate, up, down], layer_refit: true}
    evaluation: {dataset: wikitext2, sequence_length: 512, num_windows: 32}
    output_dir: outputs/smollm2-135m-basis-sharing-20

Command-line flags override the recipe. Every setting is checked (config, output folder, the
plan against the model's shapes) before calibration starts. The output folder holds the PEFT
adapter (``adapter_model.safetensors`` + ``adapter_config.json``), ``hf_sparse_results.json``
and ``recipe.yaml``; load it with ``import hf_sparse.basis_sharing`` then
``PeftModel.from_pretrained(base, folder)``.
"""

from __future__ import annotations

import argparse
import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import yaml

from ..config_utils import check_keys, from_dict
from ..recipes import CalibrationConfig, EvaluationConfig, read_recipe_file
from .config import BasisSharingConfig

logger = logging.getLogger(__name__)

RECIPE_KEYS = ("model", "calibration", "basis_sharing", "evaluation", "output_dir")
METHOD_KEYS = (
    "ratio",
    "group_size",
    "target_roles",
    "shared_roles",
    "role_ratios",
    "private_blocks",
    "whitening",
    "damping",
    "layer_refit",
    "update_coefficients",
    "train_bases",
    "train_coefficients",
    "blocks",
)
RESULTS_FILE = "hf_sparse_results.json"
RECIPE_FILE = "recipe.yaml"


@dataclass
class CompressRecipe:
    model: str
    method: dict[str, Any]
    calibration: CalibrationConfig
    evaluation: EvaluationConfig | None
    output_dir: str | None

    def config(self) -> BasisSharingConfig:
        return BasisSharingConfig(**self.method)

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "calibration": asdict(self.calibration),
            "basis_sharing": dict(self.method),
            "evaluation": asdict(self.evaluation) if self.evaluation else None,
            "output_dir": self.output_dir,
        }


def compress_recipe_from_dict(data: dict[str, Any], where: str = "recipe") -> CompressRecipe:
    """A compress recipe; unknown keys at any level raise with the valid ones."""
    if not isinstance(data, dict):
        raise ValueError(f"{where} must be a mapping with keys {list(RECIPE_KEYS)}")
    check_keys(data, RECIPE_KEYS, where, "compress recipe")
    method = data.get("basis_sharing") or {}
    if not isinstance(method, dict):
        raise ValueError(f"{where}.basis_sharing must be a mapping of {list(METHOD_KEYS)}")
    check_keys(method, METHOD_KEYS, f"{where}.basis_sharing", "basis_sharing block")
    evaluation = data.get("evaluation")
    recipe = CompressRecipe(
        model=str(data.get("model") or ""),
        method=dict(method),
        calibration=from_dict(CalibrationConfig, data.get("calibration"), f"{where}.calibration"),
        evaluation=None
        if evaluation is None
        else from_dict(EvaluationConfig, evaluation, f"{where}.evaluation"),
        output_dir=data.get("output_dir"),
    )
    recipe.config()  # validates the method settings now
    return recipe


def add_compress_parser(subparsers) -> argparse.ArgumentParser:
    """Add ``compress`` to an ``argparse`` subparsers object; returns the parser."""
    p = subparsers.add_parser(
        "compress",
        help="compress a model with Basis Sharing (shared SVD bases) and save the adapter",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("recipe", nargs="?", help="recipe YAML (flags below override it)")
    p.add_argument("--model", help="known name (smollm2-135m), local folder or Hub id")
    p.add_argument("--ratio", type=float, help="share of targeted parameters removed, in (0, 1)")
    p.add_argument("--group-size", type=int, help="consecutive layers sharing a basis")
    p.add_argument("--shared-roles", nargs="+", help="roles that share bases (q k v gate up)")
    p.add_argument("--target-roles", nargs="+", help="roles to compress (default: all)")
    p.add_argument("--no-whitening", action="store_true", help="plain SVD (no calibration)")
    p.add_argument("--update", action="store_true", help="refit coefficients after compressing")
    p.add_argument("--dataset", help="calibration data: named set, file or Hub id")
    p.add_argument("--num-samples", type=int, help="calibration windows")
    p.add_argument("--sequence-length", type=int, help="tokens per calibration window")
    p.add_argument("--seed", type=int, help="seed of the calibration windows")
    p.add_argument("--eval-windows", type=int, help="perplexity windows (default: recipe / 32)")
    p.add_argument("--no-eval", action="store_true", help="skip the perplexity measurement")
    p.add_argument("--output-dir", help="where the adapter goes")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty output folder")
    p.set_defaults(func=cmd_compress)
    return p


def _recipe_from_args(args: argparse.Namespace) -> CompressRecipe:
    data: dict[str, Any] = {}
    if args.recipe:
        data = read_recipe_file(args.recipe)
    data = dict(data)
    where = str(args.recipe or "command line")
    method = dict(data.get("basis_sharing") or {})
    flags = {"ratio": args.ratio, "group_size": args.group_size,
             "shared_roles": args.shared_roles, "target_roles": args.target_roles}  # fmt: skip
    method.update({k: v for k, v in flags.items() if v is not None})
    if args.no_whitening:
        method["whitening"] = False
    if args.update:
        method["update_coefficients"] = True
    if "ratio" not in method:
        raise ValueError("no ratio: pass --ratio (e.g. 0.2) or set basis_sharing.ratio")
    data["basis_sharing"] = method
    calibration = dict(data.get("calibration") or {})
    for key in ("dataset", "num_samples", "sequence_length", "seed"):
        if getattr(args, key) is not None:
            calibration[key] = getattr(args, key)
    data["calibration"] = calibration
    if args.no_eval:
        data["evaluation"] = None
    elif args.eval_windows is not None or "evaluation" not in data:
        evaluation = dict(data.get("evaluation") or {})
        if args.eval_windows is not None:
            evaluation["num_windows"] = args.eval_windows
        data["evaluation"] = evaluation
    if args.model:
        data["model"] = args.model
    if args.output_dir:
        data["output_dir"] = args.output_dir
    recipe = compress_recipe_from_dict(data, where)
    if not recipe.model:
        raise ValueError("no model: pass --model or set `model:` in the recipe")
    if not recipe.output_dir:
        raise ValueError("no output folder: pass --output-dir or set `output_dir:` in the recipe")
    return recipe


def cmd_compress(args: argparse.Namespace) -> int:
    """Run ``compress``; returns the exit code (errors raise ValueError before any work)."""
    from ..data import calibration_windows, evaluation_windows
    from ..evaluation import perplexity
    from ..io import atomic_output_dir, check_output_dir, write_json_atomic
    from ..pipeline import load_model_and_tokenizer
    from .model import get_basis_sharing_model
    from .plan import make_plan

    recipe = _recipe_from_args(args)
    config = recipe.config()
    check_output_dir(recipe.output_dir, args.overwrite)
    model, tokenizer = load_model_and_tokenizer(recipe.model)
    make_plan(model, BasisSharingConfig(**recipe.method))  # shape checks before calibration
    cal = recipe.calibration
    calibration = None
    if config.whitening or config.update_coefficients:
        calibration = calibration_windows(
            tokenizer, cal.dataset, cal.num_samples, cal.sequence_length, cal.seed, cal.text_field
        )
    metrics: dict[str, Any] = {}
    windows = None
    if recipe.evaluation is not None:
        ev = recipe.evaluation
        windows = evaluation_windows(
            tokenizer, ev.dataset, ev.sequence_length, ev.num_windows, ev.text_field
        )
        metrics["dense"] = perplexity(model, windows, ev.batch_size).to_dict()
    peft_model = get_basis_sharing_model(
        model, config, calibration=calibration, batch_size=cal.batch_size
    )
    counts = peft_model.base_model.parameter_counts()
    metrics["parameters"] = counts
    if windows is not None:
        metrics["compressed"] = perplexity(peft_model, windows, recipe.evaluation.batch_size)
        metrics["compressed"] = metrics["compressed"].to_dict()
    with atomic_output_dir(recipe.output_dir, args.overwrite) as tmp:
        peft_model.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        write_json_atomic({"base_model": recipe.model, "method": "basis_sharing",
                           "metrics": metrics}, tmp / RESULTS_FILE)  # fmt: skip
        (tmp / RECIPE_FILE).write_text(yaml.safe_dump(recipe.to_dict(), sort_keys=False))
    size = (Path(recipe.output_dir) / "adapter_model.safetensors").stat().st_size
    print(
        f"compressed {recipe.model}: {counts['dense']:,} -> {counts['compressed']:,} targeted "
        f"parameters ({counts['removed'] / counts['dense']:.2%} removed), adapter "
        f"{size / 2**20:.1f} MiB in {recipe.output_dir}"
    )
    if windows is not None:
        print(
            f"perplexity: dense {metrics['dense']['perplexity']:.3f}, compressed "
            f"{metrics['compressed']['perplexity']:.3f}"
        )
    return 0
