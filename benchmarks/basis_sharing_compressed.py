#!/usr/bin/env python3
"""The compressed Basis Sharing model on SmolLM2-135M: bytes, perplexity, speed vs dense.

    .venv/bin/python benchmarks/basis_sharing_compressed.py

SmolLM2-135M-Instruct in fp32, dequantized from the Q4_1 GGUF (not the Hub's bf16 weights).
For each shipped recipe (``recipes/basis-sharing-compressed-20.yaml`` at 20%,
``recipes/basis-sharing-40.yaml`` at 40%; their calibration and method settings, the dense
model's ``X^T X`` collected once for both since the two recipes' calibration is the same):

- bytes on disk of the weight files: dense model, adapter folder, compressed folder;
- perplexity, protocol v1 (WikiText-2 test, 32 x 512 tokens) of the adapter in memory and of
  the compressed model loaded back from its folder (must be equal);
- with ``--remote-check``: the 20% folder loaded in a fresh Python where hf_sparse cannot be
  imported (``trust_remote_code=True``), its logits on one window compared with ours;
- speed, dense vs compressed (both loaded from disk): prefill tokens/s (one 512-token window,
  no cache) and greedy generation tokens/s (``--new-tokens`` after a 32-token prompt, KV
  cache; prompt included in the time), in interleaved rounds, median. The machine is shared
  with other jobs, so the speeds are indicative only.

Prints a table and writes ``benchmarks/out/basis_sharing_compressed.json``.
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

import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from hf_sparse.basis_sharing import (  # noqa: E402
    basis_sharing_recipe_from_dict,
    collect_input_stats,
    get_basis_sharing_model,
    is_compressed_basis_sharing,
    load_compressed,
    save_compressed,
)
from hf_sparse.basis_sharing.plan import make_plan  # noqa: E402
from hf_sparse.evaluation import perplexity  # noqa: E402
from hf_sparse.loading import load_model_and_tokenizer  # noqa: E402
from hf_sparse.real_model import resolve_model_path  # noqa: E402

RECIPES = {"20%": "basis-sharing-compressed-20.yaml", "40%": "basis-sharing-40.yaml"}

REMOTE = """
import importlib.abc, sys
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "hf_sparse" or name.startswith("hf_sparse."):
            raise ModuleNotFoundError(name)
sys.meta_path.insert(0, Block())
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=True).eval()
with torch.no_grad():
    logits = model(input_ids=load_file(sys.argv[2])["ids"]).logits
