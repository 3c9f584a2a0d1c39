"""SPD recipes (``hf-sparse run`` / ``decompose``): a named toy experiment with overrides, or a
language model.

Toy (``recipes/spd-tms-5-2.yaml``)::

    experiment: tms_5-2            # a name from hf_sparse.spd.experiments.EXPERIMENTS
    train: {steps: 5000, batch_size: 2048}
    loss: {importance_minimality_coeff: 3.0e-3, pnorm: 1.0}
    output_dir: outputs/spd-tms-5-2

Language model (``recipes/spd-smollm2.yaml``)::

    model: smollm2-135m
    spd: {C: 32, target_modules: [model.layers.29.mlp.up_proj]}
    loss: {output_loss: kl, importance_minimality_coeff: 1.0e-3, pnorm: 2.0}
    train: {steps: 100, batch_size: 4}
    data: {source: wikitext2, count: 64, length: 64}

Every level rejects unknown keys with the list of valid ones; the whole experiment is checked
against its toy model before any training.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..config_utils import check_keys, from_dict
from ..recipes import RecipeKind, register_recipe_kind
from .config import SPDConfig, SPDLossConfig
from .experiments import EXPERIMENTS, SPDTrainConfig, ToyExperiment, get_experiment
from .lm import LMDataConfig, LMExperiment
from .toy_models import ToyTrainingConfig, build_toy_model

TOY_KEYS = (
    "experiment", "toy", "target_training", "spd", "loss", "train", "plots", "output_dir",
)  # fmt: skip
LM_KEYS = (
    "model",
    "name",
    "spd",
    "loss",
    "train",
    "data",
    "cluster_min_similarity",
    "blocks",
    "output_dir",
)
SPD_KEYS = (
    "C",
    "target_modules",
    "exclude_modules",
    "gate_hidden",
    "use_delta_component",
    "tied_modules",
    "leak",
)

Experiment = ToyExperiment | LMExperiment
_TOY_BYTES = 16 * 2**20  # a toy decomposition, its metrics and plots


def _merge(cls: type, current: Any, values: Any, where: str) -> Any:
    """``cls`` built from ``current``'s fields updated with ``values`` (unknown keys refused)."""
    if values is None:
        return current
    if not isinstance(values, dict):
        raise ValueError(f"{where} must be a mapping, got {type(values).__name__}")
    base = dataclasses.asdict(current) if current is not None else {}
    from_dict(cls, values, where)  # unknown keys -> error listing valid ones
    return cls(**{**base, **values})


def _spd_kwargs(current: dict[str, Any], values: Any, where: str) -> dict[str, Any]:
    if values is None:
        return dict(current)
    if not isinstance(values, dict):
        raise ValueError(f"{where}.spd must be a mapping, got {type(values).__name__}")
    check_keys(values, SPD_KEYS, f"{where}.spd", "decomposition")
    merged = {**current, **values}
    SPDConfig(**merged)  # C < 1, empty targets... fail here, before any work
    return merged


def check_toy_experiment(experiment: ToyExperiment) -> None:
    """Refuse a toy experiment whose parts do not fit together (before training).

    Every layer named for the identity-CI or MMCS metrics must exist in the toy model and be
    decomposed, the decomposition targets must all be linear layers of the toy model, and
    ``tied_modules`` must pair decomposed layers of transposed shapes.
    """
    from .model import check_targets

    model = build_toy_model(experiment.toy)
    config = SPDConfig(**experiment.spd)
    targets = set(check_targets(model, config, check_tied=False))
    named = (
        set(experiment.identity_layers)
        | set(experiment.dense_layers)
        | set(experiment.direction_layers)
    )
    modules = dict(model.named_modules())
    missing = sorted(name for name in named if name not in modules)
    if missing:
        raise ValueError(
            f"experiment {experiment.name!r} measures layers {missing} that its toy model "
            f"({type(experiment.toy).__name__} {dataclasses.asdict(experiment.toy)}) does not "
            "have; the toy settings do not match the experiment (e.g. n_hidden_layers / "
            "n_layers), pick the matching experiment name"
        )
    undecomposed = sorted(named - targets)
    if undecomposed:
        raise ValueError(
            f"experiment {experiment.name!r} measures layers {undecomposed} that spd."
            f"target_modules {sorted(config.target_modules)} does not decompose; add them"
        )
    check_targets(model, config)  # tied_modules name decomposed layers of transposed shapes


