#!/usr/bin/env python3
"""Why do our SparseGPT and llm-compressor's differ? The solvers on real statistics (issue 18).

    .venv/bin/python benchmarks/sparsegpt_solver_diff.py      # ~7 CPU minutes, 1 thread
    .venv/bin/python benchmarks/sparsegpt_solver_diff.py --whole-only --whole-rows 0.5 \
        --out benchmarks/out/sparsegpt_solver_diff_whole50.json  # ~6 CPU minutes

1. Dense SmolLM2-135M (the fp32 model dequantized from the Q4_1 GGUF, not the Hub's bf16
   checkpoint) runs on the first ``--windows`` windows of the protocol-v1 calibration tensor
   (the very ``calib.safetensors`` the pruning table gave both libraries). The inputs of the
   seven linears of the chosen blocks are recorded; ``H_ours`` = ``X^T X / tokens`` summed
   with our ``InputStats`` (fp32, window after window), as our engine does.
2. A child process under llm-compressor's venv (``--peer``; it imports nothing of hf_sparse)
   accumulates ``H_theirs`` from the same inputs with their ``accumulate_hessian`` (one window
   per call: the batch size our runner of the peer uses) and prunes every linear with their
   ``sparsify_weight`` on ``H_theirs`` and on ``H_ours``. Tensors go through safetensors files
   under ``--work``.
3. Here: our library ``obs_prune`` (q/k/v and gate/up stacked as the engine stacks them) and a
   local copy of our solver whose differences from theirs switch on one at a time:
   ``count`` (their unstructured threshold ``score <= sorted[int(s * n)]`` prunes
   ``int(s * n) + 1`` entries of each block plus ties, ours ``round(s * n)``), ``loop``
   (their one-level column loop, ours two-level lazy updates), ``hessian`` (``H_theirs``),
   ``stack`` (each linear alone instead of stacked), ``fp64`` (solve in float64: how large
   float rounding alone is), and ``H_reversed`` (our H summed over the windows in reverse
   order: a same-data rounding perturbation, the noise floor of any comparison).

4. Whole model (``--whole-rows``, default 70%): our library prunes all 30 blocks from the same
   windows several times, each run differing from the default only by float rounding
   (``reduction="sum"``; ``batch_size=1``, the peer's batch) or by their count (patched in this
   process, not in the library), each scored by perplexity on the first ``--eval-windows``
   protocol-v1 evaluation windows: how far rounding alone moves the figures the table compares.

Every layer result is scored by the layer output error
``trace((W - W') H (W - W')^T) / trace(W H W^T)`` on the same ``H`` (``H_ours`` in float64),
and by the share of mask entries that differ from llm-compressor's. JSON goes to
``benchmarks/out/sparsegpt_solver_diff.json``. The machine may be shared: nothing is timed.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
PEER_PYTHON = Path("/work/main/.venv-llmc/bin/python")
CALIB = Path("/work/main/benchmarks/out/prune_table/calib.safetensors")
LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
           "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")  # fmt: skip
# linears reading the same input tensor (our engine stacks them into one solve)
GROUPS = {"attn_in": LINEARS[:3], "o_in": LINEARS[3:4], "mlp_in": LINEARS[4:6],
          "down_in": LINEARS[6:]}  # fmt: skip
ROWS = {"0.5": (0.5, None), "0.6": (0.6, None), "0.7": (0.7, None), "2:4": (0.5, "2:4")}
SETTINGS = {"50%": (0.5, 0, 0), "70%": (0.7, 0, 0), "2:4": (0.5, 2, 4)}  # (sparsity, n, m)
BLOCK_SIZE, DAMP = 128, 0.01


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--model", type=Path, default=Path.home() / ".cache/hf_sparse/models/smollm2-135m"
    )
    p.add_argument("--calib", type=Path, default=CALIB, help="[N, 512] token ids (input_ids)")
    p.add_argument("--windows", type=int, default=16, help="calibration windows used")
    p.add_argument("--blocks", type=int, nargs="+", default=[0, 15], help="decoder blocks")
    p.add_argument("--work", type=Path, default=Path("/tmp/solverdiff"), help="exchange folder")
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks/out/sparsegpt_solver_diff.json")
    p.add_argument("--eval-windows", type=int, default=8, help="whole-model part: eval windows")
    p.add_argument(
        "--whole-rows", nargs="*", default=["0.7"], choices=list(ROWS),
        help="whole-model part: the rows to prune the whole model at (none = skip the part)",
    )  # fmt: skip
    p.add_argument("--whole-only", action="store_true", help="only the whole-model part")
    p.add_argument("--peer", action="store_true", help=argparse.SUPPRESS)  # child mode
    return p.parse_args(argv)


def key(block: int, name: str) -> str:
    return f"{block}.{name}"


# ------------------------------------------------------------------ 1. real statistics (ours)
@torch.no_grad()
def collect(args: argparse.Namespace) -> dict[str, torch.Tensor]:
    """Dense inputs of the chosen blocks' linears; H_ours via our InputStats; raw X for the peer."""
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM

    from hf_sparse.calibration import StatsCollector

    ids = load_file(str(args.calib))["input_ids"][: args.windows]
    model = AutoModelForCausalLM.from_pretrained(str(args.model), dtype=torch.float32).eval()
    layers = model.model.layers
    model.model.layers = layers[: max(args.blocks) + 1]  # nothing after the last block runs
    linears = {key(b, n): layers[b].get_submodule(n) for b in args.blocks for n in LINEARS}
    inputs: dict[str, list[torch.Tensor]] = {key(b, g): [] for b in args.blocks for g in GROUPS}
    hooks = []
    for b in args.blocks:
        for group, names in GROUPS.items():
            record = inputs[key(b, group)]
            hooks.append(
                layers[b]
                .get_submodule(names[0])
                .register_forward_hook(lambda _m, a, _o, r=record: r.append(a[0][0].clone()))
            )
    with StatsCollector(linears, need_xtx=True, need_sq_norms=False, ordered=False) as stats:
        for window in ids:
            model.model(input_ids=window.unsqueeze(0), use_cache=False)
    for handle in hooks:
        handle.remove()
    tensors: dict[str, torch.Tensor] = {}
    for b in args.blocks:
        for group, names in GROUPS.items():
            item = stats.stats[key(b, names[0])]
            assert all(stats.stats[key(b, n)] is item for n in names), "inputs not shared"
            x = torch.stack(inputs[key(b, group)])  # [windows, 512, in]
            tensors[f"X.{b}.{group}"] = x.contiguous()
            tensors[f"H_ours.{b}.{group}"] = item.hessian.contiguous()
            reverse = torch.zeros_like(item.xtx)
            for window in reversed(x):
                reverse.addmm_(window.t(), window)
            tensors[f"H_reversed.{b}.{group}"] = (reverse / item.tokens).contiguous()
            for name in names:
                tensors[f"W.{b}.{name}"] = linears[key(b, name)].weight.detach().clone()
    args.work.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(args.work / "stats.safetensors"))
    return tensors


