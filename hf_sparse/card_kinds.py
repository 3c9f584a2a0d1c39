"""The kinds of output a card describes, registered by name in :data:`CARD_KINDS`.

Each kind says how its output loads (``model``, ``adapter``, ``remote`` code or plain
``files``), its Hub ``base_model_relation`` (only the ones the Hub defines: adapter, merge,
quantized, finetune), its tags, and which figures of its results file are its own (those go to
``model-index``) and which describe the base (shown for reference only). The prose of each kind
is a template in ``model_cards/``. ``hf_sparse.cards`` renders and writes the card.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from string import Template
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .cards import BaseInfo


@dataclass(frozen=True)
class DatasetRef:
    """A dataset as the Hub's ``model-index`` names it."""

    name: str
    hub_id: str | None
    config: str | None
    split: str


_DATASET_TITLES = {
    "wikitext2": "WikiText-2 (raw)",
    "lambada": "LAMBADA (OpenAI)",
    "hellaswag": "HellaSwag",
    "alpaca": "Alpaca",
    "tinystories": "TinyStories",
    "ptb": "Penn Treebank",
    "c4": "C4 (en)",
}
# The local copies in the shared data folder come from these splits of the Hub sets.
_LOCAL_SPLITS = {"wikitext2": "test", "lambada": "test", "alpaca": "train", "tinystories": "train"}


def dataset_ref(source: Any, use: str = "evaluation") -> DatasetRef | None:
    """A data source of a recipe (named set, Hub id or file) with the split the run read."""
    from .data import NAMED_DATASETS, data_dir

    if not source or not isinstance(source, str):
        return None
    named = NAMED_DATASETS.get(source)
    if named is None:
        if source.count("/") == 1 and not Path(source).exists():  # a Hub dataset id
            return DatasetRef(source, source, None, "test" if use == "evaluation" else "train")
        return DatasetRef(Path(source).name, None, None, "local file")
    if data_dir() is not None and source in _LOCAL_SPLITS:
        split = _LOCAL_SPLITS[source]
    else:
        split = named.hub_splits[use != "calibration"]
    return DatasetRef(_DATASET_TITLES.get(source, source), named.hub[0], named.hub[1], split)


@dataclass(frozen=True)
class Figure:
    """One measured number; ``own`` is False for figures of the base (shown for reference)."""

    name: str
    value: float | None
    dataset: DatasetRef | None
    own: bool = True
    metric: str = "perplexity"
    task: str = "text-generation"
    task_name: str = "Language modeling"


@dataclass
class CardContext:
    record: dict[str, Any]
    recipe: dict[str, Any] | None
    base: BaseInfo
    peft_type: str | None
    repo_id: str
    files_hint: str = "the output's files"
    subfolder: str | None = None  # where the adapter sits inside the output, if not at its top

    @property
    def metrics(self) -> dict[str, Any]:
        return self.record.get("metrics") or {}

    @property
    def config(self) -> dict[str, Any]:
        return self.record.get("config") or {}

    def recipe_get(self, *path: str) -> Any:
        value: Any = self.recipe or {}
        for key in path:
            value = value.get(key) if isinstance(value, Mapping) else None
        return value


@dataclass
class RenderedParts:
    """What a kind contributes: title, summary and figures; the rest of the card is common."""

    title: str
    summary: str
    figures: list[Figure] = field(default_factory=list)


@dataclass(frozen=True)
class CardKind:
    """How one kind of output is described (see the module docstring)."""

    name: str
    template: str
    load: str  # model | adapter | remote | files
    library_name: str
    render_vars: Callable[[CardContext], tuple[dict[str, Any], list[Figure]]]
    relation: str | None = None
    names_base: bool = True  # False for outputs that are not weights (studies, masks)
    pipeline_tag: str | None = "text-generation"
    method_tags: Callable[[CardContext], list[str]] = lambda ctx: []
    extra_datasets: Callable[[CardContext], list[str]] = lambda ctx: []
    files_hint: str = "the output's files"

    def tags(self, ctx: CardContext) -> list[str]:
        return [str(t) for t in self.method_tags(ctx)]

    def datasets(self, ctx: CardContext) -> list[str]:
        return self.extra_datasets(ctx)

    def render(self, ctx: CardContext) -> RenderedParts:
        ctx.files_hint = self.files_hint
        values, figures = self.render_vars(ctx)
        template = resources.files("hf_sparse.model_cards").joinpath(self.template).read_text()
        title, _, body = template.strip().partition("\n")
        text = Template(body).safe_substitute(base=ctx.base.shown, **values)
        return RenderedParts(Template(title.lstrip("# ")).safe_substitute(
            base=ctx.base.shown, **values), text, figures)  # fmt: skip


