#!/usr/bin/env python3
"""Prune, then recover (issue 18): SparseGPT on SmolLM2 (protocol v1 calibration), then a short
fine-tune on WikiText-2 validation text with the mask kept, through Trainer + PruningCallback.

    .venv/bin/python benchmarks/prune_recover.py --case sparsegpt-2:4
    .venv/bin/python benchmarks/prune_recover.py --case sparsegpt-50

Perplexity (protocol v1: first 32 windows of 512 of wikitext-2-raw test) after 0 (one-shot),
``--eval-at`` steps; wall time of pruning and of training (evaluations excluded). The dense
perplexity is measured here too unless ``--dense-ppl`` gives it (same code path and windows:
``prune_table.py`` measures it). Writes ``benchmarks/out/prune_recover/<case>.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CASES = {"sparsegpt-50": ("sparsegpt", {"sparsity": 0.5}),
         "sparsegpt-2:4": ("sparsegpt", {"mask": "2:4"}),
         "sparsegpt-70-owl": ("sparsegpt", {"sparsity": 0.7,
                                            "sparsity_profile": "owl"})}  # fmt: skip


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--case", choices=list(CASES), required=True)
    p.add_argument("--model", type=Path, help="HF model dir (default: the cached SmolLM2-135M)")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "out" / "prune_recover")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--eval-at", type=int, nargs="+", default=[50, 200])
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--seq-len", type=int, default=128, help="tokens per training window")
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--calib-windows", type=int, default=64, help="protocol v1: 64")
    p.add_argument("--eval-windows", type=int, default=32, help="protocol v1: 32")
    p.add_argument("--dense-ppl", type=float, help="skip the dense evaluation, use this figure")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hf_sparse.data import calibration_windows, evaluation_windows
    from hf_sparse.evaluation import perplexity
    from hf_sparse.pruning import prune_, pruning_config_from_dict
    from hf_sparse.pruning.recover import RecoveryConfig, recover_
    from hf_sparse.real_model import fetch_model

    torch.set_num_threads(args.threads)
    model_dir = args.model or fetch_model()
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    calib = calibration_windows(
        tokenizer, "wikitext2", count=args.calib_windows, length=512, seed=0
    )
    evals = evaluation_windows(tokenizer, "wikitext2", length=512, count=args.eval_windows)
    record: dict = {"case": args.case, "load_at_start": os.getloadavg(), "args": {
        k: str(v) for k, v in vars(args).items()}}  # fmt: skip
    if args.dense_ppl is None:
        record["dense_ppl"] = perplexity(model, evals, 4, show_progress=False).perplexity
    else:
        record["dense_ppl"] = args.dense_ppl
    method, settings = CASES[args.case]
    config = pruning_config_from_dict(method, dict(settings))
    result = prune_(model, config, calib, show_progress=False)
    record["prune_s"] = result.seconds
    start = time.perf_counter()
    one_shot = perplexity(model, evals, 4, show_progress=False).perplexity
    eval_s = time.perf_counter() - start
    recovery = RecoveryConfig(
        steps=args.steps, learning_rate=args.lr, batch_size=args.batch_size,
        sequence_length=args.seq_len, eval_at=list(args.eval_at), warmup_steps=args.warmup,
    )  # fmt: skip
    recovered = recover_(model, result.masks, recovery, tokenizer, "wikitext2", evals,
                         show_progress=False)  # fmt: skip
    ppl = {0: one_shot, **recovered.perplexity}
    gap = one_shot - record["dense_ppl"]
    record.update(
        perplexity_by_step=ppl,
        gap_recovered={s: (one_shot - v) / gap for s, v in ppl.items()} if gap > 0 else None,
        train_s=recovered.seconds, eval_s_each=eval_s, sparsity_after=recovered.sparsity_after,
        sparsity_one_shot=result.measured_sparsity, recovery=recovered.to_dict(),
        peak_rss_mib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0,
        load_at_end=os.getloadavg(),
    )  # fmt: skip
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"{args.case.replace(':', '_')}.json"
    path.write_text(json.dumps(record, indent=2))
    print(json.dumps(record, indent=2))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    raise SystemExit(main())