# ------------------------------------------------------------------ 2. the peer (their venv)
def peer(args: argparse.Namespace) -> None:
    """llm-compressor's accumulate_hessian and sparsify_weight on the same inputs."""
    from llmcompressor.modifiers.pruning.sparsegpt.sgpt_sparsify import (
        accumulate_hessian,
        make_empty_hessian,
        sparsify_weight,
    )
    from safetensors.torch import load_file, save_file

    torch.set_num_threads(1)
    data = load_file(str(args.work / "stats.safetensors"))
    out: dict[str, torch.Tensor] = {}
    for b in args.blocks:
        for group, names in GROUPS.items():
            x = data[f"X.{b}.{group}"]
            probe = torch.nn.Linear(x.shape[-1], 1, bias=False)
            h, samples = make_empty_hessian(probe), 0
            for window in x:  # batch_size=1, as benchmarks/peer_llmcompressor.py runs it
                h, samples = accumulate_hessian(window.unsqueeze(0), probe, h, samples)
            out[f"H_theirs.{b}.{group}"] = h.clone()
            hessians = {"H_theirs": h, "H_ours": data[f"H_ours.{b}.{group}"]}
            for name in names:
                weight = data[f"W.{b}.{name}"]
                module = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=False)
                module.weight.data.copy_(weight)
                for label, setting in SETTINGS.items():
                    sparsity, n, m = setting
                    for h_name, hessian in hessians.items():
                        _loss, pruned = sparsify_weight(
                            module, {module: hessian.clone()}, sparsity, n, m,
                            BLOCK_SIZE, DAMP, False,
                        )  # fmt: skip
                        out[f"theirs[{h_name}].{label}.{b}.{name}"] = pruned.contiguous()
    save_file(out, str(args.work / "peer.safetensors"))


