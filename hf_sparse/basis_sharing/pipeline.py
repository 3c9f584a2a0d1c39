"""Basis Sharing recipes (``hf-sparse run`` / ``hf-sparse compress RECIPE.yaml | --model M``).

Recipe (``recipes/basis-sharing-20.yaml``)::

    model: smollm2-135m
    calibration: {dataset: wikitext2, num_samples: 64, sequence_length: 512, seed: 0}
    basis_sharing: {ratio: 0.2, group_size: 4, shared_roles: [gate, up, down], layer_refit: true}
    evaluation: {dataset: wikitext2, sequence_length: 512, num_windows: 32}
    output_dir: outputs/smollm2-135m-basis-sharing-20

Command-line flags override the recipe. Every setting is checked (config, output folder, the
plan against the model's shapes) before calibration starts. ``output:`` chooses what is saved
(``OUTPUTS``), beside ``hf_sparse_results.json`` and ``recipe.yaml``:

- ``adapter`` (default): the PEFT adapter (``adapter_model.safetensors`` +
  ``adapter_config.json``); load it with ``import hf_sparse`` then
  ``PeftModel.from_pretrained(base, folder)``; it needs its base model.
- ``compressed``: a standalone model (each basis once, coefficients, untouched weights, the
  modeling code); ``AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)``
  loads it without hf_sparse (``compressed.py``). Its perplexity is measured on the saved
  structure itself.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from peft import PeftModel
from torch import nn

from ..config_utils import check_keys, from_dict
from ..recipes import CalibrationConfig, EvaluationConfig, RecipeKind, register_recipe_kind
from .config import BasisSharingConfig

logger = logging.getLogger(__name__)

_TOKENIZER_BYTES = 16 * 2**20
RECIPE_KEYS = ("model", "calibration", "basis_sharing", "evaluation", "output", "output_dir")
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


@dataclass(frozen=True)
class Output:
    """What a recipe saves: ``model(peft_model)`` is what gets evaluated (the saved structure),
    ``save(peft_model, folder)`` writes it into the (temporary) output folder."""

    model: Callable[[PeftModel], nn.Module]
    save: Callable[[PeftModel, Path], None]


def _save_compressed(peft_model: PeftModel, folder: Path) -> None:
    from .compressed import write_compressed

    write_compressed(peft_model, folder)


def _compressed_model(peft_model: PeftModel) -> nn.Module:
    from .compressed import to_compressed

    return to_compressed(peft_model)


OUTPUTS: dict[str, Output] = {
    "adapter": Output(lambda m: m, lambda m, folder: m.save_pretrained(folder)),
    "compressed": Output(_compressed_model, _save_compressed),
}


@dataclass
class BasisSharingRecipe:
    model: str
    method: dict[str, Any]
    calibration: CalibrationConfig
    evaluation: EvaluationConfig | None
    output_dir: str | None
    output: str = "adapter"

    def config(self) -> BasisSharingConfig:
        return BasisSharingConfig(**self.method)

    def to_dict(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "calibration": asdict(self.calibration),
            "basis_sharing": dict(self.method),
            "evaluation": asdict(self.evaluation) if self.evaluation else None,
            "output": self.output,
            "output_dir": self.output_dir,
        }


def basis_sharing_recipe_from_dict(
    data: dict[str, Any], where: str = "recipe"
) -> BasisSharingRecipe:
    """A Basis Sharing recipe; unknown keys at any level raise with the valid ones."""
    if not isinstance(data, dict):
        raise ValueError(f"{where} must be a mapping with keys {list(RECIPE_KEYS)}")
    check_keys(data, RECIPE_KEYS, where, "basis_sharing recipe")
    method = data.get("basis_sharing") or {}
    if not isinstance(method, dict):
        raise ValueError(f"{where}.basis_sharing must be a mapping of {list(METHOD_KEYS)}")
    check_keys(method, METHOD_KEYS, f"{where}.basis_sharing", "basis_sharing block")
    evaluation = data.get("evaluation")
    recipe = BasisSharingRecipe(
        model=str(data.get("model") or ""),
        method=dict(method),
        calibration=from_dict(CalibrationConfig, data.get("calibration"), f"{where}.calibration"),
        evaluation=None
        if evaluation is None
        else from_dict(EvaluationConfig, evaluation, f"{where}.evaluation"),
        output_dir=data.get("output_dir"),
        output=data.get("output") or "adapter",
    )
    if recipe.output not in OUTPUTS:
        raise ValueError(
            f"{where}.output must be one of {list(OUTPUTS)}, got {recipe.output!r}; "
            "'compressed' saves a standalone model, 'adapter' the PEFT adapter"
        )
    recipe.config()  # validates the method settings now
    return recipe


def run_basis_sharing_recipe(
    recipe: BasisSharingRecipe, overwrite: bool = False, show_progress: bool = True
) -> dict[str, Any]:
    """Compress the recipe's model, measure perplexity when asked, save the adapter."""
    from ..data import check_lengths
    from ..evaluation import perplexity
    from ..io import atomic_output_dir, check_output_dir, model_bytes
    from ..loading import base_model_id, load_checked
    from ..outputs import results_record, write_outputs
    from .model import get_basis_sharing_model
    from .plan import make_plan

    if not recipe.output_dir:
        raise ValueError("no output folder: pass --output-dir or set `output_dir:` in the recipe")
    config = recipe.config()
    check_output_dir(recipe.output_dir, overwrite, inputs=[recipe.model])
    model, tokenizer = load_checked(recipe.model, recipe.output_dir, overwrite)
    needs_data = config.whitening or config.update_coefficients
    ev = recipe.evaluation
    check_lengths(
        model,
        {
            "calibration.sequence_length": recipe.calibration.sequence_length
            if needs_data
            else None,
            "evaluation.sequence_length": ev.sequence_length if ev is not None else None,
        },
    )
    make_plan(model, config)  # shape checks before calibration
    expected = int(model_bytes(model) * (1 - config.ratio)) + _TOKENIZER_BYTES
    check_output_dir(recipe.output_dir, overwrite, expected, inputs=[recipe.model])
    calibration = recipe.calibration.windows(tokenizer) if needs_data else None
    metrics: dict[str, Any] = {}
    windows = None
    if ev is not None:
        windows = ev.windows(tokenizer)
        metrics["dense"] = perplexity(model, windows, ev.batch_size, show_progress).to_dict()
    start = time.perf_counter()
    peft_model = get_basis_sharing_model(
        model, config, calibration=calibration, batch_size=recipe.calibration.batch_size
    )
    seconds = time.perf_counter() - start
    counts = peft_model.base_model.parameter_counts()
    metrics["parameters"] = counts
    output = OUTPUTS[recipe.output]
    shipped = output.model(peft_model)
    if windows is not None:
        metrics["compressed"] = perplexity(shipped, windows, ev.batch_size, show_progress).to_dict()
    record = results_record(
        "basis_sharing",
        config=asdict(config),
        metrics=metrics,
        timings={"compress_seconds": seconds},
        base_model=base_model_id(recipe.model),
        output=recipe.output,
    )
    with atomic_output_dir(recipe.output_dir, overwrite, expected) as tmp:
        output.save(peft_model, tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        write_outputs(tmp, record, recipe.to_dict())
    size = sum(p.stat().st_size for p in Path(recipe.output_dir).glob("*.safetensors"))
    return {"recipe": recipe, "metrics": metrics, "output_bytes": size}


def summarize(run: dict[str, Any]) -> str:
    recipe, metrics = run["recipe"], run["metrics"]
    counts = metrics["parameters"]
    lines = [
        f"compressed {recipe.model}: {counts['dense']:,} -> {counts['compressed']:,} targeted "
        f"parameters ({counts['removed'] / counts['dense']:.2%} removed), {recipe.output} "
        f"{run['output_bytes'] / 2**20:.1f} MiB in {recipe.output_dir}"
    ]
    if "compressed" in metrics:
        lines.append(
            f"perplexity: dense {metrics['dense']['perplexity']:.3f}, compressed "
            f"{metrics['compressed']['perplexity']:.3f}"
        )
    return "\n".join(lines)


BASIS_SHARING_RECIPES = register_recipe_kind(
    RecipeKind(
        "basis_sharing",
        ("basis_sharing",),
        basis_sharing_recipe_from_dict,
        run_basis_sharing_recipe,
        summarize,
    )
)  # fmt: skip
