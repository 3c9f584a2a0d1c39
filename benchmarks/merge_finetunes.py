#!/usr/bin/env python3
"""Make the domain fine-tunes of SmolLM2-135M that ``merge_bench.py`` merges (CPU, own data).

    .venv/bin/python benchmarks/merge_finetunes.py --steps 200

For each domain (Alpaca instructions, TinyStories, WikiText-2) the linear weights of the top
``--top-blocks`` decoder blocks are trained fully (AdamW, constant LR after a short warm-up) on
random windows of that domain's training text; everything else stays frozen. Each fine-tune is
saved with ``save_pretrained`` (safetensors) under ``--out``. The held-out tail of each domain is
never trained on: ``merge_bench.py`` evaluates on it.

Domains and splits (all from ``../shared/data``):
- alpaca: Alpaca records formatted as ``### Instruction / ### Response`` + EOS, joined; the
  first 4,500 records train, the last 500 are held out.
- tinystories: the TinyStories file; the first 90 % of its characters train, the rest held out.
- wikitext: WikiText-2 validation tokens; the first 90 % train, the rest held out.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import torch

from hf_sparse.data import load_records, load_text
from hf_sparse.importance.samples import ALPACA_TEMPLATE
from hf_sparse.loading import load_model_and_tokenizer
from hf_sparse.models import find_decoder_blocks

DOMAINS = ("alpaca", "tinystories", "wikitext")
DEFAULT_OUT = Path.home() / ".cache" / "hf_sparse" / "merge_bench"
TRAINED_SUFFIXES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
ALPACA_TRAIN = 4500


def _alpaca_text(records: list[dict], eos: str) -> str:
    parts = []
    for record in records:
        extra = record.get("input") or ""
        head = ALPACA_TEMPLATE.format(
            instruction=record["instruction"],
            input_block=f"### Input:\n{extra}\n\n" if extra else "",
        )
        parts.append(head + str(record.get("output", "")) + eos)
    return "\n".join(parts)


def domain_texts(domain: str, eos: str) -> tuple[str, str]:
    """(training text, held-out text) of a domain."""
    if domain == "alpaca":
        records = load_records("alpaca")
        return _alpaca_text(records[:ALPACA_TRAIN], eos), _alpaca_text(records[ALPACA_TRAIN:], eos)
    text = load_text("tinystories" if domain == "tinystories" else "wikitext2", "calibration")
    cut = int(0.9 * len(text))
    cut = text.index("\n", cut)  # split on a line boundary
    return text[:cut], text[cut:]


def domain_tokens(tokenizer, domain: str) -> tuple[torch.Tensor, torch.Tensor]:
    train, held_out = domain_texts(domain, tokenizer.eos_token or "")
    encode = lambda t: torch.tensor(tokenizer(t, add_special_tokens=False)["input_ids"])  # noqa: E731
    return encode(train), encode(held_out)


def trained_parameters(model, top_blocks: int) -> list[str]:
    blocks = find_decoder_blocks(model)[-top_blocks:]
    names = []
    for block_name, _ in blocks:
        for name, _ in model.named_parameters():
            if name.startswith(block_name + ".") and name.removesuffix(".weight").endswith(
                TRAINED_SUFFIXES
            ):
                names.append(name)
    return names


def finetune(args: argparse.Namespace, domain: str, out: Path) -> dict:
    torch.manual_seed(args.seed)
    model, tokenizer = load_model_and_tokenizer(args.model)
    train_ids, _ = domain_tokens(tokenizer, domain)
    names = set(trained_parameters(model, args.top_blocks))
    for name, param in model.named_parameters():
        param.requires_grad_(name in names)
    params = [p for n, p in model.named_parameters() if n in names]
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    warmup = max(1, args.steps // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / warmup))
    generator = torch.Generator().manual_seed(args.seed)
    model.train()
    start, losses = time.perf_counter(), []
    for step in range(args.steps):
        starts = torch.randint(
            0, train_ids.numel() - args.seq_len, (args.batch,), generator=generator
        )
        batch = torch.stack([train_ids[s : s + args.seq_len] for s in starts.tolist()])
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss))
        if step % 20 == 0 or step == args.steps - 1:
            logging.info("%s step %d loss %.4f", domain, step, float(loss))
    seconds = time.perf_counter() - start
    model.eval()
    for param in model.parameters():
        param.requires_grad_(True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    info = {
        "domain": domain,
        "steps": args.steps,
        "batch": args.batch,
        "seq_len": args.seq_len,
        "lr": args.lr,
        "top_blocks": args.top_blocks,
        "trained_parameters": sum(p.numel() for p in params),
        "first_loss": sum(losses[:10]) / len(losses[:10]),
        "last_loss": sum(losses[-10:]) / len(losses[-10:]),
        "train_seconds": round(seconds, 1),
    }
    (out / "finetune.json").write_text(json.dumps(info, indent=2))
    return info


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--domains", nargs="+", default=list(DOMAINS), choices=DOMAINS)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--top-blocks", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--force", action="store_true", help="retrain existing fine-tunes")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(args.threads)
    for domain in args.domains:
        out = args.out / f"ft_{domain}"
        if (out / "finetune.json").exists() and not args.force:
            print(f"{domain}: exists at {out} (use --force to retrain)")
            continue
        info = finetune(args, domain, out)
        print(json.dumps(info))


if __name__ == "__main__":
    main()