# ------------------------------------------------------------------ 3. our solver, switchable
def local_obs(
    w: torch.Tensor,
    hessian: torch.Tensor,
    sparsity: float,
    nm: tuple[int, int] | None,
    count: str = "ours",
    loop: str = "two-level",
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """A copy of ``hf_sparse.pruning.core.obs_prune`` (one row group) with their choices as
    switches: ``count="theirs"`` = threshold at ``sorted[int(s n)]``, ties pruned;
    ``loop="one-level"`` = every column updates the rest of its block at once."""
    from hf_sparse.linalg import damped_inverse_cholesky

    w = w.detach().to(dtype).clone()
    dead = torch.diag(hessian) == 0
    w[:, dead] = 0
    hinv = damped_inverse_cholesky(hessian.to(dtype), DAMP).to(dtype)
    rows, cols = w.shape
    inner_target = 32 if loop == "two-level" else BLOCK_SIZE
    for start in range(0, cols, BLOCK_SIZE):
        end = min(start + BLOCK_SIZE, cols)
        block, hb = w[:, start:end].clone(), hinv[start:end, start:end]
        diag = torch.diag(hb)
        errors = torch.zeros_like(block)
        keep = torch.ones_like(block, dtype=torch.bool)
        if nm is None:
            saliency = (block**2 / diag**2).flatten()
            if count == "ours":
                drop = torch.topk(saliency, round(sparsity * saliency.numel()), largest=False)
                keep.view(-1)[drop.indices] = False
            else:
                threshold = torch.sort(saliency)[0][int(saliency.numel() * sparsity)]
                keep = (saliency > threshold).view_as(block)
        width = end - start
        step = nm[1] if nm is not None else 1
        inner = min(width, max(step, inner_target // step * step))
        for first in range(0, width, inner):
            last = min(first + inner, width)
            for j in range(first, last):
                if nm is not None and j % nm[1] == 0:
                    group = block[:, j : j + nm[1]] ** 2 / diag[j : j + nm[1]] ** 2
                    drop = torch.topk(group, nm[1] - nm[0], dim=1, largest=False).indices
                    keep[:, j : j + nm[1]].scatter_(1, drop, False)
                error = block[:, j] * ~keep[:, j] / diag[j]
                block[:, j:last].addr_(error, hb[j, j:last], alpha=-1)
                block[:, j] = block[:, j] * keep[:, j]
                errors[:, j] = error
            if last < width:
                block[:, last:].addmm_(errors[:, first:last], hb[first:last, last:], alpha=-1)
        w[:, start:end] = block
        w[:, end:] -= errors @ hinv[start:end, end:]
    return w.float()


def relative_error(w: torch.Tensor, pruned: torch.Tensor, h64: torch.Tensor) -> float:
    w64, d = w.double(), (w.double() - pruned.double())
    return float(torch.trace(d @ h64 @ d.T) / torch.trace(w64 @ h64 @ w64.T))


def library_results(data: dict, blocks: list[int]) -> dict[str, torch.Tensor]:
    """Our library's obs_prune exactly as the engine calls it (shared inputs stacked)."""
    from hf_sparse.pruning.core import NMPattern, obs_prune

    out = {}
    for b in blocks:
        for group, names in GROUPS.items():
            weights = [data[f"W.{b}.{n}"] for n in names]
            for label, (sparsity, n, m) in SETTINGS.items():
                pattern = NMPattern(n, m) if n else None
                pruned, _keep = obs_prune(
                    torch.cat(weights), data[f"H_ours.{b}.{group}"], sparsity, pattern,
                    block_size=BLOCK_SIZE, damp=DAMP,
                    row_groups=[(w.shape[0], sparsity) for w in weights],
                )  # fmt: skip
                first = 0
                for name, w in zip(names, weights, strict=True):
                    out[f"ours[library].{label}.{b}.{name}"] = pruned[first : first + w.shape[0]]
                    first += w.shape[0]
    return out


# name -> (hessian key, local_obs switches); "ours[local]" must equal the library
VARIANTS: dict[str, tuple[str, dict]] = {
    "ours[local]": ("H_ours", {}),
    "ours+their count": ("H_ours", {"count": "theirs"}),
    "ours+their loop": ("H_ours", {"loop": "one-level"}),
    "ours+their H": ("H_theirs", {}),
    "ours+all three": ("H_theirs", {"count": "theirs", "loop": "one-level"}),
    "ours fp64": ("H_ours", {"dtype": torch.float64}),
    "ours on H_reversed": ("H_reversed", {}),
}


def analyse(args: argparse.Namespace, data: dict, peer_out: dict) -> dict:
    results = {**library_results(data, args.blocks), **peer_out}
    for b in args.blocks:
        for group, names in GROUPS.items():
            hessians = {k: (peer_out if k == "H_theirs" else data)[f"{k}.{b}.{group}"]
                        for k in ("H_ours", "H_theirs", "H_reversed")}  # fmt: skip
            for name in names:
                for label, (sparsity, n, m) in SETTINGS.items():
                    for variant, (h_name, switches) in VARIANTS.items():
                        results[f"{variant}.{label}.{b}.{name}"] = local_obs(
                            data[f"W.{b}.{name}"], hessians[h_name], sparsity,
                            (n, m) if n else None, **switches,
                        )  # fmt: skip
    methods = ["ours[library]", *VARIANTS, "theirs[H_theirs]", "theirs[H_ours]"]
    rows = []
    for b in args.blocks:
        for group, names in GROUPS.items():
            h64 = data[f"H_ours.{b}.{group}"].double()
            for name in names:
                w = data[f"W.{b}.{name}"]
                for label in SETTINGS:
                    reference = results[f"theirs[H_theirs].{label}.{b}.{name}"]
                    library = results[f"ours[library].{label}.{b}.{name}"]
                    row = {"block": b, "linear": name, "setting": label}
                    for method in methods:
                        pruned = results[f"{method}.{label}.{b}.{name}"]
                        row[method] = {
                            "error": relative_error(w, pruned, h64),
                            "sparsity": float((pruned == 0).float().mean()),
                            "mask_diff_vs_theirs": float(
                                ((pruned == 0) != (reference == 0)).float().mean()
                            ),
                            "mask_diff_vs_library": float(
                                ((pruned == 0) != (library == 0)).float().mean()
                            ),
                            "max_abs_diff_vs_library": float((pruned - library).abs().max()),
                        }
                    rows.append(row)
    summary = {}
    for label in SETTINGS:
        picked = [r for r in rows if r["setting"] == label]
        summary[label] = {
            method: {
                "mean_error": sum(r[method]["error"] for r in picked) / len(picked),
                "mean_error_ratio_to_theirs": sum(
                    r[method]["error"] / r["theirs[H_theirs]"]["error"] for r in picked
                )
                / len(picked),
                "mean_mask_diff_vs_theirs": sum(r[method]["mask_diff_vs_theirs"] for r in picked)
                / len(picked),
                "mean_mask_diff_vs_library": sum(r[method]["mask_diff_vs_library"] for r in picked)
                / len(picked),
                "max_abs_diff_vs_library": max(
                    r[method]["max_abs_diff_vs_library"] for r in picked
                ),
                "mean_sparsity": sum(r[method]["sparsity"] for r in picked) / len(picked),
            }
            for method in methods
        }
    hessians = {}
    for b in args.blocks:
        for group in GROUPS:
            ours, theirs = data[f"H_ours.{b}.{group}"], peer_out[f"H_theirs.{b}.{group}"]
            scale = float(torch.median(theirs / ours))  # 2 * tokens / windows = 2 * 512
            hessians[f"{b}.{group}"] = {
                "dead_columns": int((torch.diag(ours) == 0).sum()),
                "theirs_over_ours_scale": scale,
                "max_rel_diff_after_scale": float(
                    (theirs / scale - ours).abs().max() / ours.abs().max()
                ),
            }
    return {"rows": rows, "summary": summary, "hessians": hessians}


# ------------------------------------------------------------------ 4. whole model (ours only)
def their_count_masks(original):
    """``keep_mask_from_scores`` with llm-compressor's unstructured count in SparseGPT's blocks
    (prune every score ``<= sorted[int(s * n)]``); N:M and per-row calls unchanged."""

    def keep_mask(scores, sparsity, pattern=None, per_row=False, exact_total=False):
        if pattern is not None or per_row:
            return original(scores, sparsity, pattern, per_row, exact_total)
        flat = scores.flatten()
        return scores > torch.sort(flat)[0][int(flat.numel() * sparsity)]

    return keep_mask


def whole_model(args: argparse.Namespace, row: str) -> dict:
    """Prune the whole model several times, each run differing from the library default by one
    rounding-level change (or their count), and score each on the same evaluation windows."""
    from unittest import mock

    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from hf_sparse.evaluation import perplexity
    from hf_sparse.pruning import SparseGPTConfig, core, prune_

    calib = load_file(str(args.calib))["input_ids"][: args.windows]
    evaluation = load_file(str(args.calib.with_name("eval.safetensors")))["input_ids"]
    evaluation = evaluation[: args.eval_windows]
    runs = {  # name -> (config overrides, batch size, their count?)
        "library (batch 8, ordered sums)": ({}, 8, False),
        "reduction='sum' (H rounding only)": ({"reduction": "sum"}, 8, False),
        "batch_size=1 (forward rounding only)": ({}, 1, False),
        "their count (patched in this process)": ({}, 8, True),
    }
    sparsity, mask = ROWS[row]
    if mask is not None:  # the count of unstructured masks plays no part in N:M
        del runs["their count (patched in this process)"]
    out = {}
    for name, (overrides, batch, patched) in runs.items():
        model = AutoModelForCausalLM.from_pretrained(str(args.model), dtype=torch.float32).eval()
        config = SparseGPTConfig(
            sparsity=sparsity, mask=mask or "unstructured", device="cpu", **overrides
        )
        patch = mock.patch.object(
            core, "keep_mask_from_scores", their_count_masks(core.keep_mask_from_scores)
        )
        with patch if patched else contextlib.nullcontext():
            result = prune_(model, config, calib, batch_size=batch, show_progress=False)
        ppl = perplexity(model, evaluation, batch_size=4, show_progress=False).perplexity
        out[name] = {"ppl": ppl, "measured_sparsity": result.measured_sparsity}
        print(f"{name:<40} ppl {ppl:8.3f}  sparsity {100 * result.measured_sparsity:.4f}%")
    return out


def print_summary(summary: dict) -> None:
    head = (
        f"{'method':<20} {'mean err':>10} {'err/theirs':>10} {'mask!=theirs':>12} "
        f"{'mask!=library':>13} {'sparsity':>9}"
    )
    for label, methods in summary.items():
        print(f"\n== {label} (mean over linears) ==\n{head}")
        for method, s in methods.items():
            print(
                f"{method:<20} {s['mean_error']:>10.6f} {s['mean_error_ratio_to_theirs']:>10.5f} "
                f"{100 * s['mean_mask_diff_vs_theirs']:>11.4f}% "
                f"{100 * s['mean_mask_diff_vs_library']:>12.4f}% {100 * s['mean_sparsity']:>8.4f}%"
            )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(1)
    if args.peer:
        peer(args)
        return 0
    from safetensors.torch import load_file

    start = time.process_time()
    report: dict = {}
    if not args.whole_only:
        data = collect(args)
        print(f"statistics collected ({time.process_time() - start:.0f} CPU s)", flush=True)
        if not PEER_PYTHON.exists():
            raise SystemExit(f"{PEER_PYTHON} not found: run benchmarks/setup_llmcompressor_venv.sh")
        child = [str(PEER_PYTHON), __file__, "--peer", "--work", str(args.work),
                 "--blocks", *map(str, args.blocks)]  # fmt: skip
        peer_start = time.time()
        subprocess.run(child, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
        print(f"peer done ({time.time() - peer_start:.0f} s wall)", flush=True)
        report = analyse(args, data, load_file(str(args.work / "peer.safetensors")))
        print_summary(report["summary"])
    report["whole_model"] = {}
    for row in args.whole_rows:
        print(
            f"\n== whole model, row {row}, {args.windows} calibration windows, "
            f"ppl on {args.eval_windows} eval windows =="
        )
        report["whole_model"][row] = whole_model(args, row)
    report["setup"] = {
        "command": " ".join(["benchmarks/sparsegpt_solver_diff.py", *sys.argv[1:]]),
        "model": f"{args.model} (SmolLM2-135M-Instruct, fp32 dequantized from Q4_1 GGUF)",
        "calibration": f"first {args.windows} windows of {args.calib}",
        "evaluation": f"first {args.eval_windows} windows of eval.safetensors beside --calib",
        "blocks": args.blocks, "block_size": BLOCK_SIZE, "dampening": DAMP,
        "metric": "trace((W-W')H(W-W')^T)/trace(WHW^T), H = H_ours in float64",
        "cpu_seconds_this_process": time.process_time() - start, "threads": 1,
        "load_average_at_end": os.getloadavg(),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1))
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
