"""Plots (matplotlib, PNG) and a self-contained HTML report of a critical-weight study.

Every figure is drawn from the dictionaries that are written as the study's JSON files, so
what a figure shows is what the JSON holds.
"""

from __future__ import annotations

import base64
import html
from collections import defaultdict
from pathlib import Path


def _pyplot():
    try:
        import matplotlib
    except ImportError as error:
        raise ImportError("plots need matplotlib: pip install 'hf-sparse[analysis]'") from error
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, folder: Path, name: str) -> str:
    folder.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(folder / name, dpi=110)
    return name


def _histograms(plt, folder, stats) -> tuple[str, str, str]:
    hist = stats["histograms"]
    edges = hist["log10_edges"]
    centres = [(a + b) / 2 for a, b in zip(edges[:-1], edges[1:], strict=True)]
    fig, ax = plt.subplots(figsize=(7, 4))
    for component, counts in hist["counts"].items():
        ax.plot(centres, counts, label=component)
    ax.set_yscale("log")
    ax.set_xlabel(f"log10 {stats['metric']} score")
    ax.set_ylabel("entries")
    ax.legend(fontsize=7, ncol=2)
    name = _save(fig, folder, "score_histograms.png")
    plt.close(fig)
    return name, "Score distribution per component", "Entries per log10-score bin."


def _components(plt, folder, stats) -> tuple[str, str, str]:
    table = stats["breakdown"]["component"]
    names = list(table)
    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.5))
    left.bar(names, [table[n]["share_of_top"] for n in names])
    left.set_title("share of the top-k set")
    right.bar(names, [table[n]["mean_score"] for n in names])
    right.set_yscale("log")
    right.set_title("mean score")
    for ax in (left, right):
        ax.tick_params(axis="x", rotation=45)
    name = _save(fig, folder, "components.png")
    plt.close(fig)
    return name, "Per component (q vs k vs v, MLP, ...)", "Share of the top-k set and mean score."


def _depth(plt, folder, stats) -> tuple[str, str, str] | None:
    table = stats["breakdown"]["layer"]
    if not table:
        return None
    layers = sorted(table, key=int)
    fig, ax = plt.subplots(figsize=(7, 3.5))
    ax.plot([int(x) for x in layers], [table[x]["share_of_top"] for x in layers], marker="o")
    ax.set_xlabel("block")
    ax.set_ylabel("share of the top-k set")
    twin = ax.twinx()
    twin.plot([int(x) for x in layers], [table[x]["mean_score"] for x in layers], color="gray")
    twin.set_ylabel("mean score (gray)")
    name = _save(fig, folder, "depth_profile.png")
    plt.close(fig)
    return name, "Depth profile", "Share of the top-k set per block, and mean score (gray)."


def _perturbations(plt, folder, results) -> list[tuple[str, str, str]]:
    curves: dict[tuple, list[dict]] = defaultdict(list)
    for point in results["points"]:
        curves[(point["kind"], point["strength"], point["target"])].append(point)
    out = []
    for index, ((kind, strength, target), points) in enumerate(sorted(curves.items())):
        points.sort(key=lambda p: p["k"])
        ks = [p["k"] for p in points]
        fig, ax = plt.subplots(figsize=(6, 3.8))
        top = [p["top"]["perplexity"] for p in points]
        mean = [p["random_mean"]["perplexity"] for p in points]
        std = [p["random_std"]["perplexity"] for p in points]
        bottom = [p["bottom"]["perplexity"] for p in points]
        marker = "o" if len(ks) > 1 else "s"
        ax.plot(ks, top, marker=marker, label="top-k", color="tab:red")
        ax.plot(ks, mean, marker=marker, label="random (mean)", color="tab:blue")
        ax.fill_between(
            ks, [m - s for m, s in zip(mean, std, strict=True)],
            [m + s for m, s in zip(mean, std, strict=True)], color="tab:blue", alpha=0.2,
        )  # fmt: skip
        ax.plot(ks, bottom, marker=marker, label="bottom-k", color="tab:green")
        if points[0].get("all_k"):
            ax.axhline(
                points[0]["all_k"]["perplexity"], color="tab:purple", linestyle="--",
                label=f"all {points[0]['all_count']:,} perturbed",
            )  # fmt: skip
        ax.axhline(results["dense"]["perplexity"], color="black", linestyle=":", label="dense")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("k (weights perturbed)")
        ax.set_ylabel("perplexity")
        ax.set_title(f"{kind} x{strength:g} on {target}")
        ax.legend(fontsize=7)
        name = _save(fig, folder, f"perturbation_{index}.png")
        plt.close(fig)
        out.append(
            (name, f"{kind} (strength {strength:g}), target {target}",
             "Top-k vs random controls (band: one std over seeds) vs bottom-k."),
        )  # fmt: skip
    return out


