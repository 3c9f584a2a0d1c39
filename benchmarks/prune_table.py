#!/usr/bin/env python3
"""Protocol v1 pruning table at 50/60/70% and 2:4: hf_sparse vs llm-compressor (issue 18).

    .venv/bin/python benchmarks/prune_table.py                 # every row, every variant
    .venv/bin/python benchmarks/prune_table.py --rows 0.5 2:4 --no-peer-wanda

Rows: unstructured 50%, 60%, 70% and 2:4. In each row, ours: magnitude, Wanda and SparseGPT, each
with and without OWL (not for 2:4), and the options llm-compressor lacks (Wanda with RIA scores,
Wanda with DSnoT refinement); llm-compressor 0.14 (its own venv, ``.venv-llmc``): SparseGPT and
Wanda, each with and without its OWL. Both libraries prune from the same calibration tensor
(``calib.safetensors``); every pruned model is scored by our ``perplexity`` on the same windows.

Before anything is compared, the zero fraction of every 2-D tensor of both outputs is checked:
the decoder projections must hold the target sparsity overall (to 0.1 point), every other 2-D
tensor (embeddings, ``lm_head``) as many zeros as the dense model. A row that fails says so.

The forward-pass floor (``--floor``): the sequential engine's calibration passes alone (each
block run once to be measured and once to propagate, no statistics, no solve), and a single
dense pass through the blocks; printed beside each method's wall time.

Each timed step also records its process CPU time (all threads): on a machine shared with other
work, wall time grows with the load while CPU time stays close to the work done, so the table
gives both and the ratios in each.

Each model-touching step runs in a child process (peak RSS of its own); the parent writes
``prune_table.json`` / ``prune_table.md`` under ``--out`` after every cell, so a partial run
keeps what it measured. Cells are run ours/theirs interleaved per row; ``--repeats`` (default 1)
times each cell that many times (median reported).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import prune_smollm2 as base  # noqa: E402  (shared child helpers: windows, model loading)

ROOT = Path(__file__).resolve().parents[1]
ROWS = {"0.5": (0.5, "unstructured"), "0.6": (0.6, "unstructured"),
        "0.7": (0.7, "unstructured"), "2:4": (0.5, "2:4")}  # fmt: skip
# ours: name -> (method, extra config keys); "owl" variants are skipped for N:M rows
OURS: dict[str, tuple[str, dict]] = {
    "sparsegpt": ("sparsegpt", {}),
    "sparsegpt+owl": ("sparsegpt", {"sparsity_profile": "owl"}),
    "wanda": ("wanda", {}),
    "wanda+owl": ("wanda", {"sparsity_profile": "owl"}),
    "wanda-ria": ("wanda", {"score": "ria"}),
    "wanda-dsnot": ("wanda", {"refine": "dsnot"}),
    "wanda-ria+dsnot+owl": (
        "wanda",
        {"score": "ria", "refine": "dsnot", "sparsity_profile": "owl"},
    ),
    "magnitude": ("magnitude", {}),
    "magnitude+owl": ("magnitude", {"sparsity_profile": "owl"}),
}
PEER: dict[str, tuple[str, bool]] = {  # name -> (method, owl)
    "sparsegpt": ("sparsegpt", False),
    "sparsegpt+owl": ("sparsegpt", True),
    "wanda": ("wanda", False),
    "wanda+owl": ("wanda", True),
}
OWL_M, OWL_LAMBDA = 5, 0.08  # the paper's defaults for LLaMA; the same for both libraries


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--model", type=Path, help="HF model dir (default: the cached SmolLM2-135M)")
    p.add_argument("--rows", nargs="+", choices=list(ROWS), default=list(ROWS))
    p.add_argument("--ours", nargs="+", choices=list(OURS), default=list(OURS))
    p.add_argument("--peer", nargs="*", choices=list(PEER), default=list(PEER))
    p.add_argument("--no-peer-wanda", action="store_true", help="skip the peer's Wanda cells")
    p.add_argument(
        "--resume", action="store_true", help="keep the cells of an earlier prune_table.json"
    )
    p.add_argument("--repeats", type=int, default=1, help="timed runs per cell; median reported")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "out" / "prune_table")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--calib-windows", type=int, default=64)
    p.add_argument("--eval-windows", type=int, default=32)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--seed", type=int, default=0)
    worker = p.add_mutually_exclusive_group()  # internal: child-process modes
    worker.add_argument("--prepare", action="store_true", help=argparse.SUPPRESS)
    worker.add_argument("--floor", action="store_true", help=argparse.SUPPRESS)
    worker.add_argument("--cell", nargs=3, metavar=("VARIANT", "SPARSITY", "MASK"),
                        help=argparse.SUPPRESS)  # fmt: skip
    worker.add_argument("--evaluate", type=Path, metavar="DIR", help=argparse.SUPPRESS)
    return p.parse_args(argv)


# ---------------------------------------------------------------- child-process modes
def tensor_zero_fractions(model) -> dict[str, float]:
    """Zero fraction of every 2-D parameter (tied weights counted once)."""
    seen: set[int] = set()
    fractions = {}
    for name, param in model.named_parameters():
        if param.ndim == 2 and id(param) not in seen:
            seen.add(id(param))
            fractions[name] = float((param.detach() == 0).float().mean())
    return fractions


def scored(args: argparse.Namespace, model) -> dict:
    from hf_sparse.evaluation import perplexity

    start = time.perf_counter()
    ppl = perplexity(model, base.load_windows(args, "eval"), batch_size=4, show_progress=False)
    seconds = time.perf_counter() - start
    return {"ppl": ppl.perplexity, "sparsity": base.measured_sparsity(model),
            "zeros": tensor_zero_fractions(model), "eval_s": seconds}  # fmt: skip


def floor(args: argparse.Namespace) -> dict:
    """Calibration forward passes alone: the engine's two passes per block, and one pass."""
    import torch

    from hf_sparse.calibration import run_sequential
    from hf_sparse.models import target_linears
    from hf_sparse.pruning.owl import dense_input_sq_norms

    torch.set_num_threads(args.threads)
    calib = base.load_windows(args, "calib")
    model = base.load_model(args.model)
    engine, single, engine_cpu = [], [], []
    for _ in range(args.repeats):
        start, cpu = time.perf_counter(), time.process_time()
        run_sequential(model, calib, lambda _n, _b: lambda: None, show_progress=False)
        engine.append(time.perf_counter() - start)
        engine_cpu.append(time.process_time() - cpu)
        start = time.perf_counter()
        dense_input_sq_norms(model, calib, {}, show_progress=False)
        single.append(time.perf_counter() - start)
    grouped = target_linears(model)
    start = time.perf_counter()
    dense_input_sq_norms(model, calib, grouped, show_progress=False)
    with_norms = time.perf_counter() - start
    return {"engine_s": statistics.median(engine), "engine_walls": engine,
            "engine_cpu_s": statistics.median(engine_cpu),
            "one_pass_s": statistics.median(single), "one_pass_walls": single,
            "one_pass_with_norms_s": with_norms, "threads": torch.get_num_threads()}  # fmt: skip


