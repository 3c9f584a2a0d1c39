"""SPD on a language model: decompose chosen linears, measure KL and activity, round-trip it.

Lifecycle of ``run_lm_decomposition(experiment, output_dir)``:
  1. validate the experiment and the output folder (before loading anything);
  2. load the model (``smollm2-135m`` or a path) and token windows (``hf_sparse.data``);
  3. ``get_spd_model`` + ``SPDTrainer`` with the KL reconstruction loss;
  4. ``lm_metrics`` on held-out windows: KL(target || decomposed) with importance masks, with
     binarised masks, with every component; active components per token; alive components;
     clusters of components that fire together;
  5. save the adapter (safetensors), reload it on a fresh base model and compare logits, then
     ablate (keep only the components above the importance threshold, per token) and report
     the KL: the round trip of the issue's acceptance list.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..config_utils import check_positive_ints, help_field
from ..data import check_data_source
from ..io import atomic_output_dir, check_output_dir
from ..models import find_decoder_blocks, weight_matrix
from .config import SPDConfig, SPDLossConfig
from .core import kl_loss
from .experiments import SPDTrainConfig
from .layer import SPDRuntime
from .metrics import alive_components, ci_l0, coactivation_clusters
from .model import check_targets, get_spd_model, set_spd_ablation, spd_layers, spd_runtime
from .objective import layer_importances, model_output, target_pass
from .trainer import SPDTrainer

logger = logging.getLogger(__name__)


@dataclass
class LMDataConfig:
    """Token windows for SPD on a language model (resolved by ``hf_sparse.data``)."""

    source: str = help_field("Named text set ('wikitext2', ...) or a path.", "wikitext2")
    count: int = help_field("Training windows.", 64)
    length: int = help_field("Tokens per window.", 64)
    eval_count: int = help_field("Held-out windows for the metrics.", 8)
    seed: int = help_field("Seed of the window draw.", 0)

    def __post_init__(self) -> None:
        check_positive_ints(self, ("count", "length", "eval_count"), "data")
        check_data_source(self.source)


@dataclass
class LMExperiment:
    """Decompose linears of a causal LM (the ``spd-smollm2`` recipe)."""

    model: str = "smollm2-135m"
    spd: dict[str, Any] = field(default_factory=lambda: {"C": 32, "target_modules": []})
    loss: SPDLossConfig = field(
        default_factory=lambda: SPDLossConfig(
            output_loss="kl", importance_minimality_coeff=1e-3, pnorm=2.0
        )
    )
    train: SPDTrainConfig = field(
        default_factory=lambda: SPDTrainConfig(steps=100, batch_size=4, lr=1e-3, logging_steps=10)
    )
    data: LMDataConfig = field(default_factory=LMDataConfig)
    cluster_min_similarity: float = 0.3
    name: str = "smollm2"
    # Dotted path or 're:' pattern of the decoder-block ModuleList; None = found from the
    # model's `_no_split_modules`.
    blocks: str | None = None

    def __post_init__(self) -> None:
        if self.loss.output_loss != "kl":
            raise ValueError(
                f"loss.output_loss must be 'kl' for a language model, got {self.loss.output_loss!r}"
            )


class _Windows(torch.utils.data.Dataset):
    def __init__(self, windows: torch.Tensor) -> None:
        self.windows = windows

    def __len__(self) -> int:
        return self.windows.shape[0]

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        ids = self.windows[index]
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def _inputs(windows: torch.Tensor) -> dict[str, torch.Tensor]:
    return {"input_ids": windows, "attention_mask": torch.ones_like(windows)}


@torch.no_grad()
def lm_metrics(
    model: nn.Module,
    windows: torch.Tensor,
    config: SPDLossConfig,
    min_similarity: float = 0.3,
    blocks: str | None = None,
) -> dict[str, Any]:
    """KL of the decomposed model to the target in several modes, and component activity."""
    threshold = config.ci_alive_threshold
    layers = spd_layers(model)
    inputs = _inputs(windows)
    target = target_pass(model, inputs, blocks=blocks)
    ci, _ = layer_importances(layers, target.layer_inputs)
    modes = {
        "ci_masked": {n: SPDRuntime("masked", mask=ci[n], use_delta=False) for n in layers},
        "ci_binary": {
            n: SPDRuntime("masked", mask=(ci[n] > threshold).float(), use_delta=False)
            for n in layers
        },
        "all_components": {n: SPDRuntime("masked", use_delta=False) for n in layers},
        "all_components_plus_delta": {n: SPDRuntime("masked") for n in layers},
        "no_components": {
            n: SPDRuntime("masked", mask=torch.zeros_like(ci[n]), use_delta=False) for n in layers
        },
    }
    results: dict[str, Any] = {"kl": {}, "layers": {}}
    for mode, runtimes in modes.items():
        with spd_runtime(model, runtimes), target.replay():
            logits = model_output(model, inputs)
        results["kl"][mode] = float(kl_loss(logits, target.output))
    activity = []
    names = []
    for name, values in ci.items():
        alive = alive_components(values, threshold)
        results["layers"][name] = {
            "C": int(alive.numel()),
            "n_alive": int(alive.sum()),
            "mean_active_per_token": ci_l0(values, threshold),
            "relative_weight_error": relative_weight_error(layers[name]),
        }
        activity.append(values.reshape(-1, values.shape[-1]) > threshold)
        names += [f"{name}:{c}" for c in range(values.shape[-1])]
    results["mean_active_per_token"] = sum(
        entry["mean_active_per_token"] for entry in results["layers"].values()
    )
    clusters = coactivation_clusters(torch.cat(activity, 1), min_similarity, names)
    results["clusters"] = [c for c in clusters if len(c) > 1][:20]
    results["n_clusters"] = len(clusters)
    return results


def relative_weight_error(layer: nn.Module) -> float:
    """``||W - U V||^2 / ||W||^2`` in fp64: how much of the weight the components miss (the
    delta component carries it)."""
    with torch.no_grad():
        U, V = layer.components()
        weight = layer.target_weight().double()
        return float((weight - U.double() @ V.double()).pow(2).sum() / weight.pow(2).sum())


def round_trip(
    model: nn.Module, base_factory, folder: Path, windows: torch.Tensor, ci_threshold: float
) -> dict[str, Any]:
    """Save the adapter, reload it on a fresh base, compare logits, then ablate by importance."""
    from peft import PeftModel

    inputs = _inputs(windows)
    model.save_pretrained(folder)
    reloaded = PeftModel.from_pretrained(base_factory(), folder).eval()
    with torch.no_grad():
        set_spd_ablation(model)
        original = model(**inputs).logits
        again = reloaded(**inputs).logits
        with reloaded.disable_adapter():
            target = reloaded(**inputs).logits
        set_spd_ablation(reloaded, ci_threshold=ci_threshold)
        ablated = reloaded(**inputs).logits
        set_spd_ablation(reloaded, include_delta=True)
        restored = reloaded(**inputs).logits
        set_spd_ablation(reloaded)
    return {
        "reload_max_abs_logit_diff": float((original - again).abs().max()),
        "kl_reloaded_all_components": float(kl_loss(again, target)),
        "kl_ablated_by_importance": float(kl_loss(ablated, target)),
        "ablation_ci_threshold": ci_threshold,
        "kl_all_components_plus_delta": float(kl_loss(restored, target)),
    }


def _adapter_bytes(model: nn.Module, config: SPDConfig) -> int:
    """Components ``U [d_out, C]``, ``V [C, d_in]`` and the gates of every target, in fp32."""
    modules = dict(model.named_modules())
    total = 0
    for name in check_targets(model, config):
        d_out, d_in = weight_matrix(modules[name]).shape
        total += config.C * (d_out + d_in) + config.C * (3 * config.gate_hidden + 1)
    return 4 * total


def _warn_below_rank(base: nn.Module, config: SPDConfig, targets: list[str]) -> list[str]:
    """Log the targets whose rank can exceed ``C``: their rank-one components span at most a
    rank-``C`` part of the weight, the delta holds the rest, and the output with every
    component but no delta cannot match the target however long SPD trains."""
    modules = dict(base.named_modules())
    max_rank = {n: min(weight_matrix(modules[n]).shape) for n in targets}
    short = [n for n in targets if max_rank[n] > config.C]
    if short:
        ranks = sorted({max_rank[n] for n in short})
        logger.warning(
            "C=%d is below the rank (up to %s) of %d of %d target matrices (%s...): their "
            "components cannot reproduce the weights, only the delta does; raise spd.C to %d "
            "for a decomposition that can be faithful",
            config.C, "/".join(map(str, ranks)), len(short), len(targets), short[0], ranks[-1],
        )  # fmt: skip
    return short


def run_lm_decomposition(
    experiment: LMExperiment,
    output_dir: str | os.PathLike | None = None,
    overwrite: bool = False,
    recipe: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Decompose the experiment's linears; returns (and saves, with ``recipe``) metrics and the
    round trip."""
    from ..data import calibration_windows, check_sequence_length, evaluation_windows
    from ..loading import base_model_id, load_model_and_tokenizer
    from ..outputs import results_record, write_outputs
    from .toy_run import training_arguments

    config = SPDConfig(**experiment.spd)
    if output_dir is not None:
        check_output_dir(output_dir, overwrite)
    start = time.perf_counter()
    base, tokenizer = load_model_and_tokenizer(experiment.model)
    base.eval().requires_grad_(False)
    data = experiment.data
    check_sequence_length(base, data.length, "data.length")
    targets = check_targets(base, config)  # target_modules that match nothing fail first
    _warn_below_rank(base, config, targets)
    if experiment.blocks is not None:
        find_decoder_blocks(base, experiment.blocks)  # a wrong path fails before the data
    if output_dir is not None:
        check_output_dir(output_dir, overwrite, _adapter_bytes(base, config), [experiment.model])
    windows = calibration_windows(tokenizer, data.source, data.count, data.length, data.seed)
    held_out = evaluation_windows(tokenizer, data.source, data.length, data.eval_count)
    load_s = time.perf_counter() - start
    torch.manual_seed(experiment.train.seed)
    model = get_spd_model(base, config)
    with tempfile.TemporaryDirectory(prefix="spd-trainer-") as scratch:
        args = training_arguments(
            experiment.train, scratch, per_device_train_batch_size=experiment.train.batch_size
        )
        trainer = SPDTrainer(
            model=model,
            args=args,
            train_dataset=_Windows(windows),
            spd_loss=experiment.loss,
            blocks=experiment.blocks,
        )
        start = time.perf_counter()
        trainer.train()
        spd_s = time.perf_counter() - start
    model.eval()
    metrics = lm_metrics(
        model, held_out, experiment.loss, experiment.cluster_min_similarity, experiment.blocks
    )
    results: dict[str, Any] = {
        "experiment": experiment.name,
        "model": experiment.model,
        "targets": list(spd_layers(model)),
        "timings": {"load_s": load_s, "spd_train_s": spd_s},
        "faithfulness_after_warmup": trainer.spd_warmup_loss,
        "metrics": metrics,
        "log_history": trainer.state.log_history,
        "torch_threads": torch.get_num_threads(),
    }

    def fresh_base() -> nn.Module:
        return load_model_and_tokenizer(experiment.model)[0].eval()

    threshold = experiment.loss.ci_alive_threshold
    if output_dir is None:
        with tempfile.TemporaryDirectory(prefix="spd-adapter-") as scratch:
            results["round_trip"] = round_trip(
                model, fresh_base, Path(scratch), held_out, threshold
            )
        return results
    with atomic_output_dir(output_dir, overwrite) as tmp:
        results["round_trip"] = round_trip(model, fresh_base, tmp / "adapter", held_out, threshold)
        extras = {k: v for k, v in results.items() if k not in ("metrics", "timings", "model")}
        record = results_record(
            "spd",
            config=dataclasses.asdict(experiment),
            metrics=results["metrics"],
            timings=results["timings"],
            base_model=base_model_id(experiment.model),
            **extras,
        )
        write_outputs(tmp, record, recipe)
    results["output_dir"] = str(Path(output_dir))
    return results