def _stability(plt, folder, stability) -> list[tuple[str, str, str]]:
    out = []
    for group in ("seeds", "subsets", "checkpoints"):
        if group not in stability:
            continue
        data = stability[group]
        fig, axes = plt.subplots(1, 2, figsize=(8, 3.6))
        for ax, key in zip(axes, ("jaccard", "spearman"), strict=True):
            matrix = data[key]
            image = ax.imshow(matrix, vmin=0 if key == "jaccard" else -1, vmax=1, cmap="viridis")
            ax.set_xticks(range(len(data["labels"])), data["labels"], rotation=45, fontsize=7)
            ax.set_yticks(range(len(data["labels"])), data["labels"], fontsize=7)
            for i, row in enumerate(matrix):
                for j, value in enumerate(row):
                    ax.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=7, color="w")
            ax.set_title(key)
            fig.colorbar(image, ax=ax, fraction=0.046)
        name = _save(fig, folder, f"stability_{group}.png")
        plt.close(fig)
        out.append(
            (name, f"Stability across {group}", "Jaccard of top-k sets; Spearman of scores.")
        )
    return out


def _clusters(plt, folder, stats) -> tuple[str, str, str]:
    points = stats["clusters"]["points"]
    fig, ax = plt.subplots(figsize=(6, 4))
    for cluster in sorted({p["cluster"] for p in points}):
        chosen = [p for p in points if p["cluster"] == cluster]
        ax.scatter([p["x"] for p in chosen], [p["y"] for p in chosen], s=12, label=f"{cluster}")
    ax.set_xlabel("PC 1 of the profiles")
    ax.set_ylabel("PC 2")
    ax.legend(title="cluster", fontsize=7)
    name = _save(fig, folder, "clusters.png")
    plt.close(fig)
    return (
        name,
        "Clusters of sensitivity profiles",
        f"{stats['clusters']['method']} on standardised profiles.",
    )


def _correlation(plt, folder, stats) -> tuple[str, str, str] | None:
    correlation = stats.get("layer_correlation")
    if not correlation or "pearson" not in correlation:
        return None
    layers = correlation["layers"]
    fig, ax = plt.subplots(figsize=(5.5, 4.6))
    image = ax.imshow(correlation["pearson"], vmin=-1, vmax=1, cmap="coolwarm")
    ax.set_xticks(range(len(layers)), layers, fontsize=6)
    ax.set_yticks(range(len(layers)), layers, fontsize=6)
    ax.set_xlabel("layer")
    ax.set_ylabel("layer")
    fig.colorbar(image, ax=ax, label="Pearson r")
    name = _save(fig, folder, "layer_correlation.png")
    plt.close(fig)
    return (
        name,
        "Correlation between layers' sensitivity profiles",
        "Pearson r of per-component log10-score quantiles (components scored in every layer).",
    )


def _cluster_effects(plt, folder, results) -> tuple[str, str, str] | None:
    rows = [r for r in results.get("cluster_perturbations", []) if "top" in r]
    if not rows:
        return None
    fig, ax = plt.subplots(figsize=(6, 3.5))
    x = range(len(rows))
    ax.bar([i - 0.2 for i in x], [r["top"]["perplexity"] for r in rows], width=0.4,
           label="cluster's top-k", color="tab:red")  # fmt: skip
    ax.bar(
        [i + 0.2 for i in x], [r["random_mean"]["perplexity"] for r in rows], width=0.4,
        yerr=[r["random_std"]["perplexity"] for r in rows], label="same-size random (cluster)",
        color="tab:blue",
    )  # fmt: skip
    ax.axhline(results["dense"]["perplexity"], color="black", linestyle=":", label="dense")
    ax.set_xticks(list(x), [f"{r['cluster']} (k={r['k']})" for r in rows], fontsize=7)
    ax.set_yscale("log")
    ax.set_ylabel("perplexity")
    ax.legend(fontsize=7)
    name = _save(fig, folder, "cluster_perturbations.png")
    plt.close(fig)
    return name, "Clustered perturbation", "Each cluster's top-k entries vs its other weights."


