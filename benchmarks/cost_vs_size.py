#!/usr/bin/env python3
"""Cost vs size (issue 16 item 7): time and peak memory of SparseGPT and Wanda as a Llama
model grows, in hidden size (at a fixed depth) and in depth (at SmolLM2's width 576).

    .venv/bin/python benchmarks/cost_vs_size.py            # ~20 min on a 2-core machine at load 10
    .venv/bin/python benchmarks/cost_vs_size.py --quick    # two sizes per axis, a smoke run

Every model is a random ``LlamaConfig`` of SmolLM2-135M's shape family (head_dim 64, 3 KV
groups where the head count allows, MLP 8/3 x hidden, vocabulary 49152, tied embeddings,
fp32); the largest point of the depth sweep, hidden 576 x 30 layers, is SmolLM2-135M's exact
shape (random weights, not the GGUF-dequantized checkpoint). Calibration: random token
windows (cost does not depend on the token values), 50% unstructured.

Time is the CPU time of ``prune_``: one thread per child, so it counts the work done and is
far less sensitive than wall time to other jobs on a shared machine (wall time is recorded and
plotted too). Each (size, method) run is its own child process, so peak RSS belongs to that
run alone. Sizes run in shuffled order (``--repeats`` passes, median), SparseGPT and Wanda
interleaved, so load on the shared machine drifts over both alike. Memory: the peak RSS during
``prune_`` above the RSS just before it (``VmHWM`` reset through ``/proc/self/clear_refs``),
and the whole-process peak. The log-log slopes of time and of the extra memory against hidden
size and against depth are fitted by least squares and printed; JSON goes to
``benchmarks/out/cost_vs_size.json`` and the plot to ``benchmarks/figures/cost_vs_size.png``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
OUT = HERE / "out" / "cost_vs_size.json"
FIGURE = HERE / "figures" / "cost_vs_size.png"
METHODS = ("sparsegpt", "wanda")
WIDTHS = (64, 128, 192, 320, 448, 576)  # at DEPTH_FOR_WIDTHS layers
DEPTHS = (1, 2, 4, 8, 15, 30)  # at hidden 576
DEPTH_FOR_WIDTHS = 4
SMOLLM2_WIDTH = 576


def llama_shape(hidden: int, layers: int) -> dict:
    """SmolLM2's proportions at another size: head_dim 64, KV heads = heads / 3 when it
    divides (SmolLM2: 9 heads, 3 KV heads), MLP 8/3 x hidden rounded to a multiple of 8."""
    heads = hidden // 64
    if heads * 64 != hidden:
        raise ValueError(f"hidden size must be a multiple of 64 (head_dim 64), got {hidden}")
    return dict(
        hidden_size=hidden,
        intermediate_size=8 * round(hidden * 8 / 3 / 8),
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads // 3 if heads % 3 == 0 else heads,
        head_dim=64,
        vocab_size=49152,
        tie_word_embeddings=True,
        max_position_embeddings=2048,
    )


# The child: one (size, method) run.


def _rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field} line; this benchmark needs Linux")


def _reset_peak_rss() -> None:
    # "5" resets VmHWM to the current RSS (Linux >= 4.0); without it the peak would include
    # the model build, so refuse rather than report it.
    Path("/proc/self/clear_refs").write_text("5")
    if _rss_kib("VmHWM") > _rss_kib("VmRSS") + 1024:
        raise RuntimeError("could not reset the peak RSS (VmHWM) through /proc/self/clear_refs")


def child(spec: dict) -> dict:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from hf_sparse.pruning import SparseGPTConfig, WandaConfig, prune_

    torch.set_num_threads(spec["threads"])
    torch.manual_seed(0)
    config = LlamaConfig(**llama_shape(spec["hidden"], spec["layers"]))
    model = LlamaForCausalLM(config).eval()
    generator = torch.Generator().manual_seed(1)
    windows = torch.randint(
        0, config.vocab_size, (spec["windows"], spec["length"]), generator=generator
    )
    method = {"sparsegpt": SparseGPTConfig, "wanda": WandaConfig}[spec["method"]](sparsity=0.5)
    before = _rss_kib("VmRSS")
    _reset_peak_rss()
    start, cpu_start = time.perf_counter(), time.process_time()
    result = prune_(model, method, windows, batch_size=spec["batch_size"], show_progress=False)
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    peak = _rss_kib("VmHWM")
    import resource

    return {
        **spec,
        "parameters": sum(p.numel() for p in model.parameters()),
        "seconds": seconds,
        "cpu_seconds": cpu_seconds,
        "rss_before_mib": before / 1024,
        "peak_extra_mib": (peak - before) / 1024,
        "process_peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "measured_sparsity": result.measured_sparsity,
    }


# The parent: schedule, fit, plot.


def run_child(spec: dict) -> dict:
    command = [sys.executable, __file__, "--child", json.dumps(spec)]
    env = {**os.environ, "OMP_NUM_THREADS": str(spec["threads"])}
    done = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"child {spec} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def medians(runs: list[dict]) -> list[dict]:
    """One row per (hidden, layers, method): the median time and the largest memory."""
    groups: dict[tuple, list[dict]] = {}
    for run in runs:
        groups.setdefault((run["hidden"], run["layers"], run["method"]), []).append(run)
    rows = []
    for (hidden, layers, method), group in sorted(groups.items()):
        rows.append({
            "hidden": hidden, "layers": layers, "method": method, "repeats": len(group),
            "parameters": group[0]["parameters"],
            "seconds": statistics.median(r["seconds"] for r in group),
            "seconds_all": [r["seconds"] for r in group],
            "cpu_seconds": statistics.median(r["cpu_seconds"] for r in group),
            "peak_extra_mib": max(r["peak_extra_mib"] for r in group),
            "process_peak_mib": max(r["process_peak_mib"] for r in group),
        })  # fmt: skip
    return rows


def slope(xs: list[float], ys: list[float]) -> float:
    """Least-squares slope of log(y) on log(x)."""
    lx, ly = [math.log(x) for x in xs], [math.log(y) for y in ys]
    mx, my = sum(lx) / len(lx), sum(ly) / len(ly)
    return sum((a - mx) * (b - my) for a, b in zip(lx, ly, strict=True)) / sum(
        (a - mx) ** 2 for a in lx
    )


def fits(runs: list[dict], widths, depths) -> dict:
    out: dict = {}
    for method in METHODS:
        mine = [r for r in runs if r["method"] == method]
        w = sorted(
            (r for r in mine if r["layers"] == DEPTH_FOR_WIDTHS and r["hidden"] in widths),
            key=lambda r: r["hidden"],
        )
        d = sorted(
            (r for r in mine if r["hidden"] == SMOLLM2_WIDTH and r["layers"] in depths),
            key=lambda r: r["layers"],
        )
        top = w[-3:]  # the largest widths, where fixed per-call overheads matter least
        hidden, layers = [r["hidden"] for r in w], [r["layers"] for r in d]
        out[method] = {
            "cpu_time_vs_hidden": slope(hidden, [r["cpu_seconds"] for r in w]),
            "cpu_time_vs_hidden_largest3": slope(
                [r["hidden"] for r in top], [r["cpu_seconds"] for r in top]
            ),
            "cpu_time_vs_depth": slope(layers, [r["cpu_seconds"] for r in d]),
            "wall_time_vs_hidden": slope(hidden, [r["seconds"] for r in w]),
            "wall_time_vs_depth": slope(layers, [r["seconds"] for r in d]),
            "extra_memory_vs_hidden": slope(hidden, [max(r["peak_extra_mib"], 0.1) for r in w]),
            "extra_memory_vs_depth": slope(layers, [max(r["peak_extra_mib"], 0.1) for r in d]),
        }
    return out


def plot(runs: list[dict], fitted: dict, path: Path, note: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(11, 8))
    for method, marker, color in zip(METHODS, "os", ("tab:blue", "tab:orange"), strict=True):
        mine = [r for r in runs if r["method"] == method]
        w = sorted((r for r in mine if r["layers"] == DEPTH_FOR_WIDTHS), key=lambda r: r["hidden"])
        d = sorted((r for r in mine if r["hidden"] == SMOLLM2_WIDTH), key=lambda r: r["layers"])
        f = fitted[method]
        for row, key, label in ((0, "cpu_seconds", "prune_ CPU time (s)"),
                                (1, "peak_extra_mib", "peak RSS above start (MiB)")):  # fmt: skip
            axes[row][0].loglog([r["hidden"] for r in w], [max(r[key], 0.1) for r in w],
                                marker=marker, color=color, label=method)  # fmt: skip
            axes[row][1].loglog([r["layers"] for r in d], [max(r[key], 0.1) for r in d],
                                marker=marker, color=color, label=method)  # fmt: skip
            axes[row][0].set_ylabel(label)
        axes[0][0].loglog(
            [r["hidden"] for r in w],
            [r["seconds"] for r in w],
            ls="--",
            color=color,
            alpha=0.5,
            label=f"{method} wall (shared machine)",
        )
        axes[0][1].loglog(
            [r["layers"] for r in d],
            [r["seconds"] for r in d],
            ls="--",
            color=color,
            alpha=0.5,
            label=f"{method} wall (shared machine)",
        )
        axes[0][0].plot([], [], " ", label=f"{method} CPU slope {f['cpu_time_vs_hidden']:.2f}")
        axes[0][1].plot([], [], " ", label=f"{method} CPU slope {f['cpu_time_vs_depth']:.2f}")
    axes[1][0].set_xlabel(f"hidden size ({DEPTH_FOR_WIDTHS} layers)")
    axes[1][1].set_xlabel(f"layers (hidden {SMOLLM2_WIDTH})")
    for ax in axes.flat:
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("SparseGPT and Wanda cost vs model size (random Llama, SmolLM2 proportions)\n"
                 + note, fontsize=9)  # fmt: skip
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--quick", action="store_true", help="two sizes per axis (smoke run)")
    p.add_argument("--windows", type=int, default=16, help="calibration windows")
    p.add_argument("--length", type=int, default=128, help="tokens per window")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--threads", type=int, default=1, help="torch threads in each child")
    p.add_argument("--repeats", type=int, default=1, help="runs per (size, method); median time")
    p.add_argument("--output", type=Path, default=OUT)
    p.add_argument("--figure", type=Path, default=FIGURE)
    args = p.parse_args()
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return
    widths = (64, 192) if args.quick else WIDTHS
    depths = (1, 2) if args.quick else DEPTHS
    sizes = {(h, DEPTH_FOR_WIDTHS) for h in widths} | {(SMOLLM2_WIDTH, n) for n in depths}
    order = sorted(sizes)
    random.Random(0).shuffle(order)
    base = dict(windows=args.windows, length=args.length, batch_size=args.batch_size,
                threads=args.threads)  # fmt: skip
    record: dict = {"settings": base, "load_at_start": os.getloadavg(), "runs": []}
    start = time.perf_counter()
    schedule = [size for _ in range(args.repeats) for size in order]
    for i, (hidden, layers) in enumerate(schedule):
        methods = METHODS if i % 2 == 0 else METHODS[::-1]  # alternate which goes first
        for method in methods:
            run = run_child({**base, "hidden": hidden, "layers": layers, "method": method})
            run["load"] = os.getloadavg()[0]
            record["runs"].append(run)
            print(f"{method:9s} hidden {hidden:4d} x {layers:2d} layers: "
                  f"{run['cpu_seconds']:7.2f} s CPU, {run['seconds']:7.2f} s wall, "
                  f"peak +{run['peak_extra_mib']:7.1f} MiB (process {run['process_peak_mib']:.0f}"
                  f" MiB), load {run['load']:.1f}", flush=True)  # fmt: skip
    record["medians"] = medians(record["runs"])
    record["wall_seconds"] = time.perf_counter() - start
    record["load_at_end"] = os.getloadavg()
    record["fits"] = fits(record["medians"], widths, depths)
    print(json.dumps(record["fits"], indent=2))
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(record, indent=2))
    loads = [r["load"] for r in record["runs"]]
    note = (f"{args.windows} x {args.length} random tokens, median of {args.repeats} run(s), "
            f"{args.threads} thread(s) per run, shared 2-core machine "
            f"(load {min(loads):.1f}-{max(loads):.1f})")  # fmt: skip
    plot(record["medians"], record["fits"], args.figure, note)
    print(f"wrote {args.output} and {args.figure} in {record['wall_seconds']:.0f} s")


if __name__ == "__main__":
    main()
