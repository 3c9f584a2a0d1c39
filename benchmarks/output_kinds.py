"""Every output kind, made on SmolLM2 by a shipped recipe, command or callback, checked as a
user would ship it (issue 14's acceptance table).

For each kind (pruned model, masked-LR adapter, merged model, merged adapter, task-vector
adapter, Basis Sharing adapter, SPD adapter, analysis study), in small settings:

- load: ``hf_sparse.load_output(dir)``, and stock transformers / peft on the folder (after
  ``import hf_sparse``; an adapter on ``AutoModelForCausalLM.from_pretrained(<its base>)``);
- eval: ``evaluate_output`` (what ``hf-sparse eval DIR`` prints) on WikiText-2 test, 4 windows of
  256 tokens, compared with the dense base on the same windows (an adapter must not give the
  base's figure) and with the in-memory figure the output's own run recorded, where it did;
- card: ``README.md`` parsed with ``huggingface_hub.ModelCard`` (base_model, tags, model-index);
- push: the dry run's file list (``plan_upload``), checked to hold the kind's files;
- bytes on disk.

The model is SmolLM2-135M-Instruct dequantized to float32 from its Q4_1 GGUF (not the Hub's
bf16 checkpoint). Runs in about 20-30 min on a loaded 2-core CPU machine::

    .venv/bin/python benchmarks/output_kinds.py [--work DIR] [--only pruned,spd]

Writes ``benchmarks/out/output_kinds.json`` and ``benchmarks/out/output_kinds.md``. Kinds run in
separate ``--only`` runs (merged adapters need the masked-LR adapter of the same ``--work``)
are put in one table with ``--combine A.json B.json``.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import shutil
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "out"
MODEL = "smollm2-135m"
EVAL = {"dataset": "wikitext2", "sequence_length": 256, "num_windows": 4}
SMALL_CAL = {"dataset": "wikitext2", "num_samples": 8, "sequence_length": 128}

logger = logging.getLogger("output_kinds")


# ---- makers: each writes one output folder with a shipped entry point ---------------------------


def make_pruned(work: Path) -> Path:
    from hf_sparse.cli import main

    out = work / "pruned-wanda-50"
    code = main(["prune", MODEL, "--method", "wanda", "--sparsity", "0.5", "--num-samples", "8",
                 "--sequence-length", "128", "--num-windows", "4", "--eval-sequence-length",
                 "256", "--output-dir", str(out)])  # fmt: skip
    assert code == 0, f"hf-sparse prune exited {code}"
    return out


def make_masked_lr(work: Path) -> Path:
    from hf_sparse.recipes import read_recipe_file, run_recipe

    data = dict(read_recipe_file(ROOT / "recipes" / "golden-mask-sft.yaml"))
    data["data"] = {**data["data"], "num_samples": 4}
    data["finetune"] = {**data["finetune"], "max_steps": 6, "train_samples": 24,
                        "eval_samples": 8, "max_length": 128}  # fmt: skip
    out = work / "masked-lr-adapter"
    run_recipe(data, output_dir=out)
    return out / "adapter" if (out / "adapter" / "adapter_config.json").exists() else out


def _merge(work: Path, output: str) -> Path:
    from hf_sparse.recipes import run_recipe

    source = _adapter_folder(work / "masked-lr-adapter")
    out = work / f"merged-{output}"
    data = {"merge_method": "ties", "base_model": MODEL, "models": [{"model": str(source)}],
            "parameters": {"density": 0.5}, "output": output,
            "evaluation": {**EVAL}}  # fmt: skip
    run_recipe(data, output_dir=out)
    return out


def make_merged_model(work: Path) -> Path:
    return _merge(work, "full")


def make_merged_adapter(work: Path) -> Path:
    return _merge(work, "adapter")


def make_task_vector(work: Path) -> Path:
    import torch
    from hf_sparse.callbacks import TaskVectorPruneCallback
    from transformers import Trainer, TrainingArguments

    from hf_sparse.data import calibration_windows
    from hf_sparse.loading import load_model_and_tokenizer
    from hf_sparse.merging import TaskVectorPruneConfig

    model, tokenizer = load_model_and_tokenizer(MODEL)
    windows = calibration_windows(tokenizer, "tinystories", count=12, length=64, seed=0)
    dataset = [{"input_ids": w, "labels": w.clone()} for w in windows]
    out = work / "task-vector"
    args = TrainingArguments(output_dir=str(out), max_steps=3, per_device_train_batch_size=4,
                             learning_rate=5e-5, save_strategy="no", report_to=[],
                             logging_strategy="no", use_cpu=True)  # fmt: skip
    config = TaskVectorPruneConfig(density=0.1, method="magnitude_prune")
    torch.manual_seed(0)
    Trainer(model=model, args=args, train_dataset=dataset,
            callbacks=[TaskVectorPruneCallback(config)]).train()  # fmt: skip
    return out / "pruned_task_vector"


def make_basis_sharing(work: Path) -> Path:
    from hf_sparse.cli import main

    out = work / "basis-sharing-20"
    code = main(["compress", "--model", MODEL, "--ratio", "0.2", "--num-samples", "8",
                 "--sequence-length", "128", "--eval-windows", "4", "--eval-sequence-length",
                 "256", "--output-dir", str(out)])  # fmt: skip
    assert code == 0, f"hf-sparse compress exited {code}"
    return out


def make_basis_sharing_compressed(work: Path) -> Path:
    from hf_sparse.cli import main

    out = work / "basis-sharing-20-compressed"
    code = main(["compress", "--model", MODEL, "--ratio", "0.2", "--num-samples", "8",
                 "--sequence-length", "128", "--eval-windows", "4", "--eval-sequence-length",
                 "256", "--output", "compressed", "--output-dir", str(out)])  # fmt: skip
    assert code == 0, f"hf-sparse compress --output compressed exited {code}"
    return out


def make_pruned_by_callback(work: Path) -> Path:
    import torch
    from hf_sparse.callbacks import PruningCallback
    from transformers import Trainer, TrainingArguments

    from hf_sparse.data import calibration_windows
    from hf_sparse.loading import load_model_and_tokenizer
    from hf_sparse.pruning import WandaConfig

    model, tokenizer = load_model_and_tokenizer(MODEL)
    windows = calibration_windows(tokenizer, "wikitext2", count=8, length=128, seed=0)
    dataset = [{"input_ids": w, "labels": w.clone()} for w in windows]
    out = work / "pruned-by-callback"
    args = TrainingArguments(output_dir=str(work / "pruned-by-callback-run"), max_steps=2,
                             per_device_train_batch_size=4, learning_rate=1e-5,
                             save_strategy="no", report_to=[], logging_strategy="no",
                             use_cpu=True)  # fmt: skip
    torch.manual_seed(0)
    trainer = Trainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer,
                      callbacks=[PruningCallback(WandaConfig(sparsity=0.5))])  # fmt: skip
    trainer.train()
    trainer.save_model(str(out))
    return out


def make_spd(work: Path) -> Path:
    from hf_sparse.recipes import read_recipe_file, run_recipe

    data = dict(read_recipe_file(ROOT / "recipes" / "spd-smollm2.yaml"))
    data["spd"] = {**data["spd"], "C": 8}
    data["train"] = {**data["train"], "steps": 8}
    data["loss"] = {**data["loss"], "faithfulness_warmup_steps": 2}
    data["data"] = {**data["data"], "count": 16, "eval_count": 4}
    out = work / "spd-adapter"
    run_recipe(data, output_dir=out)
    return out


def make_study(work: Path) -> Path:
    from hf_sparse.recipes import read_recipe_file, run_recipe

    data = dict(read_recipe_file(ROOT / "recipes" / "critical-weights.yaml"))
    data["analysis"] = {**data["analysis"], "num_samples": 4, "sequence_length": 128,
                        "eval_windows": 2, "eval_length": 128, "progressive_k": [10],
                        "perturbations": [{"kind": "zero", "strengths": [1.0]}],
                        "targets": ["all"], "control_seeds": 1, "stability_seeds": [0, 1],
                        "stability_subsets": 1, "single_weight_candidates": 2}  # fmt: skip
    out = work / "study"
    run_recipe(data, output_dir=out)
    return out


MAKERS = {
    "pruned": ("pruned model (hf-sparse prune, Wanda 50%)", make_pruned),
    "masked_lr": ("masked-LR adapter (recipes/golden-mask-sft.yaml)", make_masked_lr),
    "merged_model": ("merged model (hf-sparse merge, TIES, output: full)", make_merged_model),
    "merged_adapter": ("merged adapter (hf-sparse merge, TIES, output: adapter)",
                       make_merged_adapter),
    "task_vector": ("task-vector adapter (TaskVectorPruneCallback)", make_task_vector),
    "basis_sharing": ("Basis Sharing adapter (hf-sparse compress 20%)", make_basis_sharing),
    "basis_sharing_compressed": ("compressed Basis Sharing model (hf-sparse compress 20% "
                                 "--output compressed)", make_basis_sharing_compressed),
    "pruned_callback": ("pruned model (Trainer + PruningCallback, Wanda 50%, save_model)",
                        make_pruned_by_callback),
    "spd": ("SPD adapter (recipes/spd-smollm2.yaml)", make_spd),
    "study": ("analysis study (recipes/critical-weights.yaml)", make_study),
}  # fmt: skip


FOLDERS = {  # where each maker writes (relative to --work), for --reuse
    "pruned": "pruned-wanda-50", "masked_lr": "masked-lr-adapter", "merged_model": "merged-full",
    "merged_adapter": "merged-adapter", "task_vector": "task-vector/pruned_task_vector",
    "basis_sharing": "basis-sharing-20", "spd": "spd-adapter", "study": "study",
    "basis_sharing_compressed": "basis-sharing-20-compressed",
    "pruned_callback": "pruned-by-callback",
}  # fmt: skip


def _adapter_folder(folder: Path) -> Path:
    """The folder itself, or the one subfolder holding adapter_config.json."""
    if (folder / "adapter_config.json").exists():
        return folder
    found = sorted(p.parent for p in folder.rglob("adapter_config.json"))
    return found[0] if len(found) == 1 else folder


# ---- checks: what a user would do with the folder ----------------------------------------------


def _first(error: BaseException) -> str:
    lines = [line for line in str(error).splitlines() if line.strip()]
    return f"{type(error).__name__}: {lines[0] if lines else ''}"[:160]


def check_load(folder: Path) -> dict:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    import hf_sparse
    from hf_sparse.loading import inspect_output

    result = {}
    try:
        plan = inspect_output(folder)
        model, _ = hf_sparse.load_output(folder)
        result["loader"] = f"ok ({plan.kind}{', ' + plan.extra['peft_type'] if plan.base else ''})"
    except Exception as error:
        result["loader"] = _first(error)
        return result
    ids = torch.arange(1, 33)[None]
    try:
        if plan.kind == "adapter":
            base = AutoModelForCausalLM.from_pretrained(plan.base)
            stock = PeftModel.from_pretrained(base, plan.path).eval()  # SPD: <dir>/adapter
        else:
            stock = AutoModelForCausalLM.from_pretrained(folder).eval()
        with torch.no_grad():
            diff = (stock(input_ids=ids).logits - model(input_ids=ids).logits).abs().max().item()
        result["stock"] = "ok (same logits)" if diff < 1e-4 else f"logits differ by {diff:.2e}"
    except Exception as error:
        result["stock"] = _first(error)
    return result


def check_eval(folder: Path, dense: float | None) -> dict:
    from hf_sparse.evaluation import EvalSettings, evaluate_output

    try:
        summary = evaluate_output(str(folder), EvalSettings(**EVAL, batch_size=2))
    except Exception as error:
        return {"eval": _first(error)}
    ppl = summary["perplexity"]
    result = {"eval_ppl": ppl, "eval": f"{ppl:.3f}"}
    if dense is not None and math.isclose(ppl, dense, rel_tol=1e-6):
        result["eval"] += " (= dense: the output is not applied!)"
    return result


def recorded_ppl(folder: Path) -> float | None:
    """The perplexity the output's own run measured on the same windows, if it did."""
    from hf_sparse.outputs import read_results

    for where in (folder, folder.parent):
        results = read_results(where) or {}
        metrics = results.get("metrics") or {}
        for key in ("pruned", "compressed", "merged", "adapted"):
            value = (
                (metrics.get(key) or {}).get("perplexity") if isinstance(metrics, dict) else None
            )
            if isinstance(value, int | float):
                return float(value)
    return None


