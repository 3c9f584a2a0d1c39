"""Run a toy experiment end to end: train the target, decompose it with SPDTrainer, measure it
against the ground truth, save everything (safetensors, JSON, plots).

Lifecycle of ``run_toy_experiment(experiment, output_dir)``:
  1. check the output folder (before any work);
  2. train the target toy model (seeded, seconds);
  3. wrap it with ``get_spd_model`` and train with ``SPDTrainer`` (faithfulness warm-up first);
  4. ``toy_metrics``: MMCS / ML2R, alive components, CI L0, identity-CI on one-hot inputs,
     reconstruction errors;
  5. write to a temporary folder and rename: ``adapter/`` (PEFT, safetensors),
     ``target_model.safetensors``, ``hf_sparse_results.json``, ``recipe.yaml``, CI plots.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn
from transformers import TrainingArguments

from ..io import atomic_output_dir, check_output_dir
from ..outputs import results_record, write_outputs
from .config import SPDConfig
from .experiments import ToyExperiment
from .layer import SPDRuntime
from .metrics import alive_components, ci_l0, identity_ci_report, mmcs_ml2r
from .model import get_spd_model, spd_layers, spd_runtime
from .objective import layer_importances, model_output, target_pass
from .toy_models import (
    ResidMLPConfig,
    TMSConfig,
    ToyBatches,
    build_toy_model,
    toy_batch,
    train_toy_model,
)
from .trainer import SPDTrainer

logger = logging.getLogger(__name__)
EVAL_EXAMPLES = 8192
MMCS_MIN = 0.99
REPRESENTED_FRACTION = 0.1
ML2R_RANGE = (0.9, 1.1)
ONE_HOT_VALUE = 0.75  # the reference implementation's probe magnitude (IdentityCIError)


def training_arguments(train, output_dir: str | os.PathLike, **overrides) -> TrainingArguments:
    """``TrainingArguments`` of an ``SPDTrainConfig`` (no checkpoints, no reporting)."""
    kwargs = dict(
        output_dir=str(output_dir),
        max_steps=train.steps,
        learning_rate=train.lr,
        lr_scheduler_type=train.lr_schedule,
        weight_decay=0.0,
        warmup_steps=0,
        max_grad_norm=train.max_grad_norm,
        logging_steps=train.logging_steps,
        save_strategy="no",
        report_to=[],
        disable_tqdm=True,
        use_cpu=not torch.cuda.is_available(),
        seed=train.seed,
        per_device_train_batch_size=1,
        dataloader_num_workers=0,
        remove_unused_columns=False,
    )
    kwargs.update(overrides)
    return TrainingArguments(**kwargs)


def decompose_toy(experiment: ToyExperiment) -> tuple[nn.Module, SPDTrainer, dict[str, Any]]:
    """Train the target and its decomposition; returns ``(peft model, trainer, timings)``."""
    train = experiment.train
    config = SPDConfig(**experiment.spd)  # validated before any training
    start = time.perf_counter()
    target = build_toy_model(experiment.toy, seed=train.seed)
    target_loss = train_toy_model(target, experiment.toy, experiment.target_training, train.seed)
    target_s = time.perf_counter() - start
    torch.manual_seed(train.seed)
    model = get_spd_model(target, config)
    data = ToyBatches(experiment.toy, train.batch_size, seed=train.seed + 1)
    with tempfile.TemporaryDirectory(prefix="spd-trainer-") as scratch:
        trainer = SPDTrainer(
            model=model,
            args=training_arguments(train, scratch),
            train_dataset=data,
            spd_loss=experiment.loss,
        )
        start = time.perf_counter()
        trainer.train()
        spd_s = time.perf_counter() - start
    timings = {"target_train_s": target_s, "spd_train_s": spd_s, "target_loss": target_loss}
    return model, trainer, timings


def represented_features(model: nn.Module, experiment: ToyExperiment) -> torch.Tensor:
    """Bool ``[n_features]``: the features the target model actually represents.

    A TMS run can drop features (its column of ``W`` shrinks to ~0, e.g. seed 1 of TMS 5-2
    keeps 2 of 5); those have no mechanism to recover, so the ground truth is the features
    whose column norm is at least ``REPRESENTED_FRACTION`` of the largest. Residual-MLP
    features all count.
    """
    n = experiment.toy.n_features
    layer = spd_layers(model).get("linear1")
    if not isinstance(experiment.toy, TMSConfig) or layer is None:
        return torch.ones(n, dtype=torch.bool)
    norms = layer.target_weight().detach().norm(dim=0)
    return norms >= REPRESENTED_FRACTION * norms.max()


def _one_hot_inputs(model: nn.Module, toy) -> dict[str, torch.Tensor]:
    """Each decomposed layer's input when one feature alone is on (``[n_features, d_in]``)."""
    x = torch.eye(toy.n_features) * ONE_HOT_VALUE
    return target_pass(model, {"x": x}).layer_inputs