def cell(args: argparse.Namespace, variant: str, sparsity: float, mask: str) -> dict:
    """Prune a fresh model ``--repeats`` times (timed), then score the last one."""
    import torch

    from hf_sparse.pruning import prune_, pruning_config_from_dict

    torch.set_num_threads(args.threads)
    method, extra = OURS[variant]
    settings = {"sparsity": sparsity, "mask": mask, **extra}
    if extra.get("sparsity_profile") == "owl":
        settings.update(owl_m=OWL_M, owl_lambda=OWL_LAMBDA)
    calib = base.load_windows(args, "calib")
    walls: list[float] = []
    cpus: list[float] = []
    model = None
    for _ in range(args.repeats):
        del model
        model = base.load_model(args.model)
        config = pruning_config_from_dict(method, dict(settings))
        start, cpu = time.perf_counter(), time.process_time()
        result = prune_(model, config, calib, show_progress=False)
        walls.append(time.perf_counter() - start)
        cpus.append(time.process_time() - cpu)
    peak = base.peak_rss_mib()
    record = {"wall_s": statistics.median(walls), "walls": walls, "peak_rss_mib": peak,
              "cpu_s": statistics.median(cpus), "cpus": cpus,
              "settings": settings, "threads": torch.get_num_threads()}  # fmt: skip
    if result.owl is not None:
        record["owl"] = result.owl.summary()
    return {**record, **scored(args, model)}


