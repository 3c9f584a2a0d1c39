"""Model cards rendered from ``model_cards/`` templates; pushing lives in ``push.py``."""

from __future__ import annotations

import json
import logging
from importlib import resources
from pathlib import Path
from string import Template
from typing import Any

import yaml

from .push import check_upload_folder, push_to_hub  # noqa: F401  (the public names)

logger = logging.getLogger(__name__)

TEMPLATE = "pruned_model.md"


def load_template(name: str = TEMPLATE) -> Template:
    """A card template shipped in ``model_cards/`` (packaged as ``hf_sparse.model_cards``)."""
    return Template(resources.files("hf_sparse.model_cards").joinpath(name).read_text())


def _fmt(value: Any, spec: str = ".2f") -> str:
    return format(value, spec) if isinstance(value, int | float) else "not measured"


def render_model_card(
    sparsity: dict[str, Any],
    results: dict[str, Any],
    recipe: dict[str, Any] | None = None,
    base_model: str | None = None,
    repo_id: str = "<your-namespace>/<model-name>",
) -> str:
    """Markdown card: base model, method, settings, sparsity, measured perplexity, recipe."""
    metrics = results.get("metrics", {})
    dense = metrics.get("dense", {}).get("perplexity")
    pruned = metrics.get("pruned", {}).get("perplexity")
    method = sparsity.get("method", "unknown")
    structure = sparsity.get("structure", "unstructured")
    windows = metrics.get("pruned", {}).get("windows")
    eval_note = (
        f"Perplexity on {windows} non-overlapping windows of the evaluation text "
        "(hf_sparse benchmark protocol v1: WikiText-2 raw test, 512-token windows)."
        if windows
        else "Perplexity was not measured for this model."
    )
    return load_template().safe_substitute(
        base_model=base_model or "unknown",
        title=f"{Path(str(base_model or 'model')).name} pruned with {method} ({structure})",
        method=method,
        method_title={"sparsegpt": "SparseGPT", "wanda": "Wanda"}.get(method, method),
        structure=structure,
        structure_tag=structure.replace(":", "of"),
        sparsity_pct=f"{100 * float(sparsity.get('sparsity', 0)):.0f}%",
        measured_sparsity_pct=f"{100 * float(sparsity.get('measured_sparsity', 0)):.2f}%",
        pruned_layers=sparsity.get("pruned_layers", "?"),
        dense_ppl=_fmt(dense),
        pruned_ppl=_fmt(pruned),
        ratio=_fmt(pruned / dense if dense and pruned else None),
        eval_note=eval_note,
        prune_seconds=_fmt((results.get("timings") or {}).get("prune_seconds"), ".1f"),
        settings=json.dumps(sparsity, indent=2),
        recipe=yaml.safe_dump(recipe, sort_keys=False).strip() if recipe else "(none)",
        repo_id=repo_id,
    )


def card_metadata(card_text: str) -> dict[str, Any]:
    """The YAML front matter of a card."""
    if not card_text.startswith("---\n"):
        return {}
    return yaml.safe_load(card_text.split("---\n", 2)[1]) or {}


def render_adapter_card(
    results: dict[str, Any],
    recipe: dict[str, Any] | None = None,
    base_model: str | None = None,
    repo_id: str = "<your-namespace>/<adapter-name>",
) -> str:
    """Markdown card of a masked-LR (sparse-delta) adapter from an SFT run's results."""
    mask = results.get("mask") or {}
    finetune = results.get("finetune_config") or {}
    density = mask.get("density")
    return load_template("masked_lr_adapter.md").safe_substitute(
        base_model=base_model or "unknown",
        title=f"{Path(str(base_model or 'model')).name}: sparse-delta adapter (hf_sparse)",
        mask_job=mask.get("job") or "a mask file",
        trainable=f"{results.get('trainable_parameters', 0):,}",
        density=f"{100 * density:.3f}%" if isinstance(density, float) else "see masks",
        loss_before=_fmt(results.get("eval_loss_before"), ".4f"),
        loss_after=_fmt(results.get("eval_loss_after"), ".4f"),
        steps=finetune.get("max_steps", "?"),
        train_seconds=_fmt(results.get("train_seconds"), ".0f"),
        recipe=yaml.safe_dump(recipe, sort_keys=False).strip() if recipe else "(none)",
        repo_id=repo_id,
    )


_METHOD_NOTES = {
    "sparsegpt_tv": "Each task vector was pruned with SparseGPT's OBS solver on the layer-input "
    "Hessian of calibration data, so the kept entries correct for the dropped ones.",
    "sparsegpt_ties": "Each task vector was pruned with SparseGPT's OBS solver on the layer-input "
    "Hessian, then signs were elected as in TIES.",
    "ties": "TIES: magnitude trim, sign election, disjoint mean.",
    "dare_ties": "DARE: random drop with rescaling, then TIES sign election.",
    "dare_linear": "DARE: random drop with rescaling, then a weighted sum.",
    "task_arithmetic": "Task arithmetic: a weighted sum of the task vectors.",
    "magnitude_prune": "Magnitude trim, then a weighted sum.",
}


def render_merge_card(
    results: dict[str, Any],
    recipe: dict[str, Any] | None = None,
    base_model: str | None = None,
    adapter: bool = False,
    repo_id: str = "<your-namespace>/<model-name>",
) -> str:
    """Markdown card of a merged model (or a merged sparse-delta adapter)."""
    merging = results.get("merging") or {}
    metrics = results.get("metrics") or {}
    method = str(merging.get("method", "unknown"))
    rows = [
        f"| {m.get('model')} | {m.get('weight')} | {m.get('density')} |"
        for m in merging.get("models", [])
    ]
    if adapter:
        snippet = (
            "import hf_sparse  # registers the MASKED_LR PEFT method\n"
            "from peft import PeftModel\nfrom transformers import AutoModelForCausalLM\n\n"
            f'base = AutoModelForCausalLM.from_pretrained("{base_model}")\n'
            f'model = PeftModel.from_pretrained(base, "{repo_id}")'
        )
    else:
        snippet = (
            "from transformers import AutoModelForCausalLM\n\n"
            f'model = AutoModelForCausalLM.from_pretrained("{repo_id}")'
        )
    density = merging.get("measured_density")
    return load_template("merged_model.md").safe_substitute(
        base_model=base_model or "unknown",
        library_name="peft" if adapter else "transformers",
        method=method,
        title=f"{Path(str(base_model or 'model')).name} merged with {method}",
        kind="A sparse-delta adapter" if adapter else "A model",
        count=len(rows),
        density=merging.get("density", "?"),
        method_note=_METHOD_NOTES.get(method, ""),
        models_table="\n".join(rows) or "| (none recorded) | | |",
        load_snippet=snippet,
        merged_tensors=merging.get("merged_tensors", "?"),
        measured_density=f"{100 * density:.2f}%" if isinstance(density, float) else "?",
        base_ppl=_fmt(metrics.get("base", {}).get("perplexity")),
        merged_ppl=_fmt(metrics.get("merged", {}).get("perplexity")),
        seconds=_fmt(metrics.get("merge_seconds"), ".1f"),
        recipe=yaml.safe_dump(recipe, sort_keys=False).strip() if recipe else "(none)",
    )
