#!/usr/bin/env python3
"""SparseGPT 50% on SmolLM2 (dequantized Q4_1 GGUF, fp32) in four settings, each in its own child
process so that its peak RSS is its own:

  fp32        the model loaded in float32 (the reference)
  bf16        the same checkpoint loaded in bfloat16 (statistics and solves in fp32)
  fp32-disk   float32, every decoder block offloaded to disk by accelerate (device_map +
              offload_folder), blocks onloaded one at a time, block inputs kept on the CPU
  bf16-disk   the same in bfloat16

plus the dense perplexity in fp32 and bf16. Children run interleaved (fp32, bf16, fp32-disk,
bf16-disk), on the CPU.

    .venv/bin/python benchmarks/dtype_offload.py                      # 32 x 256 calibration
    .venv/bin/python benchmarks/dtype_offload.py --calib-windows 16 --threads 2

Peak RSS: ``ru_maxrss`` of the child after load + prune, before evaluation. Wall: the
``prune_`` call. Masks of each run are saved and compared with the fp32 run's.
Writes ``benchmarks/out/dtype_offload/summary.json`` and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RUNS = {  # name -> (dtype, offloaded)
    "fp32": ("float32", False),
    "bf16": ("bfloat16", False),
    "fp32-disk": ("float32", True),
    "bf16-disk": ("bfloat16", True),
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--model", type=Path, help="HF model dir (default: the cached SmolLM2-135M)")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "out" / "dtype_offload")
    p.add_argument("--runs", nargs="+", choices=list(RUNS), default=list(RUNS))
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--calib-windows", type=int, default=32)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--eval-windows", type=int, default=16)
    p.add_argument("--eval-len", type=int, default=512)
    p.add_argument("--child", help=argparse.SUPPRESS)  # internal: run name or dense-<dtype>
    return p.parse_args(argv)


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def load(args: argparse.Namespace, dtype_name: str, offloaded: bool):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    dtype = getattr(torch, dtype_name)
    if not offloaded:
        return AutoModelForCausalLM.from_pretrained(str(args.model), dtype=dtype).eval()
    layers = AutoConfig.from_pretrained(str(args.model)).num_hidden_layers
    device_map = {name: "cpu" for name in ("model.embed_tokens", "model.norm", "model.rotary_emb",
                                            "lm_head")}  # fmt: skip
    device_map.update({f"model.layers.{i}": "disk" for i in range(layers)})
    folder = args.out / f"offload-{dtype_name}"
    return AutoModelForCausalLM.from_pretrained(
        str(args.model), dtype=dtype, device_map=device_map, offload_folder=str(folder)
    ).eval()


def child(args: argparse.Namespace) -> dict:
    import torch
    from safetensors.torch import load_file, save_file

    from hf_sparse.evaluation import perplexity
    from hf_sparse.pruning import SparseGPTConfig, prune_

    torch.set_num_threads(args.threads)
    windows = load_file(str(args.out / "windows.safetensors"))
    if args.child.startswith("dense-"):
        model = load(args, args.child.removeprefix("dense-"), False)
        ppl = perplexity(model, windows["eval"], batch_size=4, show_progress=False)
        return {"ppl": ppl.perplexity}
    dtype_name, offloaded = RUNS[args.child]
    start = time.perf_counter()
    model = load(args, dtype_name, offloaded)
    load_s = time.perf_counter() - start
    config = SparseGPTConfig(sparsity=0.5, device="cpu", offload_inputs=offloaded)
    start, cpu = time.perf_counter(), time.process_time()
    result = prune_(model, config, windows["calib"], batch_size=8, show_progress=False)
    prune_s = time.perf_counter() - start
    prune_cpu_s = time.process_time() - cpu  # all threads: less disturbed by other load
    peak = peak_rss_mib()
    dtypes = sorted({str(p.dtype) for p in model.parameters()})
    save_file({k: v.contiguous() for k, v in result.masks.items()},
              str(args.out / f"masks-{args.child}.safetensors"))  # fmt: skip
    start = time.perf_counter()
    ppl = perplexity(model, windows["eval"], batch_size=4, show_progress=False).perplexity
    return {"ppl": ppl, "prune_s": prune_s, "prune_cpu_s": prune_cpu_s, "load_s": load_s,
            "eval_s": time.perf_counter() - start,
            "peak_rss_mib": peak, "measured_sparsity": result.measured_sparsity,
            "parameter_dtypes": dtypes, "threads": torch.get_num_threads()}  # fmt: skip


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


def run_child(args: argparse.Namespace, name: str) -> dict:
    command = [sys.executable, str(Path(__file__).resolve()), "--model", str(args.model),
               "--out", str(args.out), "--threads", str(args.threads), "--child", name]  # fmt: skip
    print(f"[bench] {name}", file=sys.stderr, flush=True)
    proc = subprocess.run(command, stdout=subprocess.PIPE, text=True)
    if proc.returncode:  # reported, and the other runs still measured
        return {"error": f"child exited with {proc.returncode} (its stderr is above)"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def mask_agreement(args: argparse.Namespace, name: str) -> float:
    from safetensors.torch import load_file

    reference = load_file(str(args.out / "masks-fp32.safetensors"))
    other = load_file(str(args.out / f"masks-{name}.safetensors"))
    same = sum(int((reference[k] == other[k]).sum()) for k in reference)
    return same / sum(v.numel() for v in reference.values())


def main() -> None:
    args = parse_args()
    if args.model is None:
        from hf_sparse.real_model import fetch_model

        args.model = Path(fetch_model("smollm2-135m"))
    if args.child is not None:
        print(json.dumps(child(args)))
        return
    prepare(args)
    summary: dict = {"settings": {k: str(v) for k, v in vars(args).items()}, "runs": {}}
    summary["dense"] = {
        d: run_child(args, f"dense-{d}").get("ppl") for d in ("float32", "bfloat16")
    }
    for name in args.runs:
        summary["runs"][name] = run_child(args, name)
    failed = {name: run["error"] for name, run in summary["runs"].items() if "error" in run}
    summary["runs"] = {n: r for n, r in summary["runs"].items() if n not in failed}
    summary["failed"] = failed
    if "fp32" in summary["runs"]:
        for name, run in summary["runs"].items():
            run["mask_agreement_with_fp32"] = mask_agreement(args, name)
    (args.out / "summary.json").write_text(json.dumps(summary, indent=1))
    print(f"dense ppl: {summary['dense']}; failed runs: {failed or 'none'}")
    print("| run | ppl | masks equal to fp32 | prune s | prune CPU s | load s | peak RSS MiB |")
    print("|---|---|---|---|---|---|---|")
    for name, run in summary["runs"].items():
        agreement = run.get("mask_agreement_with_fp32")
        equal = "-" if agreement is None else format(agreement, ".4%")
        print(f"| {name} | {run['ppl']:.3f} | {equal} | {run['prune_s']:.1f} | "
              f"{run['prune_cpu_s']:.1f} | {run['load_s']:.1f} | "
              f"{run['peak_rss_mib']:.0f} |")  # fmt: skip


if __name__ == "__main__":
    main()
