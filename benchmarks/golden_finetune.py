#!/usr/bin/env python3
"""Fine-tuning SmolLM2-135M on Alpaca with the same steps and trainable-parameter budget:
golden-mask sparse delta vs random-mask sparse delta vs LoRA.

    .venv/bin/python benchmarks/golden_finetune.py --steps 30

Budget: LoRA rank ``--lora-r`` on q, k, v, o, gate, up, down of every block gives B trainable
parameters. The golden mask (intersection of per-sample top-k |gradient| masks over
``--golden-samples`` training examples, per tensor) is brought to exactly B entries: golden
entries first, then (or trimmed) by the summed |gradient| over the same samples. The random
mask has the same count per tensor as the golden one, at random positions. Both sparse masks
train as the masked-LR PEFT adapter with the outside frozen.

Reported per method: trainable parameters, held-out Alpaca response loss before / after,
WikiText-2 perplexity (protocol v1: first 32 windows of 512 tokens of the raw test file) after
(forgetting), train seconds. Same seed, same examples, same order for every method.
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import tempfile
import time
from pathlib import Path

import torch

from hf_sparse.data import evaluation_windows
from hf_sparse.evaluation import perplexity
from hf_sparse.importance import compute_importance
from hf_sparse.loading import load_model_and_tokenizer
from hf_sparse.masked_lr import FinetuneConfig, GoldenConfig, golden_masks
from hf_sparse.masked_lr.finetune import (
    PadCollator,
    finetune_with_masks,
    instruction_splits,
    mean_response_loss,
    train_args,
)
from hf_sparse.masks import ParameterMasks, top_k
from hf_sparse.real_model import resolve_model_path

ROOT = Path(__file__).resolve().parents[1]
ROLES = ["q", "k", "v", "o", "gate", "up", "down"]
LORA_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def target_weights(model) -> list[str]:
    suffixes = tuple(f"{m}.weight" for m in LORA_MODULES)
    return [n for n, _ in model.named_parameters() if n.endswith(suffixes) and "layers." in n]


def budget_masks(golden: ParameterMasks, scores: dict, budget: int) -> ParameterMasks:
    """Exactly ``budget`` entries: golden ones first, then by score (global ranking)."""
    boost = 1.0 + max(float(s.max()) for s in scores.values())
    ranked = {n: scores[n] + boost * golden[n].float() for n in golden}
    total = sum(s.numel() for s in ranked.values())
    return top_k(ranked, 100.0 * budget / total, "global")


def random_like(masks: ParameterMasks, seed: int) -> ParameterMasks:
    generator = torch.Generator().manual_seed(seed)
    result = {}
    for name, mask in masks.items():
        flat = torch.zeros(mask.numel(), dtype=torch.bool)
        flat[torch.randperm(mask.numel(), generator=generator)[: int(mask.sum())]] = True
        result[name] = flat.reshape(mask.shape)
    return ParameterMasks(result)


def train_lora(model, tokenizer, config, train, held_out, rank, work) -> dict:
    from peft import LoraConfig, get_peft_model
    from transformers import Trainer

    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    before = mean_response_loss(model, held_out, pad)
    lora = get_peft_model(
        model,
        LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0, target_modules=LORA_MODULES),
    )
    trainable = sum(p.numel() for p in lora.parameters() if p.requires_grad)
    trainer = Trainer(
        model=lora,
        args=train_args(config, work),
        train_dataset=train,
        data_collator=PadCollator(pad),
    )
    output = trainer.train()
    after = mean_response_loss(lora, held_out, pad)
    return {
        "model": lora.merge_and_unload(),
        "trainable_parameters": trainable,
        "eval_loss_before": before,
        "eval_loss_after": after,
        "train_loss": output.training_loss,
        "train_seconds": output.metrics.get("train_runtime"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--lora-r", type=int, default=8)
    parser.add_argument("--train-samples", type=int, default=240)
    parser.add_argument("--eval-samples", type=int, default=40)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--golden-samples", type=int, default=8)
    parser.add_argument("--golden-percent", type=float, default=20.0)
    parser.add_argument("--eval-windows", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "out")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    path = resolve_model_path(args.model)
    model, tokenizer = load_model_and_tokenizer(path)
    config = FinetuneConfig(
        learning_rate=args.lr,
        max_steps=args.steps,
        batch_size=args.batch_size,
        train_samples=args.train_samples,
        eval_samples=args.eval_samples,
        max_length=args.max_length,
    )
    train, held_out = instruction_splits(
        tokenizer, "alpaca", args.train_samples, args.eval_samples, args.max_length
    )
    wiki = evaluation_windows(tokenizer, "wikitext2", 512, args.eval_windows)
    dense_ppl = perplexity(model, wiki).perplexity

    names = target_weights(model)
    samples = train[: args.golden_samples]
    start = time.perf_counter()
    golden_config = GoldenConfig(
        top_k_percent=args.golden_percent,
        num_samples=len(samples),
        scope="tensor",
        params=[f"re:^{n}$" for n in names],
    )
    golden = golden_masks(model, golden_config, samples).masks
    scores = compute_importance(model, samples, "gradient", [f"re:^{n}$" for n in names])
    mask_seconds = time.perf_counter() - start

    rows = []
    with tempfile.TemporaryDirectory() as work:
        lora = train_lora(model, tokenizer, config, train, held_out, args.lora_r, work)
        budget = lora["trainable_parameters"]
        lora["wikitext_ppl_after"] = perplexity(lora.pop("model"), wiki).perplexity
        rows.append({"method": f"LoRA r={args.lora_r}", **lora})

        exact = budget_masks(golden, scores, budget)
        candidates = {
            f"golden mask (top {args.golden_percent:g}% x {len(samples)} samples)": exact,
            "random mask (same per-tensor counts)": random_like(exact, seed=0),
        }
        for label, masks in candidates.items():
            fresh, _ = load_model_and_tokenizer(path)
            tuned, metrics = finetune_with_masks(
                fresh, tokenizer, masks, config, train, held_out, work
            )
            metrics["wikitext_ppl_after"] = perplexity(tuned.merge_and_unload(), wiki).perplexity
            rows.append({"method": label, **metrics})

    print(f"budget: {budget:,} trainable parameters; golden intersection kept {golden.count():,}")
    print(f"dense WikiText-2 ppl {dense_ppl:.3f}; mask search {mask_seconds:.1f} s")
    print("| method | trainable | held-out loss before | after | WikiText ppl after | train s |")
    print("|---|---|---|---|---|---|")
    for row in rows:
        print(
            f"| {row['method']} | {row['trainable_parameters']:,} | "
            f"{row['eval_loss_before']:.4f} | {row['eval_loss_after']:.4f} | "
            f"{row['wikitext_ppl_after']:.3f} | {row['train_seconds']:.0f} |"
        )
    args.out.mkdir(parents=True, exist_ok=True)
    result = {
        "date": datetime.date.today().isoformat(),
        "settings": vars(args) | {"out": str(args.out)},
        "dense_wikitext_ppl": dense_ppl,
        "golden_intersection_kept": golden.count(),
        "mask_seconds": mask_seconds,
        "rows": [{k: v for k, v in r.items() if not isinstance(v, torch.nn.Module)} for r in rows],
    }
    (args.out / "golden_finetune.json").write_text(json.dumps(result, indent=2, default=str))


if __name__ == "__main__":
    main()
