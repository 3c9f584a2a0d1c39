#!/usr/bin/env python3
"""Protocol v1 pruning benchmark (see ../shared/BENCHMARKS.md): hf_sparse vs llm-compressor.

    .venv/bin/python benchmarks/prune_smollm2.py --peer --repeats 3

Every model-touching step runs in a child process of this script (``--prepare``,
``--single METHOD MASK``, ``--evaluate DIR``); the parent imports neither torch nor hf_sparse,
so each child's peak RSS (``ru_maxrss``) is its own, not the parent's or a previous method's.
Wall time: the ``prune_`` call only (llm-compressor: the ``oneshot`` call only). Peak MiB:
load + prune, read before evaluation (llm-compressor: load + oneshot, read before saving).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import resource
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PEER_PYTHON = ROOT / ".venv-llmc" / "bin" / "python"
PEER_SCRIPT = ROOT / "benchmarks" / "peer_llmcompressor.py"
RUNS: dict[str, tuple[str, str]] = {  # name -> (method, mask); every run removes 50%
    "magnitude-50": ("magnitude", "unstructured"),
    "wanda-50": ("wanda", "unstructured"),
    "sparsegpt-50": ("sparsegpt", "unstructured"),
    "wanda-2:4": ("wanda", "2:4"),
    "sparsegpt-2:4": ("sparsegpt", "2:4"),
}
PEER_METHODS = {"wanda", "sparsegpt"}
DECODER_LINEAR = re.compile(r"layers\.\d+\.(self_attn|mlp)\.\w+_proj$")  # = the peer's targets
COLUMNS = "method|settings|ppl|ratio to dense|wall s|peak MiB|peer ppl|peer wall s|peer peak MiB"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--model", type=Path, help="HF model dir (default: the cached SmolLM2-135M)")
    p.add_argument("--methods", nargs="+", choices=list(RUNS), default=list(RUNS))
    p.add_argument("--peer", action="store_true", help="also run llm-compressor (wanda/sparsegpt)")
    p.add_argument("--repeats", type=int, default=1, help="timed prunes per run; median reported")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "out")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--calib-windows", type=int, default=64)
    p.add_argument("--eval-windows", type=int, default=32)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--seed", type=int, default=0)
    worker = p.add_mutually_exclusive_group()  # internal: child-process modes
    worker.add_argument("--prepare", action="store_true", help=argparse.SUPPRESS)
    worker.add_argument("--single", nargs=2, metavar=("METHOD", "MASK"), help=argparse.SUPPRESS)
    worker.add_argument("--evaluate", type=Path, metavar="DIR", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux


# ---------------------------------------------------------------- child-process modes
def load_model(path: Path):
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()


def load_windows(args: argparse.Namespace, name: str):
    from safetensors.torch import load_file

    return load_file(str(args.out / f"{name}.safetensors"))["input_ids"]


def measured_sparsity(model) -> float:
    from hf_sparse.evaluation import overall_sparsity, sparsity_report

    names = [n for n, _ in model.named_modules() if DECODER_LINEAR.search(n)]
    return overall_sparsity(sparsity_report(model, names))


def prepare(args: argparse.Namespace) -> dict:
    """Tokenize once; write calib.safetensors (the peer reads it too) and eval.safetensors."""
    from safetensors.torch import save_file
    from transformers import AutoTokenizer

    from hf_sparse.data import calibration_windows, evaluation_windows

    tokenizer = AutoTokenizer.from_pretrained(str(args.model))
    windows = {
        "calib": calibration_windows(
            tokenizer, "wikitext2", count=args.calib_windows, length=args.seq_len, seed=args.seed
        ),
        "eval": evaluation_windows(
            tokenizer, "wikitext2", length=args.seq_len, count=args.eval_windows
        ),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    for name, ids in windows.items():
        save_file({"input_ids": ids.long().contiguous()}, str(args.out / f"{name}.safetensors"))
    return {"model": str(args.model), **{k: list(v.shape) for k, v in windows.items()}}


def single(args: argparse.Namespace, method: str, mask: str) -> dict:
    """Prune a fresh model ``--repeats`` times (timed), then measure sparsity and perplexity."""
    import torch

    from hf_sparse.evaluation import perplexity
    from hf_sparse.pruning import MagnitudeConfig, SparseGPTConfig, WandaConfig, prune_

    torch.set_num_threads(args.threads)
    configs = {"magnitude": MagnitudeConfig, "wanda": WandaConfig, "sparsegpt": SparseGPTConfig}
    calib = load_windows(args, "calib")
    walls: list[float] = []
    model = load_model(args.model)
    for i in range(args.repeats if method != "dense" else 0):
        if i:
            del model
            model = load_model(args.model)
        config = configs[method](sparsity=0.5, mask=mask)
        start = time.perf_counter()
        prune_(model, config, calib, show_progress=False)
        walls.append(time.perf_counter() - start)
    peak_prune = peak_rss_mib()
    ppl = perplexity(model, load_windows(args, "eval"), batch_size=4, show_progress=False)
    wall = statistics.median(walls) if walls else None
    return {"wall_s": wall, "walls": walls, "sparsity": measured_sparsity(model),
            "ppl": ppl.perplexity, "peak_rss_mib": peak_prune,
            "threads": torch.get_num_threads(),
            "peak_rss_with_eval_mib": peak_rss_mib()}  # fmt: skip


def evaluate(args: argparse.Namespace, directory: Path) -> dict:
    """Perplexity and sparsity of a saved (e.g. peer-pruned) model, through our code path."""
    import torch

    from hf_sparse.evaluation import perplexity

    torch.set_num_threads(args.threads)
    model = load_model(directory)
    ppl = perplexity(model, load_windows(args, "eval"), batch_size=4, show_progress=False)
    return {"ppl": ppl.perplexity, "sparsity": measured_sparsity(model)}


# ---------------------------------------------------------------- parent (orchestrator)
def child(cmd: list[str], log: str) -> dict:
    """Run one child; its stderr goes to ours, its last stdout line is a JSON record."""
    print(f"[bench] {log}: {shlex.join(cmd)}", file=sys.stderr, flush=True)
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, check=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def worker_cmd(args: argparse.Namespace, *mode: str) -> list[str]:
    flags = {"--model": args.model, "--out": args.out, "--threads": args.threads,
             "--repeats": args.repeats, "--calib-windows": args.calib_windows,
             "--eval-windows": args.eval_windows, "--seq-len": args.seq_len,
             "--seed": args.seed}  # fmt: skip
    pairs = [s for k, v in flags.items() if v is not None for s in (k, str(v))]
    return [sys.executable, str(Path(__file__).resolve()), *pairs, *mode]


def run_peer(args: argparse.Namespace, method: str, mask: str, name: str) -> dict:
    """llm-compressor ``--repeats`` times on the same calib file; our perplexity on its model."""
    out_dir = args.out / "peer" / name.replace(":", "_")
    cmd = [str(PEER_PYTHON), str(PEER_SCRIPT), "--model", str(args.model),
           "--calib", str(args.out / "calib.safetensors"), "--method", method,
           "--sparsity", "0.5", "--mask", mask, "--out", str(out_dir),
           "--threads", str(args.threads)]  # fmt: skip
    runs = [child(cmd, f"peer {name}") for _ in range(args.repeats)]
    scored = child(worker_cmd(args, "--evaluate", str(out_dir)), f"evaluate peer {name}")
    walls = [r["wall_s"] for r in runs]
    peak = max(r["peak_rss_mib"] for r in runs)
    return {"wall_s": statistics.median(walls), "walls": walls, "peak_rss_mib": peak,
            "version": runs[0]["version"], **scored}  # fmt: skip


def fmt(value: float | None, spec: str, suffix: str = "") -> str:
    return "–" if value is None else format(value, spec) + suffix


def markdown(rows: list[dict], dense_ppl: float) -> str:
    head = [*COLUMNS.split("|"), "wall ratio ours/peer"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        peer = r.get("peer") or {}
        settings = "–"
        if r["mask"]:
            settings = f"{r['mask']}, 50% (meas. {r['sparsity']:.2%}"
            settings += f"; peer {peer['sparsity']:.2%})" if peer else ")"
        ratio = r["wall_s"] / peer["wall_s"] if peer and r["wall_s"] else None
        cells = [r["method"], settings, fmt(r["ppl"], ".2f"), fmt(r["ppl"] / dense_ppl, ".3f", "x"),
                 fmt(r["wall_s"], ".1f"), fmt(r["peak_rss_mib"], ".0f"),
                 fmt(peer.get("ppl"), ".2f"), fmt(peer.get("wall_s"), ".1f"),
                 fmt(peer.get("peak_rss_mib"), ".0f"), fmt(ratio, ".2f", "x")]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def orchestrate(args: argparse.Namespace) -> None:
    command = shlex.join([".venv/bin/python", *sys.argv])
    started = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
    peer = args.peer and PEER_PYTHON.exists()
    if args.peer and not peer:
        print(f"[bench] {PEER_PYTHON} missing: skipping the llm-compressor peer", file=sys.stderr)
    shapes = child(worker_cmd(args, "--prepare"), "prepare windows")
    args.model = Path(shapes.pop("model"))  # resolved by the child (fetch_model imports torch)
    dense = child(worker_cmd(args, "--single", "dense", "none"), "dense")
    rows = [{"method": "dense", "mask": None, **dense}]
    for name in args.methods:
        method, mask = RUNS[name]
        ours = child(worker_cmd(args, "--single", method, mask), f"ours {name}")
        row = {"method": method, "mask": mask, **ours}
        if peer and method in PEER_METHODS:
            row["peer"] = run_peer(args, method, mask, name)
        rows.append(row)
        print(f"[bench] {name}: {json.dumps(row)}", file=sys.stderr, flush=True)
    version = next((r["peer"]["version"] for r in rows if r.get("peer")), None)
    meta = {"command": command, "date": started, "torch_threads": dense["threads"],
            "repeats": args.repeats, "model": str(args.model), "windows": shapes,
            "peer": f"llm-compressor {version}" if version else "not run"}  # fmt: skip
    header = "\n".join(f"- {k}: `{v}`" for k, v in meta.items())
    note = (
        "wall s: the prune_ / oneshot call, median of `repeats`. peak MiB: ru_maxrss of a "
        "process that loaded the model and pruned it (before evaluation / saving)."
    )
    table = markdown(rows, dense["ppl"])
    text = f"# Pruning benchmark (protocol v1)\n\n{header}\n\n{table}\n\n{note}\n"
    (args.out / "prune_smollm2.json").write_text(json.dumps({**meta, "rows": rows}, indent=2))
    (args.out / "prune_smollm2.md").write_text(text)
    print(text)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.out = args.out.resolve()
    if args.repeats < 1:
        raise SystemExit("--repeats must be >= 1")
    if not (args.prepare or args.single or args.evaluate):
        args.model = args.model.resolve() if args.model else None
        orchestrate(args)
        return 0
    if args.model is None:
        from hf_sparse.real_model import fetch_model

        args.model = fetch_model()
    if args.prepare:
        record = prepare(args)
    else:
        record = single(args, *args.single) if args.single else evaluate(args, args.evaluate)
    print(json.dumps(record), flush=True)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    raise SystemExit(main())
