#!/usr/bin/env python3
"""One process vs two (torchrun, gloo, CPU) pruning SmolLM2 with SparseGPT: masks per block and
perplexity, for the former running sums (``reduction: sum``) and the ordered reduction.

    .venv/bin/python benchmarks/multiprocess_equality.py            # 16 x 128 calibration
    .venv/bin/python benchmarks/multiprocess_equality.py --reductions ordered

Every run is a child process with one thread per process (``OMP_NUM_THREADS=1``, which torchrun
also sets), so both sides run the same kernels on batches of the same shape. The 2-process side
gives each rank its contiguous half of the windows (``shard_for_rank``); rank 0 writes the masks.
Writes ``benchmarks/out/multiprocess_equality/summary.json`` and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--model", type=Path, help="HF model dir (default: the cached SmolLM2-135M)")
    p.add_argument(
        "--out", type=Path, default=ROOT / "benchmarks" / "out" / "multiprocess_equality"
    )
    p.add_argument("--reductions", nargs="+", default=["sum", "ordered"])
    p.add_argument("--method", choices=["sparsegpt", "wanda"], default="sparsegpt")
    p.add_argument("--calib-windows", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--eval-windows", type=int, default=16)
    p.add_argument("--eval-len", type=int, default=512)
    p.add_argument("--worker", type=Path, help=argparse.SUPPRESS)  # internal: run dir
    p.add_argument("--reduction", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def worker(args: argparse.Namespace) -> None:
    """Prune (this rank's shard), then rank 0 writes masks.safetensors and record.json."""
    import torch
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM

    from hf_sparse.calibration import distributed_world
    from hf_sparse.data import shard_for_rank
    from hf_sparse.evaluation import perplexity
    from hf_sparse.pruning import SparseGPTConfig, WandaConfig, prune_

    accelerator = None
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        from accelerate import Accelerator

        accelerator = Accelerator(cpu=True)
    rank, world = distributed_world()
    torch.set_num_threads(1)
    windows = load_file(str(args.out / "windows.safetensors"))
    calib = shard_for_rank(windows["calib"], rank, world)
    model = AutoModelForCausalLM.from_pretrained(str(args.model), dtype=torch.float32).eval()
    config_class = SparseGPTConfig if args.method == "sparsegpt" else WandaConfig
    config = config_class(sparsity=0.5, reduction=args.reduction)
    start = time.perf_counter()
    result = prune_(model, config, calib, batch_size=args.batch_size, show_progress=False)
    seconds = time.perf_counter() - start
    if rank == 0:
        ppl = perplexity(model, windows["eval"], batch_size=4, show_progress=False).perplexity
        args.worker.mkdir(parents=True, exist_ok=True)
        masks = {name: keep.contiguous() for name, keep in result.masks.items()}
        save_file(masks, str(args.worker / "masks.safetensors"))
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        record = {"world": world, "reduction": args.reduction, "ppl": ppl, "prune_s": seconds,
                  "shard_windows": int(calib.shape[0]), "threads": torch.get_num_threads(),
                  "peak_rss_mib": peak}  # fmt: skip
        (args.worker / "record.json").write_text(json.dumps(record, indent=1))
    if accelerator is not None:
        accelerator.wait_for_everyone()
        accelerator.end_training()


def prepare(args: argparse.Namespace) -> None:
    from safetensors.torch import save_file
    from transformers import AutoTokenizer

    from hf_sparse.data import calibration_windows, evaluation_windows

    tokenizer = AutoTokenizer.from_pretrained(str(args.model))
    calib = calibration_windows(tokenizer, "wikitext2", count=args.calib_windows,
                                length=args.seq_len, seed=0)  # fmt: skip
    evaluation = evaluation_windows(tokenizer, "wikitext2", length=args.eval_len,
                                    count=args.eval_windows)  # fmt: skip
    args.out.mkdir(parents=True, exist_ok=True)
    save_file({"calib": calib.long().contiguous(), "eval": evaluation.long().contiguous()},
              str(args.out / "windows.safetensors"))  # fmt: skip


def launch(args: argparse.Namespace, reduction: str, world: int) -> dict:
    run_dir = args.out / f"{reduction}-{world}proc"
    flags = ["--model", str(args.model), "--out", str(args.out), "--method", args.method,
             "--batch-size", str(args.batch_size), "--worker", str(run_dir),
             "--reduction", reduction]  # fmt: skip
    script = str(Path(__file__).resolve())
    if world == 1:
        command = [sys.executable, script, *flags]
    else:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        command = [sys.executable, "-m", "torch.distributed.run",
                   "--nproc_per_node", str(world), "--master_addr", "127.0.0.1",
                   "--master_port", str(port), script, *flags]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    print(f"[bench] {reduction}, {world} process(es)", file=sys.stderr, flush=True)
    start = time.perf_counter()
    subprocess.run(command, env=env, check=True)
    record = json.loads((run_dir / "record.json").read_text())
    record["wall_s"] = time.perf_counter() - start
    return record


def block_of(name: str) -> str:
    parts = name.split(".")
    index = next(i for i, part in enumerate(parts) if part.isdigit())
    return ".".join(parts[: index + 1])


def compare(args: argparse.Namespace, reduction: str) -> dict:
    from safetensors.torch import load_file

    one = load_file(str(args.out / f"{reduction}-1proc" / "masks.safetensors"))
    two = load_file(str(args.out / f"{reduction}-2proc" / "masks.safetensors"))
    if one.keys() != two.keys():
        raise RuntimeError("the two runs pruned different layers")
    blocks: dict[str, list[int]] = {}
    for name in one:
        same = int((one[name] == two[name]).sum())
        entry = blocks.setdefault(block_of(name), [0, 0])
        entry[0] += same
        entry[1] += one[name].numel()
    agreement = {block: same / total for block, (same, total) in blocks.items()}
    same = sum(s for s, _ in blocks.values())
    total = sum(t for _, t in blocks.values())
    return {"agreement_per_block": agreement, "agreement": same / total,
            "differing_entries": total - same,
            "identical_blocks": sum(s == t for s, t in blocks.values()),
            "blocks": len(blocks)}  # fmt: skip


def main() -> None:
    args = parse_args()
    if args.model is None:
        from hf_sparse.real_model import fetch_model

        args.model = Path(fetch_model("smollm2-135m"))
    if args.worker is not None:
        worker(args)
        return
    prepare(args)
    summary: dict = {"settings": {k: str(v) for k, v in vars(args).items()}, "runs": {}}
    for reduction in args.reductions:
        runs = {world: launch(args, reduction, world) for world in (1, 2)}
        comparison = compare(args, reduction)
        ppl1, ppl2 = runs[1]["ppl"], runs[2]["ppl"]
        comparison["ppl_relative_difference"] = abs(ppl2 - ppl1) / ppl1
        summary["runs"][reduction] = {"1": runs[1], "2": runs[2], **comparison}
    (args.out / "summary.json").write_text(json.dumps(summary, indent=1))
    print("| reduction | masks equal | blocks identical | first/last block | ppl 1 proc | "
          "ppl 2 proc | rel. diff | prune s 1 / 2 proc |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|")
    for reduction, run in summary["runs"].items():
        per_block = list(run["agreement_per_block"].values())
        print(f"| {reduction} | {run['agreement']:.4%} ({run['differing_entries']} differ) | "
              f"{run['identical_blocks']}/{run['blocks']} | {per_block[0]:.4%} / "
              f"{per_block[-1]:.4%} | {run['1']['ppl']:.3f} | {run['2']['ppl']:.3f} | "
              f"{run['ppl_relative_difference']:.3%} | {run['1']['prune_s']:.0f} / "
              f"{run['2']['prune_s']:.0f} |")  # fmt: skip


if __name__ == "__main__":
    main()