@torch.no_grad()
def toy_metrics(model: nn.Module, experiment: ToyExperiment, seed: int = 1234) -> dict[str, Any]:
    """Ground-truth and sparsity metrics of a decomposed toy model (see ``metrics.py``)."""
    threshold = experiment.loss.ci_alive_threshold
    layers = spd_layers(model)
    generator = torch.Generator().manual_seed(seed)
    x, _ = toy_batch(experiment.toy, EVAL_EXAMPLES, generator)
    target = target_pass(model, {"x": x})
    ci, _ = layer_importances(layers, target.layer_inputs)
    one_hot = _one_hot_inputs(model, experiment.toy)
    ci_one_hot, _ = layer_importances(layers, one_hot)
    features = represented_features(model, experiment)
    results: dict[str, Any] = {
        "layers": {},
        "represented_features": features.nonzero().flatten().tolist(),
    }
    for name, layer in layers.items():
        alive = alive_components(torch.cat([ci[name], ci_one_hot[name]]), threshold)
        entry: dict[str, Any] = {
            "C": int(alive.numel()),
            "n_alive": int(alive.sum()),
            "ci_l0": ci_l0(ci[name], threshold),
        }
        if name in experiment.identity_layers:
            report = identity_ci_report(ci_one_hot[name][features], threshold)
            entry["identity_ci_error"] = report.error
            entry["one_to_one_fraction"] = report.one_to_one_fraction
            entry["active_per_feature"] = report.active_per_feature
        if name in experiment.dense_layers:
            active = (ci_one_hot[name][features] > threshold).sum(dim=1)
            entry["expected_dense_components"] = experiment.dense_layers[name]
            entry["active_per_feature"] = active.tolist()
        orientation = experiment.direction_layers.get(name)
        if orientation is not None and alive.any():
            U, V = layer.components()
            W = layer.target_weight()
            U, V = U[:, alive], V[alive]
            if orientation == "rows":  # features are the outputs: compare transposes
                W, U, V = W.t(), V.t(), U.t()
            match = mmcs_ml2r(W[:, features], U, V[:, features])
            entry["mmcs"], entry["ml2r"] = match.mmcs, match.ml2r
        results["layers"][name] = entry
    # Reconstruction: masks = causal importances; all components; binarised importances.
    modes = {
        "ci_masked": {n: SPDRuntime("masked", mask=ci[n], use_delta=False) for n in layers},
        "all_components": {n: SPDRuntime("masked", use_delta=False) for n in layers},
        "ci_binary": {
            n: SPDRuntime("masked", mask=(ci[n] > threshold).float(), use_delta=False)
            for n in layers
        },
    }
    for mode, runtimes in modes.items():
        with spd_runtime(model, runtimes):
            out = model_output(model, {"x": x})
        results[f"mse_{mode}"] = float(((out - target.output) ** 2).mean())
    results["target_output_mean_square"] = float((target.output**2).mean())
    results["ci_one_hot"] = {n: c.tolist() for n, c in ci_one_hot.items()}
    return results