def evaluate(args: argparse.Namespace, directory: Path) -> dict:
    import torch

    torch.set_num_threads(args.threads)
    return scored(args, base.load_model(directory))


# ---------------------------------------------------------------- parent (orchestrator)
def child(cmd: list[str], log: str) -> dict:
    print(f"[table] {log}: {shlex.join(cmd)}", file=sys.stderr, flush=True)
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, check=False)
    if proc.returncode:
        return {"error": f"exit {proc.returncode}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def worker_cmd(args: argparse.Namespace, *mode: str) -> list[str]:
    flags = {"--model": args.model, "--out": args.out, "--threads": args.threads,
             "--repeats": args.repeats, "--calib-windows": args.calib_windows,
             "--eval-windows": args.eval_windows, "--seq-len": args.seq_len,
             "--seed": args.seed}  # fmt: skip
    pairs = [s for k, v in flags.items() if v is not None for s in (k, str(v))]
    return [sys.executable, str(Path(__file__).resolve()), *pairs, *mode]


def run_peer(args: argparse.Namespace, variant: str, sparsity: float, mask: str) -> dict:
    method, owl = PEER[variant]
    out_dir = args.out / "peer" / f"{variant}-{sparsity}-{mask}".replace(":", "_")
    cmd = [str(base.PEER_PYTHON), str(base.PEER_SCRIPT), "--model", str(args.model),
           "--calib", str(args.out / "calib.safetensors"), "--method", method,
           "--sparsity", str(sparsity), "--mask", mask, "--out", str(out_dir),
           "--threads", str(args.threads)]  # fmt: skip
    if owl:
        cmd += ["--owl", "--owl-m", str(OWL_M), "--owl-lambda", str(OWL_LAMBDA)]
    runs = [child(cmd, f"peer {variant} {sparsity} {mask}") for _ in range(args.repeats)]
    if any("error" in r for r in runs):
        return {"error": next(r["error"] for r in runs if "error" in r)}
    score = child(worker_cmd(args, "--evaluate", str(out_dir)), f"evaluate peer {variant}")
    walls = [r["wall_s"] for r in runs]
    cpus = [r["cpu_s"] for r in runs]
    return {"wall_s": statistics.median(walls), "walls": walls,
            "cpu_s": statistics.median(cpus), "cpus": cpus,
            "peak_rss_mib": max(r["peak_rss_mib"] for r in runs),
            "version": runs[0]["version"], "owl": runs[0].get("owl"), **score}  # fmt: skip


def check_zeros(record: dict, dense_zeros: dict[str, float], target: float) -> str:
    """'ok', or why this output cannot be compared."""
    if "error" in record:
        return record["error"]
    problems = []
    if abs(record["sparsity"] - target) > 1e-3:
        problems.append(f"decoder projections {record['sparsity']:.4f} != {target}")
    for name, fraction in record["zeros"].items():
        if base.DECODER_LINEAR.search(name.removesuffix(".weight")):
            continue
        if abs(fraction - dense_zeros.get(name, 0.0)) > 1e-6:
            problems.append(f"{name} has {fraction:.4f} zeros (dense {dense_zeros.get(name)})")
    return "; ".join(problems) or "ok"


def load_average() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def fmt(value: float | None, spec: str, suffix: str = "") -> str:
    return "–" if value is None else format(value, spec) + suffix


def markdown(state: dict) -> str:
    dense = state["dense"]["ppl"]
    floor_s = (state.get("floor") or {}).get("engine_s")
    floor_cpu = (state.get("floor") or {}).get("engine_cpu_s")
    head = ["row", "library", "variant", "ppl", "ratio to dense", "wall s", "x floor",
            "cpu s", "x floor (cpu)", "peak MiB", "ours/peer best wall",
            "ours/peer best cpu", "zeros check"]  # fmt: skip
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row_name, row in state["rows"].items():
        peers = [r for r in row["peer"].values() if r.get("check") == "ok"]
        best_peer = min(peers, key=lambda r: r["ppl"]) if peers else None
        cells = [("ours", k, v) for k, v in row["ours"].items()]
        cells += [("llm-compressor", k, v) for k, v in row["peer"].items()]
        for library, variant, r in cells:
            if "error" in r:
                lines.append(f"| {row_name} | {library} | {variant} | {r['error']} |")
                continue
            ours = best_peer and library == "ours"
            ratio = r["wall_s"] / best_peer["wall_s"] if ours else None
            cpu = r.get("cpu_s")
            peer_cpu = best_peer.get("cpu_s") if ours else None
            cpu_ratio = cpu / peer_cpu if cpu and peer_cpu else None
            values = [row_name, library, variant, fmt(r["ppl"], ".2f"),
                      fmt(r["ppl"] / dense, ".3f", "x"), fmt(r["wall_s"], ".1f"),
                      fmt(r["wall_s"] / floor_s if floor_s else None, ".2f", "x"),
                      fmt(cpu, ".1f"), fmt(cpu / floor_cpu if cpu and floor_cpu else None,
                                           ".2f", "x"),
                      fmt(r["peak_rss_mib"], ".0f"), fmt(ratio, ".2f", "x"),
                      fmt(cpu_ratio, ".2f", "x"), r["check"]]  # fmt: skip
            lines.append("| " + " | ".join(values) + " |")
    return "\n".join(lines)


def save(args: argparse.Namespace, state: dict) -> None:
    (args.out / "prune_table.json").write_text(json.dumps(state, indent=2))
    floor_info = state.get("floor") or {}
    header = "\n".join(f"- {k}: `{v}`" for k, v in state["meta"].items())
    text = (
        f"# Pruning table (protocol v1)\n\n{header}\n- dense ppl: {state['dense']['ppl']:.3f}\n"
        f"- floor: engine (2 passes/block) {fmt(floor_info.get('engine_s'), '.1f')} s, "
        f"one pass {fmt(floor_info.get('one_pass_s'), '.1f')} s; engine CPU time "
        f"{fmt(floor_info.get('engine_cpu_s'), '.1f')} s\n"
        "- cpu s: CPU time of the pruning process (all threads), the cost measure that load "
        "from other processes on a shared machine disturbs least\n\n"
        f"{markdown(state)}\n"
    )
    (args.out / "prune_table.md").write_text(text)


def schedule(args: argparse.Namespace, peer_variants: list[str]) -> list[tuple[str, str, str]]:
    """(library, variant, row) in the order run: first SparseGPT with and without OWL, ours and
    theirs interleaved, in every row; then our other variants; then the peer's Wanda."""
    phases = [
        [("ours", v) for v in args.ours if v.startswith("sparsegpt")],
        [("ours", v) for v in args.ours if not v.startswith("sparsegpt")],
        [("peer", v) for v in peer_variants if v.startswith("wanda")],
    ]
    peer_sparsegpt = [("peer", v) for v in peer_variants if v.startswith("sparsegpt")]
    for i, cell_ in enumerate(peer_sparsegpt):  # interleave: ours, theirs, ours, theirs
        phases[0].insert(min(2 * i + 1, len(phases[0])), cell_)
    order = []
    for phase in phases:
        for row_name in args.rows:
            unstructured = ROWS[row_name][1] == "unstructured"
            for library, variant in phase:
                owl = "owl" in variant
                if unstructured or not owl:
                    order.append((library, variant, row_name))
    return order


def orchestrate(args: argparse.Namespace) -> None:
    args.out.mkdir(parents=True, exist_ok=True)
    command = shlex.join([".venv/bin/python", *sys.argv])
    started = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
    peer_ok = base.PEER_PYTHON.exists()
    if not peer_ok:
        print(f"[table] {base.PEER_PYTHON} missing: run benchmarks/setup_llmcompressor_venv.sh",
              file=sys.stderr)  # fmt: skip
    earlier = args.out / "prune_table.json"
    state = json.loads(earlier.read_text()) if args.resume and earlier.exists() else None
    if state is None:
        shapes = child(worker_cmd(args, "--prepare"), "prepare windows")
        args.model = Path(shapes.pop("model"))
        dense = child(worker_cmd(args, "--evaluate", str(args.model)), "dense")
        meta = {"command": command, "date": started, "repeats": args.repeats,
                "threads": args.threads, "model": str(args.model), "windows": shapes,
                "owl": f"M={OWL_M}, lambda={OWL_LAMBDA} (both libraries)",
                "load at start": load_average()}  # fmt: skip
        state = {"meta": meta, "dense": dense, "floor": None, "rows": {}}
    else:
        args.model = Path(state["meta"]["model"])
        state["meta"].setdefault("resumed", []).append({"command": command, "date": started})
    dense = state["dense"]
    if not state.get("floor") or "error" in state["floor"]:
        state["floor"] = {**child(worker_cmd(args, "--floor"), "floor"), "load": load_average()}
    save(args, state)
    peer_variants = [v for v in args.peer if not (args.no_peer_wanda and v.startswith("wanda"))]
    for library, variant, row_name in schedule(args, peer_variants):
        sparsity, mask = ROWS[row_name]
        row = state["rows"].setdefault(
            row_name, {"sparsity": sparsity, "mask": mask, "ours": {}, "peer": {}}
        )
        if variant in row[library] and "error" not in row[library][variant]:
            continue
        if library == "peer" and not peer_ok:
            continue
        load = load_average()
        if library == "ours":
            record = child(worker_cmd(args, "--cell", variant, str(sparsity), mask),
                           f"ours {variant} {row_name}")  # fmt: skip
        else:
            record = run_peer(args, variant, sparsity, mask)
        record["load_before"] = load
        record["check"] = check_zeros(record, dense["zeros"], sparsity)
        row[library][variant] = record
        brief = {k: record.get(k) for k in ("ppl", "wall_s", "peak_rss_mib", "check")}
        print(f"[table] {row_name} {library} {variant}: {brief}", file=sys.stderr, flush=True)
        save(args, state)
    state["meta"]["load at end"] = load_average()
    save(args, state)
    print((args.out / "prune_table.md").read_text())


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.out = args.out.resolve()
    if args.repeats < 1:
        raise SystemExit("--repeats must be >= 1")
    if not (args.prepare or args.floor or args.cell or args.evaluate):
        args.model = args.model.resolve() if args.model else None
        orchestrate(args)
        return 0
    if args.model is None:
        from hf_sparse.real_model import fetch_model

        args.model = fetch_model()
    if args.prepare:
        record = base.prepare(args)
    elif args.floor:
        record = floor(args)
    elif args.cell:
        variant, sparsity, mask = args.cell
        record = cell(args, variant, float(sparsity), mask)
    else:
        record = evaluate(args, args.evaluate)
    print(json.dumps(record), flush=True)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    raise SystemExit(main())
