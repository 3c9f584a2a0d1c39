#!/usr/bin/env python3
"""Merging SmolLM2-135M domain fine-tunes: per-domain eval loss of each merge method at several
densities, reconstruction error of pruned task vectors, and PEFT / mergekit side by side.

    .venv/bin/python benchmarks/merge_finetunes.py --steps 200      # the three fine-tunes, once
    .venv/bin/python benchmarks/merge_bench.py quality              # eval-loss table
    .venv/bin/python benchmarks/merge_bench.py reconstruction       # ||X (tau - tau_pruned)||
    .venv/bin/python benchmarks/merge_bench.py peers                # PEFT merge_utils, mergekit

quality: base, each fine-tune alone, task arithmetic, and at each density magnitude-prune,
TIES, DARE (linear and TIES), SparseGPT-TV with Hessians on the base model's inputs
(non-sequential) and on inputs through the already merged blocks (sequential), per-task
Hessians from each domain's own calibration windows. All weights 1.0. Eval: mean next-token
loss on the first ``--eval-windows`` windows of ``--eval-len`` tokens of each domain's held-out
text (never trained on, see merge_finetunes.py).

reconstruction: for every changed linear of every task, ``||X (tau - tau_pruned)||^2 / ||X
tau||^2`` on that task's calibration inputs through the base model, at each density (mean over
linears and tasks), for simple masking (magnitude trim; DARE's random drop with 1/density) and
error correction (SparseGPT-TV; DARE with error correction = SparseGPT-TV then 1/density).

peers: our rules against ``peft.utils.merge_utils`` on the real task-vector tensors (max abs
difference, wall time); mergekit (``mergekit-yaml`` in its own virtualenv, ``--mergekit-venv``,
made with ``benchmarks/setup_mergekit_venv.sh``) on tiny random models and on the SmolLM2
fine-tunes: max abs difference of the merged weights and wall time of both, same inputs.
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml
from merge_finetunes import DEFAULT_OUT, DOMAINS, domain_tokens

from hf_sparse.data import contiguous_windows, random_windows
from hf_sparse.evaluation import perplexity
from hf_sparse.loading import load_model_and_tokenizer
from hf_sparse.merging import (
    MergeConfig,
    MergeSource,
    ObsOptions,
    drop_random,
    inspect_source,
    load_task_vector,
    merge_,
    merge_task_vectors,
    prune_task_vector_obs,
    reconstruction_error,
    trim_magnitude,
)
from hf_sparse.merging.sparse_delta import base_hessians
from hf_sparse.models import target_linears

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_JSON = ROOT / "benchmarks" / "out" / "merge_bench.json"
SWEPT = (
    "magnitude_prune", "ties", "dare_linear", "dare_ties", "sparsegpt_tv", "sparsegpt_tv_seq",
    "sparsegpt_ties", "sparsegpt_ties_seq", "dare_sparsegpt", "dare_sparsegpt_ties",
)  # fmt: skip


def _data(args, tokenizer):
    evals, calibs = {}, {}
    for domain in DOMAINS:
        train, held_out = domain_tokens(tokenizer, domain)
        evals[domain] = contiguous_windows(held_out, args.eval_len, args.eval_windows)
        calibs[domain] = random_windows(train, args.calib_windows, args.calib_len, seed=0)
    return evals, calibs


def _eval(model, evals) -> dict[str, float]:
    losses = {d: perplexity(model, w, 4, False).mean_nll for d, w in evals.items()}
    losses["mean"] = sum(losses.values()) / len(evals)
    return losses


def _fine_tunes(args) -> list[Path]:
    folders = [args.ft_dir / f"ft_{d}" for d in DOMAINS]
    missing = [str(f) for f in folders if not (f / "finetune.json").exists()]
    if missing:
        sys.exit(f"missing fine-tunes {missing}: run benchmarks/merge_finetunes.py first")
    return folders


def quality(args) -> dict:
    folders = _fine_tunes(args)
    base, tokenizer = load_model_and_tokenizer(args.model)
    evals, calibs = _data(args, tokenizer)
    calibration = [calibs[d] for d in DOMAINS]
    rows = []
    references = [] if args.methods else list(zip(DOMAINS, folders, strict=True))
    if not args.methods:
        rows.append({"method": "base", "density": None, **_eval(base, evals)})
        print(json.dumps(rows[-1]))
    for domain, folder in references:
        model, _ = load_model_and_tokenizer(str(folder))
        rows.append({"method": f"fine-tune {domain}", "density": None, **_eval(model, evals)})
        print(json.dumps(rows[-1]))
    plan = [("task_arithmetic", 1.0)] + [(m, d) for d in args.densities for m in SWEPT]
    if args.methods:
        plan = [(m, d) for m, d in plan if m in args.methods]
    for method, density in plan:
        model, _ = load_model_and_tokenizer(args.model)
        sequential = method.endswith("_seq")
        config = MergeConfig(
            method.removesuffix("_seq"), density=density, sequential=sequential, seed=args.seed
        )
        result = merge_(model, config, folders, calibration=calibration, show_progress=False)
        row = {
            "method": method,
            "density": density,
            **_eval(model, evals),
            "merge_seconds": round(result.seconds, 1),
            "merged_density": round(result.density, 4),
        }
        if result.mean_layer_error is not None:
            row["mean_relative_error"] = round(result.mean_layer_error, 4)
        rows.append(row)
        print(json.dumps(row))
    return {"rows": rows}


def reconstruction(args) -> dict:
    folders = _fine_tunes(args)
    base, tokenizer = load_model_and_tokenizer(args.model)
    _, calibs = _data(args, tokenizer)
    vectors = [load_task_vector(base, inspect_source(f)) for f in folders]
    linears = {
        n: m
        for group in target_linears(base).values()
        for n, m in group.items()
        if any(f"{n}.weight" in v for v in vectors)
    }
    rows = []
    hessians = []
    for domain in DOMAINS:
        samples = [{"input_ids": w} for w in calibs[domain]]
        hessians.append(base_hessians(base, samples, linears))
    generator = torch.Generator().manual_seed(args.seed)
    kinds = {  # simple masking (no correction) vs OBS error correction, without and with 1/d
        "magnitude": lambda tau, h, d: trim_magnitude(tau, d),
        "dare_random": lambda tau, h, d: drop_random(tau, d, True, generator),
        "sparsegpt_tv": lambda tau, h, d: prune_task_vector_obs(tau, h, d),
        "dare_sparsegpt": lambda tau, h, d: prune_task_vector_obs(
            tau, h, d, ObsOptions(density_rescale=True)
        ),
    }
    for density in args.densities:
        totals = {k: [] for k in kinds}
        seconds = dict.fromkeys(kinds, 0.0)
        for vector, hessian in zip(vectors, hessians, strict=True):
            for name in linears:
                tau, h = vector[f"{name}.weight"], hessian[name]
                for key, fn in kinds.items():
                    t0 = time.perf_counter()
                    pruned = fn(tau, h, density)
                    seconds[key] += time.perf_counter() - t0
                    error, norm = reconstruction_error(tau, pruned, h)
                    totals[key].append(error / norm)
        row = {"density": density}
        for key, values in totals.items():
            row[key] = sum(values) / len(values)
            # the unsquared relative error ||X (tau - tau_pruned)|| / ||X tau||, mean over linears
            row[f"{key}_norm_ratio"] = sum(v**0.5 for v in values) / len(values)
            row[f"{key}_seconds"] = round(seconds[key], 2)
        row["ratio"] = row["sparsegpt_tv"] / row["magnitude"]
        rows.append(row)
        print(json.dumps(row))
    return {"rows": rows, "linears": len(linears), "tasks": len(vectors)}


def _peft_side(vectors, density: float) -> list[dict]:
    from peft.utils import merge_utils

    names = sorted(vectors[0])
    rows = []
    weights = [1.0] * len(vectors)
    for method in ("task_arithmetic", "magnitude_prune", "ties", "dare_linear", "dare_ties"):
        ours_s = theirs_s = 0.0
        diff = 0.0
        for index, name in enumerate(names):
            tensors = [v[name] for v in vectors]
            seed = 1000 + index
            t0 = time.perf_counter()
            ours = merge_task_vectors(
                tensors, weights, method, density, generator=torch.Generator().manual_seed(seed)
            )
            ours_s += time.perf_counter() - t0
            torch.manual_seed(seed)
            t0 = time.perf_counter()
            peft_fn = getattr(merge_utils, method)
            if method == "task_arithmetic":
                theirs = peft_fn(tensors, torch.tensor(weights))
            else:
                theirs = peft_fn(tensors, torch.tensor(weights), density)
            theirs_s += time.perf_counter() - t0
            diff = max(diff, float((ours - theirs).abs().max()))
        rows.append(
            {
                "peer": "peft.utils.merge_utils",
                "method": method,
                "density": density,
                "tensors": len(names),
                "max_abs_diff": diff,
                "ours_seconds": round(ours_s, 3),
                "peer_seconds": round(theirs_s, 3),
            }
        )
        print(json.dumps(rows[-1]))
    return rows


MERGEKIT_METHODS = {
    # ours (method, normalize) for mergekit's defaults with all weights 1
    "task_arithmetic": ("task_arithmetic", False),
    "ties": ("ties", True),
    "dare_linear": ("dare_linear", False),
}


def _mergekit(venv: Path, base: Path, folders: list[Path], method: str, density, out: Path):
    config = {
        "merge_method": method,
        "base_model": str(base),
        "models": [
            {"model": str(f), "parameters": {"weight": 1.0, "density": density}} for f in folders
        ],
        "dtype": "float32",
    }
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as handle:
        yaml.safe_dump(config, handle)
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}
    start = time.perf_counter()
    run = subprocess.run(
        [str(venv / "bin" / "mergekit-yaml"), handle.name, str(out), "--allow-crimes"],
        capture_output=True,
        text=True,
        env=env,
    )
    seconds = time.perf_counter() - start
    if run.returncode != 0:
        raise RuntimeError(f"mergekit-yaml failed: {run.stderr[-2000:]}")
    return seconds


def _load_dir(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    tensors = {}
    for file in sorted(folder.glob("*.safetensors")):
        tensors.update(load_file(str(file)))
    return tensors


def _mergekit_side(args, base_dir: Path, folders: list[Path], label: str) -> list[dict]:
    venv = args.mergekit_venv
    rows = []
    for name, (ours_method, normalize) in MERGEKIT_METHODS.items():
        density = 1.0 if name == "task_arithmetic" else args.peer_density
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "mk"
            mk_seconds = _mergekit(venv, base_dir, folders, name, density, out)
            theirs = _load_dir(out)
            model, _ = _load_any(base_dir)
            start = time.perf_counter()
            config = MergeConfig(ours_method, density=density, normalize=normalize)
            result = merge_(
                model, config, [MergeSource(str(f)) for f in folders], show_progress=False
            )
            model.save_pretrained(Path(tmp) / "ours")
            ours_seconds = time.perf_counter() - start
            ours = dict(model.state_dict())
        shared = [n for n in result.deltas if n in theirs]
        diff = max(float((ours[n] - theirs[n].float()).abs().max()) for n in shared)
        row = {
            "peer": "mergekit",
            "models": label,
            "method": name,
            "density": density,
            "tensors_compared": len(shared),
            "max_abs_diff": diff,
            "ours_seconds_incl_save": round(ours_seconds, 2),
            "mergekit_seconds_incl_startup_and_save": round(mk_seconds, 2),
        }
        if name == "dare_linear":  # random: compare the kept share, not the entries
            base_sd = _load_dir(base_dir)
            kept_mk = sum(int((theirs[n] != base_sd[n]).sum()) for n in shared)
            kept_ours = sum(int((ours[n] != base_sd[n]).sum()) for n in shared)
            total = sum(base_sd[n].numel() for n in shared)
            row.update(kept_share_mergekit=kept_mk / total, kept_share_ours=kept_ours / total)
            row.pop("max_abs_diff")
        rows.append(row)
        print(json.dumps(row))
    return rows


def _load_any(folder: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32), None


def peers(args) -> dict:
    rows = []
    folders = _fine_tunes(args)
    base, _ = load_model_and_tokenizer(args.model)
    vectors = [load_task_vector(base, inspect_source(f)) for f in folders]
    rows += _peft_side(vectors, args.peer_density)
    if not (args.mergekit_venv / "bin" / "mergekit-yaml").exists():
        print(f"mergekit not found in {args.mergekit_venv}: skipped (setup_mergekit_venv.sh)")
        return {"rows": rows}
    with tempfile.TemporaryDirectory() as tmp:
        sys.path.insert(0, str(ROOT))
        from tests.conftest import build_tiny_model
        from tests.merging.family import perturbed_copy

        tiny = build_tiny_model("llama")
        tiny.save_pretrained(Path(tmp) / "base")
        tiny_folders = []
        for seed in range(3):
            perturbed_copy(tiny, seed=100 + seed).save_pretrained(Path(tmp) / f"ft{seed}")
            tiny_folders.append(Path(tmp) / f"ft{seed}")
        rows += _mergekit_side(args, Path(tmp) / "base", tiny_folders, "tiny llama (random)")
    from hf_sparse.real_model import resolve_model_path

    rows += _mergekit_side(
        args, Path(resolve_model_path(args.model)), folders, "SmolLM2 fine-tunes"
    )
    return {"rows": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("stage", choices=["quality", "reconstruction", "peers"])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--ft-dir", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--densities", type=float, nargs="+", default=[0.1, 0.2, 0.3])
    parser.add_argument("--eval-windows", type=int, default=8)
    parser.add_argument("--eval-len", type=int, default=256)
    parser.add_argument("--calib-windows", type=int, default=16)
    parser.add_argument("--calib-len", type=int, default=256)
    parser.add_argument("--peer-density", type=float, default=0.2)
    parser.add_argument("--mergekit-venv", type=Path, default=ROOT / ".venv-mergekit")
    parser.add_argument("--methods", nargs="+", default=None, help="quality: only these rows")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path, default=DEFAULT_JSON)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    results = {"quality": quality, "reconstruction": reconstruction, "peers": peers}[args.stage](
        args
    )
    results.update(
        date=datetime.date.today().isoformat(),
        command=" ".join(sys.argv),
        wall_seconds=round(time.perf_counter() - start, 1),
        threads=args.threads,
    )
    stored = json.loads(args.json.read_text()) if args.json.exists() else {}
    key = args.stage if not args.methods else f"{args.stage}:{'+'.join(args.methods)}"
    stored[key] = results
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(stored, indent=2) + "\n")
    print(f"wrote {args.json} [{args.stage}] in {results['wall_seconds']} s")


if __name__ == "__main__":
    main()