assert not any(m.split(".")[0] == "hf_sparse" for m in sys.modules)
save_file({"logits": logits}, sys.argv[3])
print(type(model).__module__)
"""


def log(message: str) -> None:
    stamp = datetime.datetime.now().strftime("%H:%M:%S")
    print(f"[bench {stamp}] {message}", file=sys.stderr, flush=True)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "out")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=5, help="interleaved speed rounds")
    p.add_argument("--recipes", nargs="+", choices=list(RECIPES), default=list(RECIPES),
                   help="which of the shipped recipes to run")  # fmt: skip
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--remote-check", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--keep", action="store_true", help="keep the saved folders")
    p.add_argument("--table", type=Path, help="only print the table of a written JSON")
    p.add_argument("--speed-only", type=Path, metavar="JSON",
                   help="only the speed rounds (and bytes of shape twins), added to this JSON "
                   "written by a full run; models: dense, every compressed folder the run "
                   "kept, and a shape twin for each recipe without one")  # fmt: skip
    return p.parse_args(argv)


def weight_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.glob("*.safetensors"))


def ppl(model, windows) -> dict:
    result = perplexity(model, windows, batch_size=4, show_progress=False)
    return {"perplexity": result.perplexity, "seconds": result.seconds}


def remote_logits(folder: Path, ids: torch.Tensor, work: Path) -> tuple[torch.Tensor, str]:
    from safetensors.torch import load_file, save_file

    save_file({"ids": ids}, work / "ids.safetensors")
    script = work / "remote_check.py"
    script.write_text(REMOTE)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    env["HF_MODULES_CACHE"] = str(work / "hf_modules")
    done = subprocess.run(
        [sys.executable, "-I", str(script), str(folder), str(work / "ids.safetensors"),
         str(work / "logits.safetensors")],
        cwd=work, env=env, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    if done.returncode != 0:
        raise RuntimeError(f"remote-code load failed:\n{done.stderr[-3000:]}")
    return load_file(work / "logits.safetensors")["logits"], done.stdout.split()[-1]


@torch.no_grad()
def speed(model, prefill_ids: torch.Tensor, prompt: torch.Tensor, new_tokens: int) -> dict:
    start = time.perf_counter()
    model(input_ids=prefill_ids, use_cache=False)
    prefill_s = time.perf_counter() - start
    start = time.perf_counter()
    out = model.generate(
        prompt,
        attention_mask=torch.ones_like(prompt),
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        do_sample=False,
        use_cache=True,
    )
    gen_s = time.perf_counter() - start
    generated = out.shape[1] - prompt.shape[1]
    return {
        "prefill_tok_s": prefill_ids.numel() / prefill_s,
        "generate_tok_s": generated / gen_s,
        "generated": generated,
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.table:
        print(table(json.loads(args.table.read_text())))
        return 0
    if args.speed_only:
        return speed_only(args)
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    work = args.out / "basis_sharing_compressed"
    work.mkdir(exist_ok=True)
    started = time.perf_counter()
    recipes = {
        label: basis_sharing_recipe_from_dict(yaml.safe_load((ROOT / "recipes" / name).read_text()))
        for label, name in RECIPES.items()
        if label in args.recipes
    }
    calibrations = {(asdict_key(r.calibration)) for r in recipes.values()}
    if len(calibrations) != 1:
        raise ValueError("the recipes calibrate differently; this script shares one X^T X")
    dense_path = Path(resolve_model_path(args.model))
    model, tokenizer = load_model_and_tokenizer(args.model)
    first = next(iter(recipes.values()))
    calib = first.calibration.windows(tokenizer)
    windows = first.evaluation.windows(tokenizer)
    record: dict = {
        "model": f"{args.model} (SmolLM2-135M-Instruct, fp32 dequantized from the Q4_1 GGUF)",
        "command": shlex.join(["python", *sys.argv]),
        "date": datetime.date.today().isoformat(),
        "threads": args.threads,
        "machine": "shared CPU machine (2 cores, other jobs running): speeds are indicative",
        "dense": {"bytes": weight_bytes(dense_path)},
        "rows": {},
    }
    names = sorted({m for r in recipes.values() for g in make_plan(model, r.config()).values()
                    for m in g.members})  # fmt: skip
    log(f"collecting X^T X of {len(names)} linears on {tuple(calib.shape)} windows")
    stats = collect_input_stats(model, calib, names, batch_size=first.calibration.batch_size)
    log("dense perplexity")
    record["dense"]["ppl"] = ppl(model, windows)
    del model
    for label, recipe in recipes.items():
        model, _ = load_model_and_tokenizer(args.model)
        log(f"{label}: compressing ({recipe.config().ratio}, from {RECIPES[label]})")
        t0 = time.perf_counter()
        adapter = get_basis_sharing_model(model, recipe.config(), stats=stats)
        compress_s = time.perf_counter() - t0
        row = {"recipe": RECIPES[label], "compress_s": compress_s,
               "parameters": adapter.base_model.parameter_counts()}  # fmt: skip
        log(f"{label}: adapter perplexity")
        row["adapter_ppl"] = ppl(adapter, windows)
        adapter_dir = work / f"adapter-{label[:2]}"
        compressed_dir = work / f"compressed-{label[:2]}"
        adapter.save_pretrained(adapter_dir)
        save_compressed(adapter, compressed_dir, tokenizer=tokenizer, overwrite=True)
        row["adapter_bytes"] = weight_bytes(adapter_dir)
        row["compressed_bytes"] = weight_bytes(compressed_dir)
        del adapter, model
        loaded = load_compressed(compressed_dir).eval()
        log(f"{label}: perplexity of the compressed model loaded from {compressed_dir}")
        row["compressed_ppl"] = ppl(loaded, windows)
        row["ppl_equal"] = (
            abs(row["compressed_ppl"]["perplexity"] - row["adapter_ppl"]["perplexity"])
            <= 1e-6 * row["adapter_ppl"]["perplexity"]
        )
        if args.remote_check and label == "20%":
            log("20%: loading the folder where hf_sparse cannot be imported (remote code)")
            ids = windows[:1]
            remote, module = remote_logits(compressed_dir, ids, work)
            with torch.no_grad():
                ours = loaded(input_ids=ids).logits
            diff = float((remote - ours).abs().max())
            row["remote_code"] = {"module": module, "max_abs_logit_diff": diff}
        del loaded
        record["rows"][label] = row
        write(args, record)
    models = {"dense": load_model_and_tokenizer(args.model)[0].eval()}
    for label in recipes:
        models[label] = load_compressed(work / f"compressed-{label[:2]}").eval()
    record["speed"] = speed_rounds(args, models, windows)
    record["wall_s"] = time.perf_counter() - started
    write(args, record)
    print(table(record))
    if not args.keep:
        import shutil

        shutil.rmtree(work, ignore_errors=True)
    return 0


def speed_rounds(args: argparse.Namespace, models: dict, windows: torch.Tensor) -> dict:
    """Prefill and generation speed of every model, in interleaved rounds; medians."""
    log(f"speed: {args.rounds} interleaved rounds of {list(models)}")
    prefill_ids, prompt = windows[:1], windows[1:2, :32]
    for m in models.values():  # warm-up
        speed(m, prefill_ids[:, :64], prompt[:, :8], 4)
    runs: dict[str, list[dict]] = {k: [] for k in models}
    for round_ in range(args.rounds):
        for name, m in models.items():
            runs[name].append(speed(m, prefill_ids, prompt, args.new_tokens))
        log(f"round {round_ + 1}/{args.rounds} done")
    return {
        name: {
            "prefill_tok_s": statistics.median(r["prefill_tok_s"] for r in rs),
            "generate_tok_s": statistics.median(r["generate_tok_s"] for r in rs),
            "runs": rs,
        }
        for name, rs in runs.items()
    }


def shape_twin(args: argparse.Namespace, recipe, folder: Path) -> None:
    """A compressed model with exactly the recipe's structure (plan, ranks, dtype) and random
    factors, saved to ``folder``: its bytes and speed are the real model's (they depend on
    shapes only); its perplexity means nothing and is never measured."""
    from hf_sparse.basis_sharing.core import SharedFactors

    model, _ = load_model_and_tokenizer(args.model)
    config = recipe.config()
    adapter = get_basis_sharing_model(model, config, defer=True)
    tuner = adapter.base_model
    groups = make_plan(tuner.model, config)
    generator = torch.Generator().manual_seed(0)

    def rand(*shape):
        return 0.02 * torch.randn(*shape, generator=generator)

    factors = {
        key: SharedFactors(
            rand(g.rank, g.d_in), [rand(g.d_out, g.rank) for _ in g.members], torch.ones(g.rank)
        )
        for key, g in groups.items()
    }
    tuner.set_factors("default", factors, groups)
    for layer in tuner.layers("default").values():
        layer.drop_dense_weight()
    save_compressed(adapter, folder, overwrite=True)


def speed_only(args: argparse.Namespace) -> int:
    torch.set_num_threads(args.threads)
    record = json.loads(args.speed_only.read_text())
    work = args.out / "basis_sharing_compressed"
    recipes = {
        label: basis_sharing_recipe_from_dict(yaml.safe_load((ROOT / "recipes" / name).read_text()))
        for label, name in RECIPES.items()
    }
    model, tokenizer = load_model_and_tokenizer(args.model)
    windows = next(iter(recipes.values())).evaluation.windows(tokenizer)
    models = {"dense": model.eval()}
    record.setdefault("twins", {})
    for label, recipe in recipes.items():
        folder = work / f"compressed-{label[:2]}"
        if not folder.is_dir():
            folder = work / f"twin-{label[:2]}"
            if not is_compressed_basis_sharing(folder):
                log(f"{label}: no compressed folder kept; building its shape twin in {folder}")
                shape_twin(args, recipe, folder)
            record["twins"][label] = {"bytes": weight_bytes(folder), "recipe": RECIPES[label]}
        models[label] = load_compressed(folder).eval()
    record["speed"] = speed_rounds(args, models, windows)
    record["speed_command"] = shlex.join(["python", *sys.argv])
    write(args, record)
    print(table(record))
    return 0


def asdict_key(config) -> str:
    from dataclasses import asdict

    return json.dumps(asdict(config), sort_keys=True)


def write(args: argparse.Namespace, record: dict) -> None:
    path = args.out / "basis_sharing_compressed.json"
    path.write_text(json.dumps(record, indent=2, default=str) + "\n")


def _speed_cells(sp: dict, name: str) -> str:
    if name not in sp:
        return "not measured | not measured"
    s, d = sp[name], sp["dense"]
    if name == "dense":
        return f"{s['prefill_tok_s']:.0f} | {s['generate_tok_s']:.1f}"
    return (
        f"{s['prefill_tok_s']:.0f} ({s['prefill_tok_s'] / d['prefill_tok_s']:.2f}x) | "
        f"{s['generate_tok_s']:.1f} ({s['generate_tok_s'] / d['generate_tok_s']:.2f}x)"
    )


def table(record: dict) -> str:
    """The Markdown table of a record (also of a partial one: missing figures say so)."""
    dense = record["dense"]
    sp = record.get("speed", {})
    mib = 2**20
    lines = [
        "| model | weights on disk | perplexity (v1) | prefill tok/s | generate tok/s |",
        "|---|---|---|---|---|",
        f"| dense | {dense['bytes'] / mib:.1f} MiB | {dense['ppl']['perplexity']:.2f} | "
        f"{_speed_cells(sp, 'dense')} |",
    ]
    for label, row in record["rows"].items():
        lines.append(
            f"| compressed {label} | {row['compressed_bytes'] / mib:.1f} MiB "
            f"({row['compressed_bytes'] / dense['bytes']:.1%}; adapter "
            f"{row['adapter_bytes'] / mib:.1f} MiB + base) | "
            f"{row['compressed_ppl']['perplexity']:.2f} (adapter "
            f"{row['adapter_ppl']['perplexity']:.2f}) | {_speed_cells(sp, label)} |"
        )
    for label, twin in record.get("twins", {}).items():
        if label in record["rows"]:
            continue
        lines.append(
            f"| compressed {label} (shape twin: bytes and speed only) | "
            f"{twin['bytes'] / mib:.1f} MiB ({twin['bytes'] / dense['bytes']:.1%}) | "
            f"not measured | {_speed_cells(sp, label)} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