def check_card(folder: Path) -> dict:
    from huggingface_hub import ModelCard

    card = folder / "README.md"
    if not card.exists():
        return {"card": "no README.md"}
    try:
        data = ModelCard.load(card).data.to_dict()
    except Exception as error:
        return {"card": _first(error)}
    parts = [f"base_model={data.get('base_model')}"]
    parts.append(f"model-index={'yes' if data.get('model-index') else 'no'}")
    parts.append(f"tags={len(data.get('tags') or [])}")
    return {"card": "parses: " + ", ".join(parts)}


EXPECTED_FILES = {
    "model": ("config.json", "README.md", ".safetensors"),
    "adapter": ("adapter_config.json", "adapter_model.safetensors", "README.md"),
    "study": ("hf_sparse_results.json", "README.md"),
}


def check_push(folder: Path) -> dict:
    from hf_sparse.push import plan_upload

    try:
        plan = plan_upload(folder, "your-namespace/output")
    except Exception as error:
        return {"push": _first(error)}
    names = [name for name, _ in plan.files]
    missing = [
        e for e in EXPECTED_FILES.get(plan.kind, ()) if not any(n.endswith(e) for n in names)
    ]
    verdict = "ok" if not missing else f"lacks {missing}"
    return {"push": f"{verdict}: {len(names)} files", "push_files": names}


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def dense_perplexity() -> float:
    from hf_sparse.evaluation import EvalSettings, evaluate_output

    return evaluate_output(MODEL, EvalSettings(**EVAL, batch_size=2))["perplexity"]


