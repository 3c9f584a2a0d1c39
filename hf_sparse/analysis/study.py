"""One call, one folder: a complete critical-weight study of a causal LM.

Lifecycle of ``run_study(model, tokenizer, config, output_dir)``:
  1. check the config and the output folder (refused if it exists, unless ``overwrite``);
  2. score the parameters with the metric on the scoring windows; take the top-k set (global,
     per layer or per head); break it down by component and depth; write the top weights;
  3. perturb the top-k set (each perturbation, strength, k and target) with random and
     bottom-k controls; zero the top-ranked single weights one at a time, with random controls;
  4. stability: scores across seeds, disjoint input subsets and checkpoints (Jaccard of the
     top-k sets, Spearman of the scores);
  5. cluster the per-tensor (or per-row) sensitivity profiles and perturb each cluster's top-k
     entries against same-size random sets of its weights; correlate the layers' profiles;
  6. downstream tasks before / after zeroing the top-k set (optional);
  7. write JSON files, plots and a self-contained ``report.html`` (figures drawn only from
     the JSON written in the same run) into a temporary folder renamed into place, with a
     ``manifest.json`` of sha256 sums.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import os
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..data import calibration_windows, evaluation_windows
from ..importance import compute_importance
from ..importance.selection import select_parameters
from ..io import atomic_output_dir, check_output_dir, write_json_atomic
from ..loading import base_model_id
from ..masks import ParameterMasks, top_k
from ..models import parameter_layouts
from ..outputs import results_record, write_outputs
from .breakdown import COMPONENTS, breakdown, component_of, layer_of
from .cluster_effects import cluster_perturbations
from .clustering import cluster_profiles, profiles, summarise_clusters
from .config import AnalysisConfig
from .controls import random_entries, resolve_count, top_k_entries
from .correlation import layer_correlation
from .effects import EffectProbe
from .perturb import perturbed
from .perturbation_study import Target, perturbation_study, restrict
from .stability import jaccard_matrix, spearman_matrix

logger = logging.getLogger(__name__)

TOP_WEIGHTS_ROWS = 100_000  # top_weights.csv is capped; the full set is in the masks' sizes
HISTOGRAM_BINS = 40


def parse_target(text: str) -> Target:
    """``all`` / a component / ``attention`` / ``mlp`` / ``layers:A-B``."""
    if text == "all":
        return Target()
    if text.startswith("layers:"):
        try:
            first, last = (int(v) for v in text.removeprefix("layers:").split("-"))
        except ValueError:
            raise ValueError(f"layer target must look like 'layers:0-5', got {text!r}") from None
        return Target(layers=(first, last))
    return Target(components=(text,))


def select_top(
    model: nn.Module, scores: dict[str, torch.Tensor], count: int, mode: str
) -> ParameterMasks:
    """The critical set: ``count`` entries globally, or the same share per layer / per head."""
    if mode == "global":
        return top_k_entries(scores, count)
    total = sum(s.numel() for s in scores.values())
    percent = 100.0 * count / total
    layouts = parameter_layouts(model)
    return top_k(scores, percent, "tensor" if mode == "layer" else "head", layouts)


def _histograms(scores: dict[str, torch.Tensor]) -> dict[str, Any]:
    logs = {n: s.double().clamp_min(1e-30).log10() for n, s in scores.items()}
    low = min(float(v.min()) for v in logs.values())
    high = max(float(v.max()) for v in logs.values())
    edges = torch.linspace(low, high + 1e-9, HISTOGRAM_BINS + 1, dtype=torch.float64)
    counts: dict[str, torch.Tensor] = {}
    for name, values in logs.items():
        component = component_of(name)
        hist = torch.histogram(values.reshape(-1), bins=edges).hist
        counts[component] = counts.get(component, 0) + hist
    return {"log10_edges": edges.tolist(), "counts": {c: h.tolist() for c, h in counts.items()}}


def _top_rows(scores: dict[str, torch.Tensor], top: ParameterMasks) -> list[list]:
    rows = []
    for name in top:
        mask = top[name]
        if not mask.any():
            continue
        positions = mask.reshape(-1).nonzero().squeeze(1)
        values = scores[name].reshape(-1)[positions]
        for position, value in zip(positions.tolist(), values.tolist(), strict=True):
            index = list(torch.unravel_index(torch.tensor(position), mask.shape))
            rows.append([name, [int(i) for i in index], value, component_of(name), layer_of(name)])
    rows.sort(key=lambda r: -r[2])
    return rows


def _single_weights(model, scores, probe, windows, config, dense) -> dict[str, Any]:
    """Zero the top-ranked weights one at a time, and random single weights as controls."""
    count = config.single_weight_candidates
    flat_top = _top_rows(scores, top_k_entries(scores, count))[:count]
    candidates = []
    for name, index, score, component, layer in flat_top:
        mask = torch.zeros(scores[name].shape, dtype=torch.bool)
        mask[tuple(index)] = True
        with perturbed(model, {name: mask}, "zero"):
            effect = probe.measure()
        candidates.append(
            {
                "parameter": name,
                "index": index,
                "score": score,
                "component": component,
                "layer": layer,
                "perplexity": effect.perplexity,
                "ratio_to_dense": effect.perplexity / dense,
                "kl": effect.kl,
            }
        )
    shapes = {n: s.shape for n, s in scores.items()}
    controls = []
    for seed in range(config.control_seeds):
        with perturbed(model, random_entries(shapes, 1, config.seed + 1000 + seed), "zero"):
            controls.append(probe.measure().to_dict())
    worst = max(candidates, key=lambda c: c["perplexity"]) if candidates else None
    return {"candidates": candidates, "random_controls": controls, "worst": worst}


def _score(model, windows, config: AnalysisConfig, seed: int, show_progress: bool):
    options = {"seed": seed} if config.metric == "hutchinson" else {}
    return compute_importance(
        model, windows, config.metric, config.params, show_progress, config.blocks, **options
    )


def _stability(model, tokenizer, config, windows, scores, count, show_progress) -> dict[str, Any]:
    """``windows`` and ``scores``: the study's own scoring windows (seed ``config.seed``) and
    their scores, reused wherever that seed is asked for."""
    out: dict[str, Any] = {"metric": config.metric, "top_k": count}

    def compare(score_sets: list[dict], labels: list[str]) -> dict[str, Any]:
        masks = [select_top(model, s, count, config.mode) for s in score_sets]
        return {
            "labels": labels,
            "jaccard": jaccard_matrix(masks).tolist(),
            "spearman": spearman_matrix(score_sets).tolist(),
        }

    if len(config.stability_seeds) > 1:
        sets = []
        for seed in config.stability_seeds:
            if seed == config.seed:
                sets.append(scores)
                continue
            drawn = calibration_windows(
                tokenizer, config.dataset, config.num_samples, config.sequence_length, seed
            )
            sets.append(_score(model, drawn, config, seed, show_progress))
        out["seeds"] = compare(sets, [f"seed {s}" for s in config.stability_seeds])
    if config.stability_subsets > 1:
        parts = windows.tensor_split(config.stability_subsets)
        sets = [_score(model, p, config, config.seed, show_progress) for p in parts]
        out["subsets"] = compare(sets, [f"subset {i}" for i in range(len(parts))])
    if config.checkpoints:
        from transformers import AutoModelForCausalLM

        sets = []
        for folder in config.checkpoints:
            checkpoint = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
            sets.append(_score(checkpoint, windows, config, config.seed, show_progress))
            del checkpoint
        out["checkpoints"] = compare(sets, [Path(c).name for c in config.checkpoints])
    return out


def _clusters(scores, top, config) -> dict[str, Any]:
    labels, features = profiles(scores, top, config.cluster_level)
    n_clusters = min(config.n_clusters, len(labels))
    ids = cluster_profiles(features, config.cluster_method, n_clusters, seed=config.seed)
    centred = features - features.mean(0)
    scaled = centred / centred.std(0).clamp_min(1e-12)
    _, _, v = torch.linalg.svd(scaled, full_matrices=False)
    coordinates = (scaled @ v[:2].t()).tolist()
    return {
        "method": config.cluster_method,
        "level": config.cluster_level,
        "summary": summarise_clusters(labels, features, ids),
        "points": [
            {"label": label, "cluster": int(c), "x": xy[0], "y": xy[1]}
            for label, c, xy in zip(labels, ids.tolist(), coordinates, strict=True)
        ],
    }


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def run_study(
    model: nn.Module,
    tokenizer,
    config: AnalysisConfig,
    output_dir: str | os.PathLike,
    overwrite: bool = False,
    show_progress: bool = True,
    model_name: str | None = None,
) -> dict[str, Any]:
    """Run the study and write its folder; returns the in-memory results (the JSON contents).

    Besides the study's own files the folder holds ``hf_sparse_results.json`` (the shared
    output schema: headline figures) and ``recipe.yaml`` (an analysis recipe that reruns it).
    """
    check_output_dir(output_dir, overwrite)
    start = time.perf_counter()
    selected = select_parameters(model, config.params, config.blocks)
    total = sum(p.numel() for p in selected.values())
    count = resolve_count(config.top_k, total, "top_k")
    for k in config.progressive_k:
        resolve_count(k, total, "progressive_k")
    targets = [parse_target(t) for t in config.targets]
    for target in targets:  # components that this architecture lacks fail here
        restrict({n: p for n, p in selected.items()}, target)
    windows = calibration_windows(
        tokenizer, config.dataset, config.num_samples, config.sequence_length, config.seed
    )
    eval_windows = evaluation_windows(
        tokenizer, config.eval_dataset, config.eval_length, config.eval_windows
    )
    scores = _score(model, windows, config, config.seed, show_progress)
    top = select_top(model, scores, count, config.mode)
    stats = {
        "metric": config.metric,
        "mode": config.mode,
        "scored_entries": total,
        "top_k": count,
        "breakdown": breakdown(scores, top),
        "histograms": _histograms(scores),
    }
    probe = EffectProbe(model, eval_windows)
    dense = probe.baseline.perplexity
    perturbations = [(p.kind, s) for p in config.perturbations for s in p.strengths]
    ks = list(config.progressive_k) or [count]
    points = perturbation_study(
        model, scores, eval_windows, ks, perturbations, targets, config.control_seeds, probe,
        show_progress,
    )  # fmt: skip
    results: dict[str, Any] = {
        "dense": probe.baseline.to_dict(),
        "points": [p.to_dict() for p in points],
    }
    if config.single_weight_candidates:
        results["single_weights"] = _single_weights(
            model, scores, probe, eval_windows, config, dense
        )
    if config.downstream_tasks:
        from .downstream import downstream_eval

        tasks = tuple(config.downstream_tasks)
        before = downstream_eval(model, tokenizer, tasks, config.downstream_limit)
        with perturbed(model, top, "zero"):
            after = downstream_eval(model, tokenizer, tasks, config.downstream_limit)
        results["downstream"] = {"top_k": count, "before": before, "after_zeroing_top_k": after}
    stability = _stability(model, tokenizer, config, windows, scores, count, show_progress)
    stats["clusters"] = _clusters(scores, top, config)
    try:  # a study of one layer (or no component shared by all layers) has nothing to correlate
        stats["layer_correlation"] = layer_correlation(scores)
    except ValueError as error:
        stats["layer_correlation"] = {"skipped": str(error)}
        logger.info("layer correlation skipped: %s", error)
    if config.cluster_perturbation:
        points_ = stats["clusters"]["points"]
        kind, strength = perturbations[0]
        results["cluster_perturbations"] = cluster_perturbations(
            model, top, {n: s.shape for n, s in scores.items()}, [p["label"] for p in points_],
            [p["cluster"] for p in points_], probe, kind, strength, config.control_seeds,
            config.seed,
        )  # fmt: skip
    rows = _top_rows(scores, top)
    settings = {
        "model": model_name or getattr(model, "name_or_path", None),
        **asdict(config),
        "seconds": round(time.perf_counter() - start, 1),
    }
    from .report import write_plots, write_report

    with atomic_output_dir(output_dir, overwrite) as tmp:
        write_outputs(tmp, _results_record(settings, results), _recipe(settings, config))
        write_json_atomic(settings, tmp / "config.json")
        write_json_atomic(stats, tmp / "sensitivity_stats.json")
        write_json_atomic(results, tmp / "perturbation_results.json")
        write_json_atomic(stability, tmp / "stability.json")
        buffer = io.StringIO()
        writer = csv.writer(buffer)
        writer.writerow(["parameter", "index", "score", "component", "layer"])
        for name, index, score, component, layer in rows[:TOP_WEIGHTS_ROWS]:
            writer.writerow([name, json.dumps(index), f"{score:.6e}", component, layer])
        (tmp / "top_weights.csv").write_text(buffer.getvalue())
        plots = write_plots(tmp / "plots", stats, results, stability)
        write_report(tmp / "report.html", settings, stats, results, stability, plots)
        manifest = {
            str(p.relative_to(tmp)): _sha256(p) for p in sorted(tmp.rglob("*")) if p.is_file()
        }
        write_json_atomic({"files": manifest}, tmp / "manifest.json")
    logger.info("critical-weight study written to %s", output_dir)
    return {"settings": settings, "stats": stats, "results": results, "stability": stability}


def _results_record(settings: dict[str, Any], results: dict[str, Any]) -> dict[str, Any]:
    """The shared results file of a study: dense perplexity and the headline perturbations."""
    metrics: dict[str, Any] = {"dense": results["dense"]}
    worst = (results.get("single_weights") or {}).get("worst")
    if worst:
        metrics["worst_single_weight"] = worst
    metrics["points"] = [
        {
            k: p[k]
            for k in ("kind", "strength", "k", "target", "top", "random_mean", "bottom", "all_k")
        }
        for p in results["points"]
    ]
    config = {k: v for k, v in settings.items() if k not in ("model", "seconds")}
    return results_record(
        "analysis",
        config=config,
        metrics=metrics,
        timings={"study_seconds": settings["seconds"]},
        base_model=base_model_id(settings["model"]),
    )


def _recipe(settings: dict[str, Any], config: AnalysisConfig) -> dict[str, Any]:
    return {"model": settings["model"], "analysis": asdict(config)}


__all__ = ["COMPONENTS", "parse_target", "run_study", "select_top"]
