#!/usr/bin/env python3
"""The golden-parameter specification's speed claims, measured side by side with the dense
path on SmolLM2-135M (dequantized to fp32 from the Q4_1 GGUF, not the Hub's bf16 checkpoint).

    .venv/bin/python benchmarks/golden_speed_claims.py

Claims: gradient accumulation with sparse masks 2-3x faster, KL evaluation 40-60% faster,
peak memory 85-95% lower. What is compared (each pair interleaved, ``--repeats`` times, on
``--micro-steps`` micro-batches of 1 x ``--length`` WikiText-2 tokens):

- accumulation: the masked tensors (every decoder-block linear weight, a random mask of
  ``--density``; everything else frozen in both paths) accumulate their gradients over the
  micro-steps densely (``.grad`` += as torch does) or with ``SparseGradientAccumulator``
  (positions + sums, dense grads freed by hooks). Wall time of forward + backward +
  accumulation + the final dense gradient; bytes held by the accumulated gradients between
  micro-steps; and the process's peak RSS growth in each path (measured in a child process
  per path, ``ru_maxrss``), since activations dominate the peak.
- KL evaluation: ``KLProbe`` on ``--kl-samples`` held-out windows with the mask zeroed, one
  sample per forward pass vs ``--kl-batch`` per pass; and the chunked loss gradient
  (``chunk_size``) vs the whole-sample gradient (time, same gradient).

The machine is shared with other jobs: timings are skewed, pairs are interleaved.
"""

from __future__ import annotations

import argparse
import datetime
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

from hf_sparse.data import calibration_windows
from hf_sparse.importance.chunked import loss_chunks
from hf_sparse.importance.metrics import IMPORTANCE_METRICS
from hf_sparse.loading import load_model_and_tokenizer
from hf_sparse.masked_lr import SparseGradientAccumulator
from hf_sparse.masked_lr.reverse import KLProbe
from hf_sparse.models import target_linears

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "out" / "golden_speed_claims.json"


def setup(args):
    model, tokenizer = load_model_and_tokenizer(args.model)
    windows = calibration_windows(
        tokenizer, "wikitext2", args.micro_steps + args.kl_samples, args.length, seed=0
    )
    names = [f"{n}.weight" for group in target_linears(model).values() for n in group]
    params = dict(model.named_parameters())
    generator = torch.Generator().manual_seed(0)
    masks = {n: torch.rand(params[n].shape, generator=generator) < args.density for n in names}
    for name, param in params.items():
        param.requires_grad_(name in masks)
    return model, windows, masks


def accumulate(model, windows, masks, sparse: bool) -> tuple[float, int]:
    params = dict(model.named_parameters())
    model.zero_grad(set_to_none=True)
    accumulator = SparseGradientAccumulator(model, masks) if sparse else None  # once per run
    if sparse:
        accumulator.attach(lambda: False)
    start = time.perf_counter()
    held = 0
    for window in windows:
        model(input_ids=window[None], labels=window[None], use_cache=False).loss.backward()
        held = (
            accumulator.storage_bytes()
            if sparse
            else sum(params[n].grad.numel() * params[n].grad.element_size() for n in masks)
        )
    if sparse:
        accumulator.detach()
        accumulator.write_grads_()
    seconds = time.perf_counter() - start
    model.zero_grad(set_to_none=True)
    return seconds, held


def child(args) -> None:
    """One accumulation path in a fresh process: peak RSS growth over the loaded model."""
    model, windows, masks = setup(args)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    seconds, held = accumulate(model, windows[: args.micro_steps], masks, args.child == "sparse")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(
        json.dumps(
            {
                "path": args.child,
                "seconds": seconds,
                "held_bytes": held,
                "rss_growth_kib": peak - before,
            }
        )
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--density", type=float, default=0.01)
    parser.add_argument("--micro-steps", type=int, default=4)
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--kl-samples", type=int, default=8)
    parser.add_argument("--kl-batch", type=int, default=4)
    parser.add_argument("--chunk-size", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--child", choices=["dense", "sparse"], default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.child:
        return child(args)
    start = time.perf_counter()
    model, windows, masks = setup(args)
    micro, held_out = windows[: args.micro_steps], windows[args.micro_steps :]
    results = {"accumulation": [], "kl": [], "chunked_gradient": []}
    accumulate(model, micro[:1], masks, False)  # warm-up
    for repeat in range(args.repeats):
        for sparse in (False, True) if repeat % 2 == 0 else (True, False):
            seconds, held = accumulate(model, micro, masks, sparse)
            row = {
                "path": "sparse" if sparse else "dense",
                "repeat": repeat,
                "seconds": round(seconds, 3),
                "held_bytes": held,
            }
            results["accumulation"].append(row)
            print(json.dumps(row), flush=True)
    samples = [{"input_ids": w[None]} for w in held_out]
    for repeat in range(args.repeats):
        for batch in (1, args.kl_batch) if repeat % 2 == 0 else (args.kl_batch, 1):
            t0 = time.perf_counter()
            probe = KLProbe(model, samples, batch)
            reference_s = time.perf_counter() - t0
            t0 = time.perf_counter()
            kl = probe.kl_with_zeroed(masks)
            row = {
                "batch_size": batch,
                "repeat": repeat,
                "reference_seconds": round(reference_s, 3),
                "kl_seconds": round(time.perf_counter() - t0, 3),
                "kl": kl,
            }
            results["kl"].append(row)
            print(json.dumps(row), flush=True)
    params = {n: p for n, p in model.named_parameters() if n in masks}
    scored = [{"input_ids": w[None], "labels": w[None]} for w in micro[:2]]
    for repeat in range(args.repeats):
        for chunk in (None, args.chunk_size) if repeat % 2 == 0 else (args.chunk_size, None):
            t0 = time.perf_counter()
            with loss_chunks(chunk):
                scores = IMPORTANCE_METRICS["gradient"](model, scored, params, False)
            row = {
                "chunk_size": chunk,
                "repeat": repeat,
                "seconds": round(time.perf_counter() - t0, 3),
                "checksum": float(sum(s.sum() for s in scores.values())),
            }
            results["chunked_gradient"].append(row)
            print(json.dumps(row), flush=True)
    for path in ("dense", "sparse"):
        command = [
            sys.executable,
            __file__,
            "--child",
            path,
            "--density",
            str(args.density),
            "--micro-steps",
            str(args.micro_steps),
            "--length",
            str(args.length),
            "--threads",
            str(args.threads),
        ]
        run = subprocess.run(command, capture_output=True, text=True, check=True)
        row = json.loads(run.stdout.strip().splitlines()[-1])
        results.setdefault("peak_rss", []).append(row)
        print(json.dumps(row), flush=True)
    results.update(
        date=datetime.date.today().isoformat(),
        command=" ".join(sys.argv),
        settings=vars(args),
        masked_entries=int(sum(int(m.sum()) for m in masks.values())),
        masked_tensor_entries=int(sum(m.numel() for m in masks.values())),
        wall_seconds=round(time.perf_counter() - start, 1),
        note="machine shared with other jobs; pairs interleaved",
    )
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