def _single(plt, folder, results) -> tuple[str, str, str] | None:
    single = results.get("single_weights")
    if not single or not single["candidates"]:
        return None
    candidates = single["candidates"]
    fig, ax = plt.subplots(figsize=(7, 3.6))
    labels = [
        f"{c['component']}{c['layer'] if c['layer'] is not None else ''}{c['index']}"
        for c in candidates
    ]
    ax.bar(range(len(candidates)), [c["ratio_to_dense"] for c in candidates], color="tab:red")
    controls = [c["perplexity"] / results["dense"]["perplexity"] for c in single["random_controls"]]
    ax.axhline(max(controls), color="tab:blue", linestyle="--", label="random single weights (max)")
    ax.set_xticks(range(len(candidates)), labels, rotation=60, fontsize=6)
    ax.set_yscale("log")
    ax.set_ylabel("perplexity / dense")
    ax.legend(fontsize=7)
    name = _save(fig, folder, "single_weights.png")
    plt.close(fig)
    return name, "Zeroing one weight at a time", "Top-ranked candidates vs random single weights."


def _downstream(plt, folder, results) -> tuple[str, str, str] | None:
    down = results.get("downstream")
    if not down:
        return None
    labels, before, after = [], [], []
    for task, metrics in down["before"].items():
        for metric in ("acc", "acc_norm"):
            if metric in metrics:
                labels.append(f"{task} {metric}")
                before.append(metrics[metric])
                after.append(down["after_zeroing_top_k"][task][metric])
    fig, ax = plt.subplots(figsize=(6, 3.5))
    x = range(len(labels))
    ax.bar([i - 0.2 for i in x], before, width=0.4, label="before")
    ax.bar([i + 0.2 for i in x], after, width=0.4, label="top-k zeroed")
    ax.set_xticks(list(x), labels)
    ax.legend()
    name = _save(fig, folder, "downstream.png")
    plt.close(fig)
    return name, "Downstream tasks", f"lm-eval on local files; top-{down['top_k']} zeroed."


def write_plots(folder: Path, stats, results, stability) -> list[tuple[str, str, str]]:
    """PNG files under ``folder``; returns ``(file, title, caption)`` per figure."""
    plt = _pyplot()
    figures = [_histograms(plt, folder, stats), _components(plt, folder, stats)]
    figures += [f for f in (_depth(plt, folder, stats),) if f]
    figures += _perturbations(plt, folder, results)
    figures += [f for f in (_single(plt, folder, results),) if f]
    figures += _stability(plt, folder, stability)
    figures.append(_clusters(plt, folder, stats))
    figures += [f for f in (_correlation(plt, folder, stats),) if f]
    figures += [f for f in (_cluster_effects(plt, folder, results),) if f]
    figures += [f for f in (_downstream(plt, folder, results),) if f]
    return figures


def _key_numbers(settings, stats, results, stability) -> list[tuple[str, str]]:
    rows = [
        ("model", str(settings.get("model"))),
        ("metric / mode", f"{stats['metric']} / {stats['mode']}"),
        ("top-k", f"{stats['top_k']:,} of {stats['scored_entries']:,} entries"),
        ("dense perplexity", f"{results['dense']['perplexity']:.3f}"),
    ]
    for point in results["points"]:
        top, bottom = point["top"]["perplexity"], point["bottom"]["perplexity"]
        mean, std = point["random_mean"]["perplexity"], point["random_std"]["perplexity"]
        rows.append(
            (
                f"{point['kind']} x{point['strength']:g}, k={point['k']:,}, {point['target']}",
                f"top {top:.3f} | random {mean:.3f} ± {std:.3f} | bottom {bottom:.3f}"
                + (f" | all {point['all_k']['perplexity']:.3f}" if point.get("all_k") else ""),
            )
        )
    for row in results.get("cluster_perturbations", []):
        if "top" in row:
            rows.append(
                (
                    f"cluster {row['cluster']}: {row['kind']} its top-k ({row['k']:,})",
                    f"{row['top']['perplexity']:.3f} | same-size random in the cluster "
                    f"{row['random_mean']['perplexity']:.3f} "
                    f"± {row['random_std']['perplexity']:.3f}",
                )
            )
    correlation = stats.get("layer_correlation")
    if correlation and "pearson" in correlation:
        matrix = correlation["pearson"]
        off = [matrix[i][j] for i in range(len(matrix)) for j in range(len(matrix)) if i != j]
        rows.append(("mean correlation between layers' profiles", f"{sum(off) / len(off):.3f}"))
    worst = (results.get("single_weights") or {}).get("worst")
    if worst:
        rows.append(
            (
                "most damaging single weight",
                f"{worst['parameter']}{worst['index']}: perplexity {worst['perplexity']:.3f} "
                f"({worst['ratio_to_dense']:.2f}x dense)",
            )
        )
    for group in ("seeds", "subsets", "checkpoints"):
        if group in stability:
            jaccard = stability[group]["jaccard"]
            off = [
                jaccard[i][j] for i in range(len(jaccard)) for j in range(len(jaccard)) if i != j
            ]
            rows.append((f"mean Jaccard across {group}", f"{sum(off) / len(off):.3f}"))
    return rows