def markdown(rows: list[dict], dense: float) -> str:
    lines = [
        f"Dense base (SmolLM2-135M-Instruct, dequantized from Q4_1 GGUF): perplexity {dense:.3f} "
        "on WikiText-2 test, 4 windows of 256 tokens.",
        "",
        "| output kind | made in (s) | load_output | stock transformers / peft | `hf-sparse eval` "
        "ppl | ppl its run recorded | card (ModelCard) | dry-run push | MB on disk |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        recorded, made = r.get("recorded_ppl"), r.get("make_seconds")
        cells = [r["label"], f"{made:.0f}" if made is not None else "-", r.get("loader", "-"),
                 r.get("stock", "-"), r.get("eval", "-"),
                 f"{recorded:.3f}" if recorded is not None else "-", r.get("card", "-"),
                 r.get("push", "-"),
                 f"{r['bytes'] / 2**20:.1f}" if "bytes" in r else "-"]  # fmt: skip
        if "error" in r:
            cells[2] = f"not made: {r['error']}"
        lines.append("| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=OUT / "output_kinds", help="output folders")
    parser.add_argument("--only", default=None, help="comma-separated kinds (default: all)")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument(
        "--reuse", action="store_true", help="check the folders an earlier run made, not remade"
    )
    parser.add_argument(
        "--json",
        type=Path,
        default=OUT / "output_kinds.json",
        help="where the rows go (with --only: merged into what is there)",
    )
    parser.add_argument("--combine", type=Path, nargs="+", default=None,
                        help="only merge the rows of these JSON files (of --only runs) into "
                        "--json and write the table")  # fmt: skip
    args = parser.parse_args()
    if args.combine:
        return combine(args.combine, args.json)
    import torch

    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logger.setLevel(logging.INFO)
    kinds = args.only.split(",") if args.only else list(MAKERS)
    if args.work.exists() and not args.only:
        shutil.rmtree(args.work)
    args.work.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    dense = dense_perplexity()
    logger.info("dense perplexity %.3f", dense)
    rows = []
    for kind in kinds:
        label, make = MAKERS[kind]
        row: dict = {"kind": kind, "label": label}
        logger.info("making %s", label)
        begin = time.perf_counter()
        try:
            reused = args.work / FOLDERS[kind]
            folder = reused if args.reuse and reused.exists() else make(args.work)
        except Exception as error:
            traceback.print_exc()
            row["error"] = _first(error)
            rows.append(row)
            continue
        if not (args.reuse and folder == reused):
            row["make_seconds"] = time.perf_counter() - begin
        elif args.json.exists():  # keep the time its making took in the earlier run
            earlier = {r["kind"]: r for r in json.loads(args.json.read_text())["rows"]}
            row["make_seconds"] = earlier.get(kind, {}).get("make_seconds")
        row["folder"] = str(folder.relative_to(args.work))
        row.update(check_load(folder))
        row.update(check_eval(folder, dense))
        row["recorded_ppl"] = recorded_ppl(folder)
        row.update(check_card(folder))
        row.update(check_push(folder))
        row["bytes"] = folder_bytes(folder)
        logger.info("%s", {k: v for k, v in row.items() if k != "push_files"})
        rows.append(row)
    seconds = time.perf_counter() - start
    print(f"\n{len(rows)} kinds in {seconds:.0f} s (shared 2-core machine)")
    OUT.mkdir(parents=True, exist_ok=True)
    if args.only and args.json.exists():  # keep the other kinds' rows of an earlier run
        old = {r["kind"]: r for r in json.loads(args.json.read_text())["rows"]}
        old.update({r["kind"]: r for r in rows})
        rows = [old[k] for k in MAKERS if k in old]
    record = {"dense_perplexity": dense, "eval": EVAL, "rows": rows, "seconds": seconds}
    args.json.write_text(json.dumps(record, indent=2) + "\n")
    write_table(record, args.json.with_suffix(".md"))


def write_table(record: dict, path: Path) -> None:
    text = markdown(record["rows"], record["dense_perplexity"])
    print(text)
    path.write_text(text + "\n")


def combine(files: list[Path], target: Path) -> None:
    """Rows of several ``--only`` runs (same dense figure) in one table, in ``MAKERS`` order."""
    records = [json.loads(f.read_text()) for f in files]
    rows: dict[str, dict] = {}
    for record in records:  # later files win; a --reuse row keeps the earlier making time
        for row in record["rows"]:
            made = row.get("make_seconds") or rows.get(row["kind"], {}).get("make_seconds")
            rows[row["kind"]] = {**row, "make_seconds": made}
    denses = {round(r["dense_perplexity"], 6) for r in records}
    if len(denses) != 1:
        raise SystemExit(f"the runs measured different dense perplexities {denses}")
    record = {"dense_perplexity": records[0]["dense_perplexity"], "eval": EVAL,
              "rows": [rows[k] for k in MAKERS if k in rows],
              "seconds": sum(r["seconds"] for r in records)}  # fmt: skip
    target.write_text(json.dumps(record, indent=2) + "\n")
    write_table(record, target.with_suffix(".md"))


if __name__ == "__main__":
    sys.exit(main())