CARD_KINDS: dict[str, CardKind] = {}


def register_card_kind(kind: CardKind) -> CardKind:
    CARD_KINDS[kind.name] = kind
    return kind


# ---------------------------------------------------------------- helpers


def _num(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def _pct(value: Any, digits: int = 2) -> str:
    number = _num(value)
    return f"{100 * number:.{digits}f}%" if number is not None else "not recorded"


def _eval_ref(ctx: CardContext) -> DatasetRef | None:
    source = ctx.recipe_get("evaluation", "dataset")
    if source is None and ctx.recipe is not None and ctx.recipe.get("evaluation") is not None:
        source = "wikitext2"
    return dataset_ref(source)


def _ppl(ctx: CardContext, key: str, name: str, own: bool) -> Figure | None:
    entry = ctx.metrics.get(key)
    if not isinstance(entry, Mapping) or _num(entry.get("perplexity")) is None:
        return None
    length = ctx.recipe_get("evaluation", "sequence_length")
    windows = entry.get("windows")
    detail = f" ({windows} windows of {length} tokens)" if windows and length else ""
    return Figure(f"{name}{detail}", float(entry["perplexity"]), _eval_ref(ctx), own)


def _kept(*figures: Figure | None) -> list[Figure]:
    return [f for f in figures if f is not None]


# ---------------------------------------------------------------- kinds


def _pruned(ctx: CardContext) -> tuple[dict[str, Any], list[Figure]]:
    config = ctx.config
    layers = ctx.record.get("layers") or {}
    measured = _num(ctx.metrics.get("sparsity"))
    if measured is None and layers:
        measured = sum(layers.values()) / len(layers)
    figures = _kept(
        _ppl(ctx, "pruned", "perplexity", True), _ppl(ctx, "dense", "perplexity of the base", False)
    )
    recovery = ctx.metrics.get("recovery") or {}
    steps = recovery.get("perplexity_by_step") or {}
    if steps:
        last = max(steps, key=int)
        figures.append(
            Figure(f"perplexity after {last} recovery steps", _num(steps[last]), _eval_ref(ctx))
        )
    callback = ctx.record.get("kind") == "PruningCallback"
    how = (
        f"while fine-tuning with `transformers.Trainer` and `hf_sparse.callbacks.PruningCallback` "
        f"(saved at step {ctx.record.get('global_step', '?')}; the mask was kept after every "
        "optimizer step)"
        if callback
        else "one-shot"
    )
    return {
        "method": config.get("method", "unknown"),
        "structure": config.get("structure") or "unstructured",
        "sparsity": _pct(config.get("sparsity"), 0),
        "measured": _pct(measured),
        "layers": f" over {len(layers)} layers" if layers else "",
        "how": how,
    }, figures


register_card_kind(
    CardKind(
        "pruned", "pruned_model.md", "model", "transformers", _pruned,
        method_tags=lambda c: ["pruned", c.config.get("method"),
                               f"sparsity-{str(c.config.get('structure') or 'unstructured')}"
                               .replace(":", "of")],
    )
)  # fmt: skip


def _finetune_data(ctx: CardContext) -> DatasetRef | None:
    return dataset_ref(ctx.recipe_get("data", "dataset"), "evaluation")


def _loss_figures(ctx: CardContext) -> list[Figure]:
    data = _finetune_data(ctx)
    held_out = ctx.recipe_get("finetune", "eval_samples")
    where = f" ({held_out} held-out examples)" if held_out else " (held-out examples)"
    metrics = ctx.metrics
    return _kept(
        Figure(f"response loss before training{where}", _num(metrics.get("eval_loss_before")),
               data, own=False, metric="loss") if _num(metrics.get("eval_loss_before")) else None,
        Figure(f"response loss{where}", _num(metrics.get("eval_loss_after")), data,
               metric="loss") if _num(metrics.get("eval_loss_after")) else None,
        Figure(f"response perplexity{where}", _num(metrics.get("eval_ppl_after")), data)
        if _num(metrics.get("eval_ppl_after")) else None,
    )  # fmt: skip


def _masked_lr(ctx: CardContext) -> tuple[dict[str, Any], list[Figure]]:
    mask = ctx.record.get("mask") or {}
    trainable = ctx.record.get("trainable_parameters")
    return {
        "mask_job": mask.get("job") or "a mask file",
        "trainable": f"{trainable:,}" if isinstance(trainable, int) else "the masked",
        "density": _pct(mask.get("density"), 3),
        "steps": ctx.recipe_get("finetune", "max_steps") or "?",
    }, _loss_figures(ctx)


register_card_kind(
    CardKind(
        "masked_lr_adapter", "masked_lr_adapter.md", "adapter", "peft", _masked_lr, "adapter",
        method_tags=lambda c: ["masked-lr", "sparse-delta"]
        + (["golden-parameters"] if "golden" in str((c.record.get("mask") or {}).get("job"))
           else []),
    )
)  # fmt: skip


def _finetuned(ctx: CardContext) -> tuple[dict[str, Any], list[Figure]]:
    callback = ctx.record.get("kind") == "GoldenMaskCallback"
    masks = ctx.record.get("masks") or ctx.record.get("mask") or {}
    how = (
        "with `hf_sparse.masked_lr.GoldenParamsTrainer` and `GoldenMaskCallback`: only the "
        "golden parameters (the entries in the top-k importance of every sample) learned"
        if callback
        else "with masked learning rates (`MaskedAdamW`): the masked entries learned at their "
        "own rate"
    )
    return {"how": how, "density": _pct(masks.get("density"), 3)}, _loss_figures(ctx)


register_card_kind(
    CardKind(
        "finetuned_model", "finetuned_model.md", "model", "transformers", _finetuned, "finetune",
        method_tags=lambda c: ["masked-lr", "golden-parameters"],
    )
)  # fmt: skip


_MERGE_NOTES = {
    "sparsegpt_tv": "Each task vector was pruned with SparseGPT's OBS solver on the layer-input "
    "Hessian of calibration data, so the kept entries correct for the dropped ones.",
    "sparsegpt_ties": "Each task vector was pruned with SparseGPT's OBS solver on the layer-input "
    "Hessian, then signs were elected as in TIES.",
    "dare_sparsegpt": "DARE with error correction: SparseGPT's OBS solver chose and corrected "
    "the kept task-vector entries, which were then divided by the density (DARE's rescale).",
    "dare_sparsegpt_ties": "DARE with error correction (SparseGPT-selected entries divided by "
    "the density), then signs were elected as in TIES.",
    "ties": "TIES: magnitude trim, sign election, disjoint mean.",
    "dare_ties": "DARE: random drop with rescaling, then TIES sign election.",
    "dare_linear": "DARE: random drop with rescaling, then a weighted sum.",
    "task_arithmetic": "Task arithmetic: a weighted sum of the task vectors.",
    "magnitude_prune": "Magnitude trim, then a weighted sum.",
}


def _merged(ctx: CardContext) -> tuple[dict[str, Any], list[Figure]]:
    merging = ctx.record.get("merging") or {}
    method = str(merging.get("method") or ctx.config.get("method") or "unknown")
    rows = [
        f"| {Path(str(m.get('model'))).name} | {m.get('weight')} | {m.get('density')} |"
        for m in merging.get("models", [])
    ]
    figures = _kept(
        _ppl(ctx, "merged", "perplexity", True), _ppl(ctx, "base", "perplexity of the base", False)
    )
    return {
        "method": method,
        "count": len(rows),
        "density": merging.get("density", ctx.config.get("density", "?")),
        "measured_density": _pct(merging.get("measured_density", ctx.metrics.get("density"))),
        "method_note": _MERGE_NOTES.get(method, ""),
        "models_table": "\n".join(rows) or "| (none recorded) | | |",
        "kind": "A sparse-delta adapter" if ctx.peft_type else "A model",
    }, figures


def _merge_tags(ctx: CardContext) -> list[str]:
    merging = ctx.record.get("merging") or {}
    return ["merge", str(merging.get("method") or ctx.config.get("method") or "")]


register_card_kind(
    CardKind("merged_model", "merged_model.md", "model", "transformers", _merged, "merge",
             method_tags=_merge_tags)
)  # fmt: skip
register_card_kind(
    CardKind("merged_adapter", "merged_model.md", "adapter", "peft", _merged, "adapter",
             method_tags=lambda c: [*_merge_tags(c), "sparse-delta", "masked-lr"])
)  # fmt: skip


def _task_vector(ctx: CardContext) -> tuple[dict[str, Any], list[Figure]]:
    error = _num(ctx.metrics.get("mean_relative_output_error"))
    return {
        "method": ctx.config.get("method", "?"),
        "density": ctx.config.get("density", "?"),
        "step": ctx.record.get("global_step", "?"),
        "error": f"{error:.4f}" if error is not None else "not measured",
    }, []


register_card_kind(
    CardKind(
        "task_vector_adapter", "task_vector_adapter.md", "adapter", "peft", _task_vector,
        "adapter", method_tags=lambda c: ["task-vector", str(c.config.get("method") or ""),
                                          "sparse-delta", "masked-lr"],
    )
)  # fmt: skip


register_card_kind(
    CardKind(
        "task_vector_model", "task_vector_model.md", "model", "transformers", _task_vector,
        "finetune", method_tags=lambda c: ["task-vector", str(c.config.get("method") or "")],
    )
)  # fmt: skip


def _basis_sharing(ctx: CardContext) -> tuple[dict[str, Any], list[Figure]]:
    config = ctx.config
    counts = ctx.metrics.get("parameters") or {}
    removed = (
        f"{counts['removed']:,} of {counts['dense']:,} targeted parameters "
        f"({counts['removed'] / counts['dense']:.2%})"
        if counts.get("dense") and "removed" in counts
        else "not recorded"
    )
    figures = _kept(
        _ppl(ctx, "compressed", "perplexity", True),
        _ppl(ctx, "dense", "perplexity of the base", False),
    )
    return {
        "ratio": _pct(config.get("ratio"), 0),
        "group_size": config.get("group_size", "?"),
        "shared_roles": ", ".join(map(str, config.get("shared_roles") or []))
        or "the paper's default set",
        "removed": removed,
    }, figures


register_card_kind(
    CardKind("basis_sharing_adapter", "basis_sharing_adapter.md", "adapter", "peft",
             _basis_sharing, "adapter",
             method_tags=lambda c: ["basis-sharing", "svd", "compressed"])
)  # fmt: skip
register_card_kind(
    CardKind("basis_sharing_compressed", "basis_sharing_compressed.md", "remote", "transformers",
             _basis_sharing, None, method_tags=lambda c: ["basis-sharing", "svd", "compressed",
                                                          "custom_code"])
)  # fmt: skip


def _spd(ctx: CardContext) -> tuple[dict[str, Any], list[Figure]]:
    data = ctx.config.get("data") or {}
    ref = dataset_ref(data.get("source"), "evaluation") if isinstance(data, Mapping) else None
    kl = (ctx.metrics.get("kl") or {}) if isinstance(ctx.metrics.get("kl"), Mapping) else {}
    figures = [
        Figure(f"KL from the target, {mode} (held-out windows)", _num(value), ref, metric="kl")
        for mode, value in kl.items()
        if _num(value) is not None
    ]
    targets = ctx.record.get("targets") or []
    spd = ctx.config.get("spd") or {}
    return {
        "targets": ", ".join(f"`{t}`" for t in targets) or "the configured target linears",
        "components": spd.get("num_components", "?") if isinstance(spd, Mapping) else "?",
    }, figures


register_card_kind(
    CardKind("spd_adapter", "spd_adapter.md", "adapter", "peft", _spd, "adapter",
             method_tags=lambda c: ["spd", "parameter-decomposition", "interpretability"])
)  # fmt: skip


def _spd_toy(ctx: CardContext) -> tuple[dict[str, Any], list[Figure]]:
    return {
        "experiment": ctx.record.get("experiment", "?"),
        "summary": ctx.record.get("summary") or "",
    }, []


register_card_kind(
    CardKind("spd_toy", "spd_toy.md", "files", "peft", _spd_toy, names_base=False,
             pipeline_tag=None, method_tags=lambda c: ["spd", "toy-model", "interpretability"],
             files_hint="adapter/ + target_model.safetensors: hf_sparse.spd.toy_run.load_toy_run")
)  # fmt: skip


def _study(ctx: CardContext) -> tuple[dict[str, Any], list[Figure]]:
    ref = dataset_ref(ctx.config.get("eval_dataset"))
    figures = _kept(_ppl(ctx, "dense", "perplexity of the analysed model", False))
    if figures:
        figures[0] = Figure(figures[0].name, figures[0].value, ref, own=False)
    worst = ctx.metrics.get("worst_single_weight") or {}
    for point in (ctx.metrics.get("points") or [])[:8]:
        name = (
            f"perplexity, top-{point.get('k')} {point.get('kind')} x{point.get('strength')} "
            f"({point.get('target') or 'all'})"
        )
        figures.append(Figure(name, _num(point.get("top")), ref, own=False))
    return {
        "metric": ctx.config.get("metric", "?"),
        "top_k": ctx.config.get("top_k", "?"),
        "worst": (
            f"`{worst.get('name')}` {worst.get('index')}"
            if isinstance(worst, Mapping) and worst
            else "not measured"
        ),
    }, figures


register_card_kind(
    CardKind("analysis_study", "analysis_study.md", "files", "hf-sparse", _study,
             names_base=False, pipeline_tag=None,
             method_tags=lambda c: ["analysis", "critical-weights", str(c.config.get("metric"))],
             files_hint="report.html, sensitivity_stats.json, perturbation_results.json, ...")
)  # fmt: skip


def _masks(ctx: CardContext) -> tuple[dict[str, Any], list[Figure]]:
    data = ctx.recipe_get("data", "dataset")
    kl = _num(ctx.metrics.get("kl"))
    figures = (
        [Figure("KL from the model to the model without the masked entries", kl, dataset_ref(data),
                own=False, metric="kl")]
        if kl is not None else []
    )  # fmt: skip
    return {
        "job": ctx.record.get("job", "?"),
        "kept": f"{ctx.metrics.get('kept', 0):,}" if _num(ctx.metrics.get("kept")) else "?",
        "density": _pct(ctx.metrics.get("density"), 4),
    }, figures


register_card_kind(
    CardKind("masks", "masks.md", "files", "hf-sparse", _masks, names_base=False,
             pipeline_tag=None, method_tags=lambda c: ["masks", str(c.record.get("job") or "")],
             files_hint="masks.safetensors: hf_sparse.masks.ParameterMasks.load(...)")
)  # fmt: skip


# ---------------------------------------------------------------- which kind


_BY_PEFT_TYPE = {
    "MASKED_LR": "masked_lr_adapter",
    "BASIS_SHARING": "basis_sharing_adapter",
    "SPD": "spd_adapter",
}


def _finetune_kind(record, peft_type, recipe) -> str:
    return "masked_lr_adapter" if peft_type else "finetuned_model"


def _merge_kind(record, peft_type, recipe) -> str:
    return "merged_adapter" if peft_type else "merged_model"


def _basis_sharing_kind(record, peft_type, recipe) -> str:
    """``output: compressed`` (or no adapter in the folder) is the standalone model."""
    output = record.get("output") or (recipe or {}).get("output")
    if output == "compressed" or (output is None and peft_type is None):
        return "basis_sharing_compressed"
    return "basis_sharing_adapter"


def _task_vector_kind(record, peft_type, recipe) -> str:
    """The callback's adapter, or (``apply_to_model``) the trained model it rewrote."""
    if peft_type or not record.get("applied_to_model"):
        return "task_vector_adapter"
    return "task_vector_model"


def _spd_kind(record, peft_type, recipe) -> str:
    return "spd_toy" if "toy_kind" in (record.get("config") or {}) else "spd_adapter"


_BY_RECORD: dict[str, str | Callable[..., str]] = {
    "pruning": "pruned",
    "PruningCallback": "pruned",
    "finetune": _finetune_kind,
    "GoldenMaskCallback": "finetuned_model",
    "merging": _merge_kind,
    "TaskVectorPruneCallback": _task_vector_kind,
    "basis_sharing": _basis_sharing_kind,
    "BasisSharingCallback": "basis_sharing_adapter",
    "basis_sharing_compressed": "basis_sharing_compressed",
    "spd": _spd_kind,
    "analysis": "analysis_study",
    "masks": "masks",
}


def resolve_kind(
    record: Mapping[str, Any], peft_type: str | None, recipe: Mapping[str, Any] | None = None
) -> str:
    """The card kind of an output: from its results ``kind``, else from its PEFT type."""
    kind = record.get("kind")
    if kind in _BY_RECORD:
        rule = _BY_RECORD[kind]
        return rule if isinstance(rule, str) else rule(record, peft_type, recipe)
    if peft_type in _BY_PEFT_TYPE:
        return _BY_PEFT_TYPE[peft_type]
    raise ValueError(
        f"no card for an output of kind {kind!r} (PEFT type {peft_type!r}); known kinds: "
        f"{sorted(_BY_RECORD)}; register one in hf_sparse.card_kinds.CARD_KINDS"
    )