def toy_experiment_from_dict(data: dict[str, Any], where: str = "recipe") -> ToyExperiment:
    check_keys(data, TOY_KEYS, where, "toy SPD recipe")
    experiment = get_experiment(data["experiment"])
    experiment.toy = _merge(type(experiment.toy), experiment.toy, data.get("toy"), f"{where}.toy")
    experiment.target_training = _merge(
        ToyTrainingConfig,
        experiment.target_training,
        data.get("target_training"),
        f"{where}.target_training",
    )
    experiment.loss = _merge(SPDLossConfig, experiment.loss, data.get("loss"), f"{where}.loss")
    experiment.train = _merge(SPDTrainConfig, experiment.train, data.get("train"), f"{where}.train")
    experiment.spd = _spd_kwargs(experiment.spd, data.get("spd"), where)
    check_toy_experiment(experiment)
    return experiment


def lm_experiment_from_dict(data: dict[str, Any], where: str = "recipe") -> LMExperiment:
    check_keys(data, LM_KEYS, where, "language-model SPD recipe")
    default = LMExperiment()
    if not isinstance(data["model"], str) or not data["model"]:
        raise ValueError(f"{where}.model must be a model name or path, got {data['model']!r}")
    spd = data.get("spd")
    if not isinstance(spd, dict) or not spd.get("target_modules"):
        raise ValueError(
            f"{where}.spd.target_modules is required for a language model: name the linears to "
            "decompose, e.g. [model.layers.29.mlp.up_proj]"
        )
    loss = _merge(SPDLossConfig, default.loss, data.get("loss"), f"{where}.loss")
    return LMExperiment(
        model=data["model"],
        name=str(data.get("name", Path(str(data["model"])).name)),
        spd=_spd_kwargs(default.spd, spd, where),
        loss=loss,
        train=_merge(SPDTrainConfig, default.train, data.get("train"), f"{where}.train"),
        data=_merge(LMDataConfig, default.data, data.get("data"), f"{where}.data"),
        cluster_min_similarity=float(
            data.get("cluster_min_similarity", default.cluster_min_similarity)
        ),
        blocks=_blocks_value(data.get("blocks"), where),
    )


def _blocks_value(value: Any, where: str) -> str | None:
    if value is not None and (not isinstance(value, str) or not value):
        raise ValueError(
            f"{where}.blocks must be the dotted path (or 're:' pattern) of the decoder-block "
            f"ModuleList, e.g. model.layers, got {value!r}"
        )
    return value


def experiment_from_dict(data: dict[str, Any], where: str = "recipe") -> Experiment:
    """A toy experiment (``experiment:`` key) or a language-model one (``model:`` key)."""
    if "experiment" in data and "model" in data:
        raise ValueError(
            f"{where} has both 'experiment' (toy) and 'model' (language model); keep one"
        )
    if "experiment" in data:
        return toy_experiment_from_dict(data, where)
    if "model" in data:
        return lm_experiment_from_dict(data, where)
    raise ValueError(
        f"{where} needs 'experiment: <name>' (a toy experiment: {list(EXPERIMENTS)}) or "
        "'model: <name or path>' (a language model)"
    )


@dataclass
class SPDRecipe:
    experiment: Experiment
    output_dir: str | None
    plots: bool = True

    def to_dict(self) -> dict[str, Any]:
        """The recipe mapping (runnable with ``hf-sparse run``) of this experiment."""
        exp = self.experiment
        if isinstance(exp, LMExperiment):
            values = dataclasses.asdict(exp)
        else:
            values = {
                "experiment": exp.name,
                "toy": dataclasses.asdict(exp.toy),
                "target_training": dataclasses.asdict(exp.target_training),
                "spd": dict(exp.spd),
                "loss": dataclasses.asdict(exp.loss),
                "train": dataclasses.asdict(exp.train),
                "plots": self.plots,
            }
        return {**values, "output_dir": self.output_dir}