def write_report(path: Path, settings, stats, results, stability, figures) -> None:
    """A single HTML file: key numbers, then every figure inline (base64 PNG)."""
    rows = "".join(
        f"<tr><th>{html.escape(k)}</th><td>{html.escape(v)}</td></tr>"
        for k, v in _key_numbers(settings, stats, results, stability)
    )
    sections = []
    for file, title, caption in figures:
        data = base64.b64encode((path.parent / "plots" / file).read_bytes()).decode()
        sections.append(
            f"<section><h2>{html.escape(title)}</h2><img alt='{html.escape(title)}' "
            f"src='data:image/png;base64,{data}'><p>{html.escape(caption)} "
            f"<code>plots/{html.escape(file)}</code></p></section>"
        )
    clusters = "".join(
        f"<tr><td>{c['cluster']}</td><td>{c['size']}</td><td>{html.escape(str(c['components']))}"
        f"</td><td>{html.escape(str(c['layers']))}</td></tr>"
        for c in stats["clusters"]["summary"]
    )
    path.write_text(
        "<!doctype html><html><head><meta charset='utf-8'><title>Critical-weight study</title>"
        "<style>body{font-family:sans-serif;max-width:1000px;margin:auto;padding:1em}"
        "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:4px 8px;"
        "text-align:left;font-size:13px}img{max-width:100%}</style></head><body>"
        f"<h1>Critical-weight study: {html.escape(str(settings.get('model')))}</h1>"
        f"<h2>Key numbers</h2><table>{rows}</table>"
        f"<h2>Clusters</h2><table><tr><th>cluster</th><th>size</th><th>components</th>"
        f"<th>layers</th></tr>{clusters}</table>{''.join(sections)}"
        "<p>Files: config.json, sensitivity_stats.json, top_weights.csv, "
        "perturbation_results.json, stability.json, manifest.json.</p></body></html>"
    )


def _decoded(png: bytes):
    import io

    import matplotlib.image

    return matplotlib.image.imread(io.BytesIO(png), format="png")


def verify_study(folder: str | Path) -> list[str]:
    """Check a study folder against itself; returns the problems found (empty = consistent).

    - every file in ``manifest.json`` has the recorded sha256;
    - every figure, drawn again from the JSON files on disk, has the same pixels as its PNG
      under ``plots/`` and as the image embedded in ``report.html`` (in the same order);
    - every key number, formatted again from the JSON files, appears in ``report.html``.
    """
    import hashlib
    import json
    import re
    import tempfile

    import numpy as np

    folder = Path(folder)
    needed = ["manifest.json", "config.json", "sensitivity_stats.json", "stability.json",
              "perturbation_results.json", "report.html"]  # fmt: skip
    missing = [name for name in needed if not (folder / name).is_file()]
    if missing:
        raise FileNotFoundError(
            f"{folder} is not a complete critical-weight study folder: missing {missing}; "
            "point at the output_dir of `hf-sparse analyze` (or run_study)"
        )
    problems: list[str] = []
    manifest = json.loads((folder / "manifest.json").read_text())["files"]
    for name, digest in manifest.items():
        path = folder / name
        if not path.is_file():
            problems.append(f"{name}: listed in the manifest but missing")
        elif hashlib.sha256(path.read_bytes()).hexdigest() != digest:
            problems.append(f"{name}: sha256 differs from the manifest")
    load = lambda name: json.loads((folder / name).read_text())  # noqa: E731
    settings, stats = load("config.json"), load("sensitivity_stats.json")
    results, stability = load("perturbation_results.json"), load("stability.json")
    report = (folder / "report.html").read_text()
    embedded = re.findall(r"data:image/png;base64,([A-Za-z0-9+/=]+)", report)
    with tempfile.TemporaryDirectory() as tmp:
        figures = write_plots(Path(tmp), stats, results, stability)
        if len(figures) != len(embedded):
            problems.append(f"report embeds {len(embedded)} figures, the JSON gives {len(figures)}")
        for position, (file, title, _) in enumerate(figures):
            redrawn = _decoded((Path(tmp) / file).read_bytes())
            on_disk = folder / "plots" / file
            if not on_disk.is_file():
                problems.append(f"plots/{file} ({title}): missing")
            elif not np.array_equal(redrawn, _decoded(on_disk.read_bytes())):
                problems.append(f"plots/{file} ({title}): differs from the JSON's figure")
            if position < len(embedded) and not np.array_equal(
                redrawn, _decoded(base64.b64decode(embedded[position]))
            ):
                problems.append(f"report figure {position} ({title}): differs from the JSON's")
    for key, value in _key_numbers(settings, stats, results, stability):
        if html.escape(value) not in report:
            problems.append(f"report key number {key!r} = {value!r} not found")
    return problems