def summarise(experiment: ToyExperiment, metrics: dict[str, Any]) -> dict[str, Any]:
    """The acceptance view: MMCS / ML2R, alive counts vs feature count, one-to-one fraction."""
    n = len(metrics.get("represented_features", range(experiment.toy.n_features)))
    layers = metrics["layers"]
    summary: dict[str, Any] = {"n_features": experiment.toy.n_features}
    if n != experiment.toy.n_features:
        summary["n_features_represented_by_target"] = n
    for name, entry in layers.items():
        if "mmcs" in entry:
            summary[f"{name}.mmcs"] = round(entry["mmcs"], 4)
            summary[f"{name}.ml2r"] = round(entry["ml2r"], 4)
        summary[f"{name}.n_alive"] = entry["n_alive"]
        if "one_to_one_fraction" in entry:
            summary[f"{name}.one_to_one_fraction"] = round(entry["one_to_one_fraction"], 4)
    if isinstance(experiment.toy, TMSConfig):
        # The acceptance: MMCS >= 0.99, ML2R in [0.9, 1.1], exactly n_features alive
        # components per layer, each feature owning exactly one of them.
        directions_ok = all(
            entry["mmcs"] >= MMCS_MIN and ML2R_RANGE[0] <= entry["ml2r"] <= ML2R_RANGE[1]
            for entry in layers.values()
            if "mmcs" in entry
        )
        one_each = all(
            entry["n_alive"] == n and entry.get("one_to_one_fraction", 1.0) == 1.0
            for name, entry in layers.items()
            if name not in experiment.dense_layers
        )
        for name, k in experiment.dense_layers.items():
            active = layers[name]["active_per_feature"]
            dense = layers[name]["n_alive"] == k and all(a == k for a in active)
            summary[f"{name}.dense_as_expected"] = dense
            one_each = one_each and dense
        summary["ground_truth_recovered"] = directions_ok and one_each
    elif isinstance(experiment.toy, ResidMLPConfig):
        fractions = [layers[name]["one_to_one_fraction"] for name in experiment.identity_layers]
        summary["mlp_in_one_to_one_fraction"] = round(sum(fractions) / len(fractions), 4)
    summary["mse_ci_masked"] = metrics["mse_ci_masked"]
    return summary


def run_toy_experiment(
    experiment: ToyExperiment,
    output_dir: str | os.PathLike | None = None,
    overwrite: bool = False,
    plots: bool = True,
    recipe: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Decompose ``experiment``'s toy model; save to ``output_dir`` when given (with ``recipe``,
    the mapping that made it). Returns the results (summary, metrics, timings, log history)."""
    if output_dir is not None:
        check_output_dir(output_dir, overwrite)
    model, trainer, timings = decompose_toy(experiment)
    metrics = toy_metrics(model, experiment)
    results = {
        "experiment": experiment.name,
        "summary": summarise(experiment, metrics),
        "published": experiment.published,
        "timings": timings,
        "faithfulness_after_warmup": trainer.spd_warmup_loss,
        "metrics": metrics,
        "log_history": trainer.state.log_history,
        "torch_threads": torch.get_num_threads(),
    }
    if output_dir is not None:
        with atomic_output_dir(output_dir, overwrite) as tmp:
            save_toy_outputs(model, experiment, results, tmp, plots, recipe)
        results["output_dir"] = str(Path(output_dir))
    return results


def experiment_dict(experiment: ToyExperiment) -> dict[str, Any]:
    data = dataclasses.asdict(experiment)
    data["toy_kind"] = type(experiment.toy).__name__
    return data


def save_toy_outputs(
    model: nn.Module,
    experiment: ToyExperiment,
    results: dict[str, Any],
    folder: Path,
    plots: bool,
    recipe: dict[str, Any] | None = None,
) -> None:
    model.save_pretrained(folder / "adapter")
    base = model.get_base_model()
    target_state = {}
    for key, value in base.state_dict().items():
        if ".spd_" in key:
            continue
        target_state[key.replace(".base_layer.", ".")] = value.detach().contiguous().clone()
    save_file(target_state, folder / "target_model.safetensors")
    extras = {k: v for k, v in results.items() if k not in ("metrics", "timings")}
    record = results_record(
        "spd",
        config=experiment_dict(experiment),
        metrics=results["metrics"],
        timings=results["timings"],
        **extras,
    )
    write_outputs(folder, record, recipe)
    if plots:
        try:
            from .plots import plot_ci_one_hot
        except ImportError as error:  # matplotlib is optional
            logger.warning("no plots: %s", error)
            return
        plot_ci_one_hot(results["metrics"]["ci_one_hot"], folder / "ci_one_hot.png")


def load_toy_run(folder: str | os.PathLike, experiment: ToyExperiment) -> nn.Module:
    """The decomposed model saved by ``run_toy_experiment`` in ``folder`` (target weights from
    ``target_model.safetensors``, components and gates from ``adapter/``)."""
    from peft import PeftModel
    from safetensors.torch import load_file

    folder = Path(folder)
    target = build_toy_model(experiment.toy, seed=experiment.train.seed)
    target.load_state_dict(load_file(folder / "target_model.safetensors"))
    target.eval().requires_grad_(False)
    return PeftModel.from_pretrained(target, folder / "adapter").eval()