def spd_recipe_from_dict(data: dict[str, Any], where: str = "recipe") -> SPDRecipe:
    plots = data.get("plots", True)
    if not isinstance(plots, bool):
        raise ValueError(f"{where}.plots must be true or false, got {plots!r}")
    return SPDRecipe(experiment_from_dict(data, where), data.get("output_dir"), plots)


def run_spd_recipe(
    recipe: SPDRecipe, overwrite: bool = False, show_progress: bool = True
) -> dict[str, Any]:
    """Run the decomposition; saves to ``output_dir`` (default ``spd-<experiment name>``)."""
    from ..io import check_output_dir
    from .lm import run_lm_decomposition
    from .toy_run import run_toy_experiment

    experiment = recipe.experiment
    output_dir = recipe.output_dir or f"spd-{experiment.name}"
    toy = not isinstance(experiment, LMExperiment)  # a language model's size is known once loaded
    check_output_dir(output_dir, overwrite, _TOY_BYTES if toy else None)
    saved = SPDRecipe(experiment, output_dir, recipe.plots).to_dict()
    if isinstance(experiment, LMExperiment):
        return run_lm_decomposition(experiment, output_dir, overwrite, recipe=saved)
    return run_toy_experiment(experiment, output_dir, overwrite, recipe.plots, recipe=saved)


def experiment_names(target: str) -> list[str] | None:
    """The names of a comma-separated list (``tms_5-2,resid_mlp1``), all checked before any
    work; None when ``target`` is a single name or a recipe file."""
    if "," not in target or Path(target).is_file():
        return None
    names = [name.strip() for name in target.split(",")]
    if not all(names):
        raise ValueError(
            f"empty name in the experiment list {target!r}; separate names by single commas, "
            "e.g. tms_5-2,resid_mlp1"
        )
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise ValueError(f"experiment list {target!r} names {repeated} twice; name each once")
    unknown = [name for name in names if name not in EXPERIMENTS]
    if unknown:
        raise ValueError(
            f"unknown SPD experiment(s) {unknown} in {target!r}; known experiments: "
            f"{list(EXPERIMENTS)}"
        )
    return names


def prepare_experiments(
    recipes: list[dict[str, Any]], output_dir: str | os.PathLike | None, overwrite: bool = False
) -> list[SPDRecipe]:
    """Several toy experiment recipes run by one call: every recipe parsed and every output
    folder checked before the first trains. With ``output_dir`` each experiment writes to
    ``output_dir/<name>``, else to its own default (``spd-<name>``)."""
    from ..io import check_output_dir

    parsed = []
    for data in recipes:
        recipe = spd_recipe_from_dict(data, where=f"experiment {data.get('experiment')!r}")
        name = recipe.experiment.name
        target = Path(output_dir) / name if output_dir is not None else recipe.output_dir
        recipe.output_dir = str(target or f"spd-{name}")
        check_output_dir(recipe.output_dir, overwrite, _TOY_BYTES)
        parsed.append(recipe)
    return parsed


def summarize(results: dict[str, Any]) -> str:
    """The summary as JSON: component statistics and timings (toy: against ground truth)."""
    import json

    if "round_trip" in results:  # a language-model decomposition
        metrics = results["metrics"]
        shown = {
            "kl": metrics["kl"],
            "mean_active_per_token": metrics["mean_active_per_token"],
            "layers": metrics["layers"],
            "round_trip": results["round_trip"],
            "timings": results["timings"],
        }
    else:
        shown = {k: results[k] for k in ("summary", "published", "timings")}
    shown["output_dir"] = results.get("output_dir")
    return json.dumps({"experiment": results["experiment"], **shown}, indent=2, default=str)


SPD_RECIPES = register_recipe_kind(
    RecipeKind(
        "spd", ("experiment", "spd"), spd_recipe_from_dict, run_spd_recipe, summarize,
        model_key="model",
    )
)  # fmt: skip


def load_experiment(target: str | os.PathLike) -> SPDRecipe:
    """The SPD recipe of a toy experiment name (``tms_5-2``) or of a recipe file."""
    from ..recipes import read_recipe_file

    text = str(target)
    if text.endswith((".yaml", ".yml")) or Path(text).is_file():
        return spd_recipe_from_dict(read_recipe_file(target), where=text)
    return spd_recipe_from_dict({"experiment": text}, where="experiment name")
