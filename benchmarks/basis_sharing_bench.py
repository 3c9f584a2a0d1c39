#!/usr/bin/env python3
"""Basis Sharing on SmolLM2-135M, protocol v1 (see ../shared/BENCHMARKS.md).

    python benchmarks/basis_sharing_bench.py compress --ratios 0.4 0.2 0.3
    python benchmarks/basis_sharing_bench.py errors --ratios 0.2 0.3 0.4
    python benchmarks/basis_sharing_bench.py recovery --ratio 0.4 --setting g2
    python benchmarks/basis_sharing_bench.py recovery --ratio 0.4 --recovery lora --lr 2e-4
    python benchmarks/basis_sharing_bench.py dynamic --ratio 0.4 --setting g2
    python benchmarks/basis_sharing_bench.py throughput --ratio 0.4 --setting g2-kvdown-refit
    python benchmarks/basis_sharing_bench.py dynamic_speed --ratio 0.4 --setting g4-down-refit
    python benchmarks/basis_sharing_bench.py downstream --limit 200

``downstream``: lm-eval (LAMBADA, HellaSwag, the local files of ``shared/data``) of the dense
model and of each compressed model (dense weights dropped, as the compressed-model artifact
runs) at ``--ratios`` for the per-layer whitened baseline (``g1``) and the best sharing setting
of each ratio measured by ``compress`` (``--settings`` overrides: one list for every ratio),
with each model's protocol-v1 perplexity beside it.

``compress``: perplexity of plain SVD, per-layer whitened SVD (group of 1, SVD-LLM) and Basis
Sharing with groups of 2 and 4, each before and after the coefficient update, with parameter
counts of the targeted matrices and adapter file sizes. The dense model's ``X^T X`` are
collected once (64 x 512 calibration windows, seed 0) and cached under ``--out``; every setting
reuses them. The coefficient update re-collects statistics of each compressed model on the first
``--update-windows`` calibration windows. Rows are written to JSON as they finish.

``dynamic_speed``: tokens/s of the compressed model under each dynamic-rank strategy and energy
(factors sliced to the active rank) against the same model at full rank and the dense model,
interleaved round by round (so load drifts hit every row alike), with the perplexity, the mean
active rank and the layer-output energy kept (``||C_j||^2 sigma_j^2`` of the used directions);
rank-mask heatmaps are written beside the JSON.

``errors``: no perplexity; per role and ratio, the relative whitened error of each layer (on its
own ``X^T X``) when private (group of 1) or shared in groups of ``--groups``, with the SVD's
coefficients and with the per-layer refit, from the cached statistics. ``recovery``: Trainer
fine-tuning of the coefficients (``--recovery coefficients``) or of a LoRA on them (``lora``).
Any ``--model`` path works (a tiny random model checks the script in seconds).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from hf_sparse.basis_sharing import (  # noqa: E402
    BasisSharingConfig,
    collect_input_stats,
    get_basis_sharing_model,
    update_coefficients_,
)
from hf_sparse.basis_sharing.core import (  # noqa: E402
    compression_rank,
    refit_coefficients,
    shared_basis_svd,
    whitened_error,
    whitening_factor,
)
from hf_sparse.basis_sharing.dynamic_rank import (  # noqa: E402
    dynamic_rank,
    energy_for_fraction,
)
from hf_sparse.basis_sharing.plan import _linears_by_role, block_groups  # noqa: E402
from hf_sparse.calibration import InputStats  # noqa: E402
from hf_sparse.data import calibration_windows, evaluation_windows  # noqa: E402
from hf_sparse.evaluation import perplexity  # noqa: E402
from hf_sparse.loading import load_model_and_tokenizer  # noqa: E402
from hf_sparse.models import target_linears  # noqa: E402

MODEL = "smollm2-135m"


def log(message: str) -> None:
    stamp = datetime.datetime.now().strftime("%H:%M:%S")
    print(f"[bench {stamp}] {message}", file=sys.stderr, flush=True)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("part", choices=sorted(PARTS))
    p.add_argument("--model", default=MODEL)
    p.add_argument("--tag", default="", help="suffix of the JSON file name")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "out")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--ratios", type=float, nargs="+", default=[0.4, 0.2, 0.3])
    p.add_argument("--settings", nargs="+", choices=SETTINGS,
                   help="compress: default svd g1 g2 g4; downstream: default g1 and each "
                   "ratio's best")  # fmt: skip
    p.add_argument("--ratio", type=float, default=0.4, help="recovery/dynamic/throughput")
    p.add_argument("--setting", default="g2", choices=[*SETTINGS, "dense"],
                   help="recovery/dynamic/throughput; dense: recovery's control (LoRA on the "
                   "uncompressed linears, same budget)")  # fmt: skip
    p.add_argument("--update", action="store_true", help="recovery/dynamic: start updated")
    p.add_argument("--no-paper-update", action="store_true", help="compress: skip the paper's")
    p.add_argument("--no-dense", action="store_true", help="compress: skip the dense perplexity")
    p.add_argument("--calib-windows", type=int, default=64)
    p.add_argument("--update-windows", type=int, default=16)
    p.add_argument("--eval-windows", type=int, default=32)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--train-steps", type=int, default=30)
    p.add_argument("--train-batch", type=int, default=2)
    p.add_argument("--train-seq-len", type=int, default=256)
    p.add_argument("--lr", type=float, default=5e-5)
    p.add_argument("--recovery", choices=["coefficients", "lora"], default="coefficients")
    p.add_argument("--lora-r", type=int, default=8)
    p.add_argument("--energy", type=float, default=0.95)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--groups", type=int, nargs="+", default=[1, 2, 4], help="errors: group sizes")
    p.add_argument("--private-blocks", type=int, nargs="*", default=[], help="errors: unshared")
    p.add_argument("--limit", type=int, default=200, help="downstream: examples per task")
    return p.parse_args(argv)


# ---------------------------------------------------------------- shared helpers
def windows(args: argparse.Namespace, tokenizer) -> tuple[torch.Tensor, torch.Tensor]:
    calib = calibration_windows(tokenizer, "wikitext2", args.calib_windows, args.seq_len, args.seed)
    evaluation = evaluation_windows(tokenizer, "wikitext2", args.seq_len, args.eval_windows)
    return calib, evaluation


def stats_path(args: argparse.Namespace) -> Path:
    return args.out / f"basis_sharing_xtx_{args.calib_windows}x{args.seq_len}_s{args.seed}"


def dense_stats(args: argparse.Namespace, model, calib) -> dict[str, InputStats]:
    """``X^T X`` of the dense model, collected once and cached (safetensors + aliases)."""
    from safetensors.torch import load_file, save_file

    path = stats_path(args)
    if (path / "xtx.safetensors").exists():
        tensors = load_file(str(path / "xtx.safetensors"))
        meta = json.loads((path / "meta.json").read_text())
        owners = {key: InputStats(xtx=t, tokens=meta["tokens"]) for key, t in tensors.items()}
        return {name: owners[owner] for name, owner in meta["aliases"].items()}
    start = time.perf_counter()
    stats = collect_input_stats(model, calib, batch_size=8)
    log(f"collected dense X^T X in {time.perf_counter() - start:.0f}s")
    unique, aliases = {}, {}
    for name, item in stats.items():
        owner = next((k for k, v in unique.items() if v is item), None)
        if owner is None:
            unique[name] = item
            owner = name
        aliases[name] = owner
    path.mkdir(parents=True, exist_ok=True)
    save_file({k: v.xtx.contiguous() for k, v in unique.items()}, str(path / "xtx.safetensors"))
    tokens = next(iter(stats.values())).tokens
    (path / "meta.json").write_text(json.dumps({"aliases": aliases, "tokens": tokens}))
    return stats


SETTINGS = {  # name -> (whitening, group_size, shared roles; None = the paper's default)
    # "-refit": each layer's coefficients refit on its own X^T X after the grouped SVD
    "svd": (False, 1, None),
    "g1": (True, 1, None),
    "g2": (True, 2, None),
    "g4": (True, 4, None),
    "g2-down": (True, 2, ["q", "k", "v", "gate", "up", "down"]),
    "g2-all": (True, 2, ["q", "k", "v", "o", "gate", "up", "down"]),
    "g2-kv": (True, 2, ["k", "v"]),
    "g2-kvdown": (True, 2, ["k", "v", "down"]),
    "g4-kvdown": (True, 4, ["k", "v", "down"]),
    "g2-refit": (True, 2, None),
    "g4-refit": (True, 4, None),
    "g2-kvdown-refit": (True, 2, ["k", "v", "down"]),
    "g2-kv-refit": (True, 2, ["k", "v"]),
    "g4-kv-refit": (True, 4, ["k", "v"]),
    "g4-kvdown-refit": (True, 4, ["k", "v", "down"]),
    "g2-down-refit": (True, 2, ["down"]),
    "g4-down-refit": (True, 4, ["down"]),
    "g2-gateup-refit": (True, 2, ["gate", "up"]),
    "g4-gateup-refit": (True, 4, ["gate", "up"]),
    "g4-mlp-refit": (True, 4, ["gate", "up", "down"]),
    # "-p0": block 0 keeps private bases (private_blocks=[0])
    "g2-kvdown-refit-p0": (True, 2, ["k", "v", "down"]),
    "g4-kvdown-refit-p0": (True, 4, ["k", "v", "down"]),
    "g2-refit-p0": (True, 2, None),
    "g4-kv-refit-p0": (True, 4, ["k", "v"]),
    "g4-down-refit-p0": (True, 4, ["down"]),
}


def make_config(setting: str, ratio: float) -> BasisSharingConfig:
    whitening, group, shared = SETTINGS[setting]
    return BasisSharingConfig(
        ratio=ratio,
        group_size=group,
        whitening=whitening,
        shared_roles=shared,
        layer_refit="-refit" in setting,
        private_blocks=[0] if setting.endswith("-p0") else None,
        drop_dense_weights=False,
    )


def adapter_size(model) -> int:
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)
        return (Path(tmp) / "adapter_model.safetensors").stat().st_size


def ppl(model, evaluation) -> float:
    return perplexity(model, evaluation, batch_size=4, show_progress=False).perplexity


def drop_dense(model) -> None:
    for layer in model.base_model.layers("default").values():
        layer.drop_dense_weight()


def write(args: argparse.Namespace, part: str, record: dict) -> None:
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"basis_sharing_{part}{args.tag}.json").write_text(json.dumps(record, indent=2))


def compressed(args, stats, ratio, setting, update, calib):
    """A fresh compressed model (dense weights dropped)."""
    model, _ = load_model_and_tokenizer(args.model)
    config = make_config(setting, ratio)
    peft_model = get_basis_sharing_model(model, config, stats=stats)
    if update:
        update_coefficients_(peft_model, calib[: args.update_windows])
    drop_dense(peft_model)
    return peft_model.eval()


# ---------------------------------------------------------------- parts
BEST_SETTING = {0.2: "g4-mlp-refit", 0.3: "g4-down-refit", 0.4: "g4-down-refit"}  # `compress`


def part_downstream(args, meta) -> dict:
    """lm-eval of the dense model and of the baseline and best setting at each ratio."""
    from hf_sparse.analysis.downstream import downstream_eval

    model, tokenizer = load_model_and_tokenizer(args.model)
    calib, evaluation = windows(args, tokenizer)
    rows = []
    record = {**meta, "limit": args.limit, "rows": rows}

    def add(row: dict, lm) -> None:
        start = time.perf_counter()
        row["ppl"] = ppl(lm, evaluation)
        row["tasks"] = downstream_eval(lm, tokenizer, limit=args.limit)
        row["eval_s"] = time.perf_counter() - start
        log(f"{row['ratio']} {row['setting']}: ppl {row['ppl']:.2f} {row['tasks']}")
        rows.append(row)
        write(args, "downstream", record)

    add({"ratio": 0.0, "setting": "dense"}, model)
    stats = dense_stats(args, model, calib)
    del model
    for ratio in args.ratios:
        settings = args.settings or ["g1", BEST_SETTING.get(ratio, "g1")]
        for setting in dict.fromkeys(settings):
            peft_model = compressed(args, stats, ratio, setting, False, calib)
            add({"ratio": ratio, "setting": setting}, peft_model)
            del peft_model
    print(downstream_table(record))
    return record


def downstream_table(record: dict) -> str:
    lines = [
        f"lm-eval, first {record['limit']} examples of each task",
        "| ratio | setting | ppl (protocol v1) | LAMBADA acc | LAMBADA ppl | HellaSwag acc | "
        "HellaSwag acc_norm |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in record["rows"]:
        lam, hs = r["tasks"]["lambada"], r["tasks"]["hellaswag"]
        ratio = "dense" if r["setting"] == "dense" else f"{r['ratio']:.0%}"
        lines.append(
            f"| {ratio} | {r['setting']} | {r['ppl']:.2f} | {lam['acc']:.3f} | "
            f"{lam['perplexity']:.1f} | {hs['acc']:.3f} | {hs['acc_norm']:.3f} |"
        )
    return "\n".join(lines)


def part_compress(args, meta) -> dict:
    model, tokenizer = load_model_and_tokenizer(args.model)
    calib, evaluation = windows(args, tokenizer)
    dense_ppl = None if args.no_dense else ppl(model, evaluation)
    log(f"dense ppl {dense_ppl}")
    stats = dense_stats(args, model, calib)
    del model
    rows = []
    record = {**meta, "dense_ppl": dense_ppl, "rows": rows}
    for ratio in args.ratios:
        for setting in args.settings or ["svd", "g1", "g2", "g4"]:
            model, _ = load_model_and_tokenizer(args.model)
            config = make_config(setting, ratio)
            start = time.perf_counter()
            peft_model = get_basis_sharing_model(
                model, config, stats=stats if config.whitening else None
            )
            seconds = time.perf_counter() - start
            counts = peft_model.base_model.parameter_counts()
            row = {"ratio": ratio, "setting": setting, "group_size": config.group_size,
                   "whitening": config.whitening, "compress_s": seconds, **counts,
                   "measured_reduction": counts["removed"] / counts["dense"],
                   "adapter_bytes": adapter_size(peft_model)}  # fmt: skip
            row["ppl"] = ppl(peft_model, evaluation)
            log(f"{ratio} {setting}: {row['ppl']:.3f}")
            if setting != "svd" and not args.no_paper_update:
                start = time.perf_counter()
                update_coefficients_(peft_model, calib[: args.update_windows])
                row["update_s"] = time.perf_counter() - start
                row["ppl_updated"] = ppl(peft_model, evaluation)
                log(f"{ratio} {setting} updated: {row['ppl_updated']:.3f}")
            rows.append(row)
            write(args, "compress", record)
            del peft_model, model
    print(compress_table(record))
    return record


def compress_table(record: dict) -> str:
    lines = [
        f"dense ppl {record['dense_ppl']}",
        "| ratio | method | group | params dense -> compressed (targeted) | reduction | adapter "
        "MiB | ppl | ppl + update | compress s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    names = {"svd": "plain SVD", "g1": "whitened SVD (SVD-LLM)"}
    for r in record["rows"]:
        upd = r.get("ppl_updated")
        method = names.get(r["setting"], "Basis Sharing " + r["setting"])
        lines.append(
            f"| {r['ratio']:.0%} | {method} | {r['group_size']} | "
            f"{r['dense']:,} -> {r['compressed']:,} | {r['measured_reduction']:.2%} | "
            f"{r['adapter_bytes'] / 2**20:.1f} | {r['ppl']:.2f} | "
            f"{'–' if upd is None else f'{upd:.2f}'} | {r['compress_s']:.1f} |"
        )
    return "\n".join(lines)


def part_recovery(args, meta) -> dict:
    """Coefficient or LoRA fine-tuning with Trainer on calibration-split text (seed 1 windows).

    LoRA sits on the coefficients of the factorized model (``unload_factorized``)."""
    from peft import LoraConfig, get_peft_model
    from transformers import Trainer, TrainingArguments

    from hf_sparse.basis_sharing import unload_factorized

    model, tokenizer = load_model_and_tokenizer(args.model)
    calib, evaluation = windows(args, tokenizer)
    stats = dense_stats(args, model, calib)
    del model
    if args.setting == "dense":  # control: how much of the gain is adaptation to the text
        if args.recovery != "lora":
            raise ValueError("--setting dense is a control for --recovery lora only")
        peft_model, _ = load_model_and_tokenizer(args.model)
        targets = [n for block in target_linears(peft_model, None, ("lm_head",)).values()
                   for n in block]  # fmt: skip
    else:
        peft_model = compressed(args, stats, args.ratio, args.setting, args.update, calib)
        targets = ["coefficient"]
    before = ppl(peft_model, evaluation)
    log(f"before recovery {before:.3f}")
    if args.recovery == "lora":
        lora = LoraConfig(r=args.lora_r, lora_alpha=2 * args.lora_r, target_modules=targets)
        if args.setting != "dense":
            peft_model = unload_factorized(peft_model)
        peft_model = get_peft_model(peft_model, lora)
    train = calibration_windows(
        tokenizer, "wikitext2", args.train_steps * args.train_batch, args.train_seq_len, seed=1
    )
    dataset = [{"input_ids": w, "labels": w.clone()} for w in train]
    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    with tempfile.TemporaryDirectory() as tmp:
        training = TrainingArguments(
            output_dir=tmp, per_device_train_batch_size=args.train_batch,
            max_steps=args.train_steps, learning_rate=args.lr, lr_scheduler_type="constant",
            logging_steps=5, save_strategy="no", report_to=[], use_cpu=True,
            dataloader_num_workers=0, seed=0,
        )  # fmt: skip
        peft_model.train()
        start = time.perf_counter()
        result = Trainer(model=peft_model, args=training, train_dataset=dataset).train()
        train_s = time.perf_counter() - start
    after = ppl(peft_model.eval(), evaluation)
    log(f"after recovery {after:.3f}")
    record = {**meta, "ratio": args.ratio, "setting": args.setting, "updated": args.update,
              "recovery": args.recovery, "lr": args.lr, "steps": args.train_steps,
              "trainable_params": trainable, "train_tokens": train.numel(),
              "train_loss": result.training_loss, "train_s": train_s,
              "ppl_before": before, "ppl_after": after}  # fmt: skip
    write(args, f"recovery_{args.recovery}", record)
    print(json.dumps(record, indent=2))
    return record


def part_dynamic(args, meta) -> dict:
    model, tokenizer = load_model_and_tokenizer(args.model)
    calib, evaluation = windows(args, tokenizer)
    stats = dense_stats(args, model, calib)
    del model
    peft_model = compressed(args, stats, args.ratio, args.setting, args.update, calib)
    rows = []
    record = {**meta, "ratio": args.ratio, "setting": args.setting, "rows": rows}
    runs = [("baseline", 1.0), ("prompt_adaptive", args.energy), ("global_static", args.energy)]
    for strategy, energy in runs:
        with dynamic_rank(peft_model, strategy, energy) as report:
            value = ppl(peft_model, evaluation)
        rows.append({"ppl": value, "budget": "energy", **report.to_dict()})
        log(f"{strategy} energy {energy}: {value:.3f} rank fraction {report.mean_fraction:.3f}")
        write(args, "dynamic", record)
        if strategy == "prompt_adaptive":
            adaptive_fraction = report.mean_fraction
    # global_static at the same average rank as prompt_adaptive (energy found by bisection)
    matched = energy_for_fraction(peft_model, adaptive_fraction)
    with dynamic_rank(peft_model, "global_static", matched) as report:
        value = ppl(peft_model, evaluation)
    rows.append({"ppl": value, "budget": "prompt_adaptive's mean rank", **report.to_dict()})
    log(f"global_static matched energy {matched:.4f}: {value:.3f} ({report.mean_fraction:.3f})")
    write(args, "dynamic", record)
    print(json.dumps(record, indent=2))
    return record


@torch.no_grad()
def role_errors(weights, grams, group, ratios, private=(), damping=1e-4) -> dict:
    """Per-layer whitened relative errors of one role at ``group`` (SVD and per-layer refit).

    Each layer's error is measured on its own ``X^T X``; the basis is whitened with the group's
    summed statistics, as ``factorize`` does. One SVD per group, truncated for every ratio."""
    d_out, d_in = weights[0].shape
    out = {r: {"ranks": [], "params": 0, "svd": [], "refit": []} for r in ratios}
    for chunk in block_groups(len(weights), group, set(private)):
        ws, gs = [weights[i] for i in chunk], [grams[i] for i in chunk]
        ranks = {r: compression_rank(d_in, d_out, len(ws), r) for r in ratios}
        factors = shared_basis_svd(ws, max(ranks.values()), whitening_factor(sum(gs), damping))
        for r, k in ranks.items():
            basis = factors.basis[:k]
            out[r]["params"] += k * (d_in + len(ws) * d_out)
            for w, g, c in zip(ws, gs, factors.coefficients, strict=True):
                out[r]["ranks"].append(k)
                out[r]["svd"].append(whitened_error(w, c[:, :k] @ basis, g))
                refit = refit_coefficients(w, basis, g) if len(ws) > 1 else c[:, :k]
                out[r]["refit"].append(whitened_error(w, refit @ basis, g))
    return out


def part_errors(args, meta) -> dict:
    """Whitened reconstruction error per role, private vs shared, from the cached statistics."""
    model, tokenizer = load_model_and_tokenizer(args.model)
    calib, _ = windows(args, tokenizer)
    stats = dense_stats(args, model, calib)
    modules = dict(model.named_modules())
    per_block = _linears_by_role(model, None)
    rows = []
    record = {**meta, "rows": rows}
    for role in [r for r in ("q", "k", "v", "o", "gate", "up", "down") if r in per_block[0]]:
        names = [block[role] for block in per_block]
        weights = [modules[n].weight.detach().to(torch.float64) for n in names]
        grams = [stats[n].xtx.to(torch.float64) for n in names]
        for group in args.groups:
            start = time.perf_counter()
            result = role_errors(weights, grams, group, args.ratios, args.private_blocks)
            for ratio, item in result.items():
                n = len(names)
                rows.append({"role": role, "group": group, "ratio": ratio,
                             "private_blocks": args.private_blocks,
                             "shape": list(weights[0].shape),
                             "rank_mean": sum(item["ranks"]) / n,
                             "params": item["params"], "dense_params": n * weights[0].numel(),
                             "err_svd": sum(item["svd"]) / n,
                             "err_refit": sum(item["refit"]) / n,
                             "err_refit_layers": item["refit"]})  # fmt: skip
            log(f"{role} group {group}: {time.perf_counter() - start:.0f}s")
            write(args, "errors", record)
    print(errors_table(record))
    return record


def errors_table(record: dict) -> str:
    lines = ["| role | [out, in] | ratio | group | rank | rel. whitened error (SVD / refit) |",
             "|---|---|---|---|---|---|"]  # fmt: skip
    for r in sorted(record["rows"], key=lambda r: (r["ratio"], r["role"], r["group"])):
        lines.append(
            f"| {r['role']} | {r['shape']} | {r['ratio']:.0%} | {r['group']} | "
            f"{r['rank_mean']:.1f} | {r['err_svd']:.4f} / {r['err_refit']:.4f} |"
        )
    return "\n".join(lines)


GENERATE_PROMPT = 32  # generation starts from the first 32 tokens of the prefill window


@torch.no_grad()
def speed(model, ids: torch.Tensor, new_tokens: int, repeats: int) -> dict:
    """Prefill: one cache-free forward over all of ``ids``. Generate: ``new_tokens`` greedy
    tokens with the KV cache after a ``GENERATE_PROMPT``-token prompt, the prompt's own
    prefill inside the timed span."""
    prefill, decode = [], []
    for _ in range(repeats):
        start = time.perf_counter()
        model(input_ids=ids, use_cache=False)
        prefill.append(ids.numel() / (time.perf_counter() - start))
        start = time.perf_counter()
        out = model.generate(
            input_ids=ids[:, :GENERATE_PROMPT],
            attention_mask=torch.ones_like(ids[:, :GENERATE_PROMPT]),
            max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
            pad_token_id=0,
        )  # fmt: skip
        decode.append((out.shape[1] - GENERATE_PROMPT) / (time.perf_counter() - start))
    return {
        "prefill_tok_s": statistics.median(prefill),
        "generate_tok_s": statistics.median(decode),
    }


def part_throughput(args, meta) -> dict:
    model, tokenizer = load_model_and_tokenizer(args.model)
    calib, evaluation = windows(args, tokenizer)
    ids = evaluation[:1]
    dense = speed(model.eval(), ids, 64, args.repeats)
    dense_params = sum(p.numel() for p in model.parameters())
    stats = dense_stats(args, model, calib)
    del model
    peft_model = compressed(args, stats, args.ratio, args.setting, False, calib)
    compressed_params = sum(p.numel() for p in peft_model.parameters())
    comp = speed(peft_model, ids, 64, args.repeats)
    from hf_sparse.basis_sharing import unload_factorized

    plain = unload_factorized(peft_model).eval()
    factorized = speed(plain, ids, 64, args.repeats)
    record = {**meta, "ratio": args.ratio, "setting": args.setting, "prefill_tokens": ids.numel(),
              "generate_prompt_tokens": GENERATE_PROMPT, "new_tokens": 64, "dense": dense,
              "compressed_peft": comp,
              "compressed_factorized": factorized, "dense_params": dense_params,
              "compressed_params": compressed_params}  # fmt: skip
    write(args, "throughput", record)
    print(json.dumps(record, indent=2))
    return record


DYNAMIC_RUNS = [  # (label, strategy, energy, max_rank, reorder)
    ("full rank", "baseline", 1.0, None, False),
    ("global_static 0.99", "global_static", 0.99, None, False),
    ("global_static 0.95", "global_static", 0.95, None, False),
    ("global_static 0.90", "global_static", 0.90, None, False),
    ("global_static 0.95 reordered", "global_static", 0.95, None, True),
    ("prompt_adaptive 0.95", "prompt_adaptive", 0.95, None, False),
    ("prompt_adaptive 0.95 reordered", "prompt_adaptive", 0.95, None, True),
    ("global_static 1.0, max_basis_rank 128", "global_static", 1.0, 128, False),
]


def kept_energy(model, report) -> float:
    """Mean over layers of the share of ``||C_j||^2 sigma_j^2`` in the directions used."""
    sigmas = model.base_model.basis_sharing_sigmas["default"]
    masks = report.rank_masks()
    shares = []
    for name, layer in model.base_model.layers("default").items():
        score = layer.basis_sharing_coefficient["default"].detach().double().pow(2).sum(0)
        score = score * sigmas[layer.basis_sharing_key["default"]].double().pow(2)
        shares.append(float((masks[name] * score).sum() / score.sum()))
    return sum(shares) / len(shares)


def part_dynamic_speed(args, meta) -> dict:
    from hf_sparse.basis_sharing.plots import plot_rank_masks

    dense, tokenizer = load_model_and_tokenizer(args.model)
    dense.eval()
    calib, evaluation = windows(args, tokenizer)
    stats = dense_stats(args, dense, calib)
    model = compressed(args, stats, args.ratio, args.setting, False, calib)
    ids = evaluation[:1]
    rows = {label: {"label": label, "strategy": strategy, "energy": energy, "max_rank": cap,
                    "reorder": reorder, "prefill": [], "generate": []}
            for label, strategy, energy, cap, reorder in DYNAMIC_RUNS}  # fmt: skip
    rows["dense"] = {"label": "dense", "prefill": [], "generate": []}
    for round_ in range(args.repeats):  # interleaved: every row once per round
        for label, strategy, energy, cap, reorder in [("dense", None, 0, 0, 0), *DYNAMIC_RUNS]:
            if strategy is None:
                timing = speed(dense, ids, 32, 1)
            else:
                with dynamic_rank(model, strategy, energy, cap, reorder):
                    timing = speed(model, ids, 32, 1)
            rows[label]["prefill"].append(timing["prefill_tok_s"])
            rows[label]["generate"].append(timing["generate_tok_s"])
            log(f"round {round_} {label}: {timing}")
    rows["dense"]["ppl"] = ppl(dense, evaluation)
    for label, strategy, energy, cap, reorder in DYNAMIC_RUNS:
        with dynamic_rank(model, strategy, energy, cap, reorder) as report:
            rows[label]["ppl"] = ppl(model, evaluation)
        rows[label].update(report.to_dict())
        rows[label]["kept_energy"] = kept_energy(model, report)
        name = label.replace(" ", "_").replace(",", "")
        plot_rank_masks(report.rank_masks(), args.out / f"basis_sharing_rank_masks_{name}.png",
                        title=f"{args.setting} {args.ratio:.0%}: {label}")  # fmt: skip
        log(f"{label}: ppl {rows[label]['ppl']:.2f}")
    for row in rows.values():
        row["prefill_tok_s"] = statistics.median(row.pop("prefill"))
        row["generate_tok_s"] = statistics.median(row.pop("generate"))
    record = {**meta, "ratio": args.ratio, "setting": args.setting, "prefill_tokens": ids.numel(),
              "generate_prompt_tokens": GENERATE_PROMPT, "new_tokens": 32,
              "load_average_at_end": os.getloadavg(), "rows": list(rows.values())}  # fmt: skip
    write(args, "dynamic_speed", record)
    print(dynamic_speed_table(record))
    return record


def dynamic_speed_table(record: dict) -> str:
    full = next(r for r in record["rows"] if r["label"] == "full rank")
    lines = [
        "| run | mean active rank / k | layer-output energy kept | ppl | prefill tok/s | "
        "generate tok/s |",
        "|---|---|---|---|---|---|",
    ]
    for row in record["rows"]:
        rank = f"{row['mean_fraction']:.3f}" if "mean_fraction" in row else "(dense)"
        energy = f"{row['kept_energy']:.4f}" if "kept_energy" in row else "-"
        pre = f"{row['prefill_tok_s']:.1f} ({row['prefill_tok_s'] / full['prefill_tok_s']:.2f}x)"
        gen = f"{row['generate_tok_s']:.2f} ({row['generate_tok_s'] / full['generate_tok_s']:.2f}x)"
        lines.append(f"| {row['label']} | {rank} | {energy} | {row['ppl']:.2f} | {pre} | {gen} |")
    return "\n".join(lines)


PARTS = {
    "compress": part_compress,
    "errors": part_errors,
    "recovery": part_recovery,
    "dynamic": part_dynamic,
    "throughput": part_throughput,
    "dynamic_speed": part_dynamic_speed,
    "downstream": part_downstream,
}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.out = args.out.resolve()
    torch.set_num_threads(args.threads)
    meta = {
        "command": shlex.join([".venv/bin/python", "benchmarks/basis_sharing_bench.py",
                               *sys.argv[1:]]),
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "threads": torch.get_num_threads(),
        "calibration": f"wikitext2 validation {args.calib_windows}x{args.seq_len} seed {args.seed}",
        "evaluation": f"wikitext2 test first {args.eval_windows}x{args.seq_len}",
        "update_windows": args.update_windows,
    }  # fmt: skip
    PARTS[args.part](args, meta)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    raise SystemExit(main())
