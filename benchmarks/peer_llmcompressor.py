#!/usr/bin/env python3
"""Benchmark peer: prune a local LLaMA-style model with llm-compressor.

Standalone (does NOT import hf_sparse); run it under the llm-compressor venv:

    .venv-llmc/bin/python benchmarks/peer_llmcompressor.py --model DIR
        --calib calib.safetensors --method sparsegpt --sparsity 0.5
        --mask unstructured --out OUT_DIR

`wall_s` covers the `oneshot` call only (no model load, no save). The pruned model
is saved DENSE (save_compressed=False) so any transformers version loads the real
weights. One JSON line goes to stdout; everything else goes to stderr.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import resource
import sys
import time
from pathlib import Path

import torch

# Decoder-layer linears only (q/k/v/o_proj, gate/up/down_proj); never lm_head.
TARGETS = [r"re:.*layers\.\d+\.(self_attn|mlp)\..*_proj$"]
# With OWL, llm-compressor wants its targets to be the decoder layers themselves (one sparsity
# per layer); it then prunes every Linear inside them: the same seven projections.
OWL_TARGETS = [r"re:.*layers\.\d+$"]
IGNORE = [r"re:.*lm_head"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--model", required=True, type=Path, help="local HF model directory (float32 safetensors)"
    )
    p.add_argument(
        "--calib",
        required=True,
        type=Path,
        help="safetensors file with one int64 tensor `input_ids` [N, L]: "
        "the exact calibration windows",
    )
    p.add_argument(
        "--method", required=True, choices=["sparsegpt", "wanda"], help="pruning algorithm"
    )
    p.add_argument(
        "--sparsity", type=float, default=0.5, help="target sparsity (llmc ignores it for 2:4)"
    )
    p.add_argument(
        "--mask", choices=["unstructured", "2:4"], default="unstructured", help="sparsity pattern"
    )
    p.add_argument(
        "--out", required=True, type=Path, help="output directory for the pruned (dense) model"
    )
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    p.add_argument("--dampening", type=float, default=0.01, help="SparseGPT dampening_frac")
    p.add_argument("--block-size", type=int, default=128, help="SparseGPT block_size")
    p.add_argument("--owl", action="store_true", help='sparsity_profile="owl"')
    p.add_argument("--owl-m", type=int, default=5, help="OWL owl_m")
    p.add_argument("--owl-lambda", type=float, default=0.08, help="OWL owl_lmbda")
    return p.parse_args(argv)


def patch_owl() -> list[str]:
    """Work around two faults of llm-compressor 0.14.0.1's OWL so that its own maths runs.

    1. ``_get_activations`` calls ``run_calibration`` from ``on_initialize``, which emits a
       lifecycle event before the session is initialised: "Cannot invoke event before
       initializing". Here the same sums (``1/128 * ||x||`` per batch, per Linear input) are
       taken by plain forward passes over the same dataloader.
    2. ``_infer_owl_layer_sparsity`` returns a dict, which ``on_calibration_start`` hands to
       every layer whole (only a list is indexed per layer); returned here as a list in the
       order of the target layers.
    """
    from collections import defaultdict

    from llmcompressor.modifiers.pruning.sparsegpt.sgpt_base import SparsityModifierBase

    infer = SparsityModifierBase._infer_owl_layer_sparsity

    def get_activations(self, model, dataloader, nsamples=128):
        acts = defaultdict(int)

        def save(name):
            def hook(_module, args):
                x = args[0] if isinstance(args, tuple) else args
                acts[name] += 1.0 / nsamples * x.pow(2).sum(dim=(0, 1)).sqrt()

            return hook

        handles = [
            mod.register_forward_pre_hook(save(name))
            for name, mod in model.named_modules()
            if isinstance(mod, torch.nn.Linear) and "lm_head" not in name
        ]
        try:
            with torch.no_grad():
                for batch in dataloader:
                    model(
                        **{k: v for k, v in batch.items() if k in ("input_ids", "attention_mask")}
                    )
        finally:
            for handle in handles:
                handle.remove()
        return acts

    def infer_as_list(self, model, layers, dataloader):
        sparsities = infer(self, model, layers, dataloader)
        return [float(sparsities[name]) for name in layers]

    SparsityModifierBase._get_activations = get_activations
    SparsityModifierBase._infer_owl_layer_sparsity = infer_as_list
    return ["_get_activations: plain forward passes", "_infer_owl_layer_sparsity: list"]


def load_calib(path: Path):
    """Build a datasets.Dataset (input_ids, attention_mask) from the calib tensor."""
    from datasets import Dataset
    from safetensors.torch import load_file

    ids = load_file(str(path))["input_ids"].to(torch.int64)
    if ids.ndim != 2:
        raise SystemExit(f"--calib input_ids must be 2-D [N, L], got {tuple(ids.shape)}")
    rows = ids.tolist()
    ds = Dataset.from_dict({"input_ids": rows, "attention_mask": [[1] * len(r) for r in rows]})
    return ds, ids.shape[0], ids.shape[1]


def load_processor(model_dir: Path) -> tuple[object, bool]:
    """oneshot() insists on a processor whenever a dataset is given, though the
    pre-tokenized data + 'truncation' collator never use it. Use the model's own
    tokenizer if present, else an in-memory placeholder (never used to tokenize)."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    try:
        return AutoTokenizer.from_pretrained(str(model_dir)), True
    except Exception as e:  # noqa: BLE001 - any failure -> placeholder
        print(
            f"[peer_llmcompressor] no tokenizer in {model_dir} ({type(e).__name__}); "
            "using placeholder",
            file=sys.stderr,
        )
        from tokenizers import Tokenizer, models

        tok = Tokenizer(models.WordLevel(vocab={"<unk>": 0}, unk_token="<unk>"))
        return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>"), False


def build_recipe(args: argparse.Namespace) -> list:
    mask = "0:0" if args.mask == "unstructured" else "2:4"
    common = dict(sparsity=args.sparsity, mask_structure=mask, targets=TARGETS, ignore=IGNORE)
    if args.owl:
        common.update(
            targets=OWL_TARGETS, sparsity_profile="owl", owl_m=args.owl_m,
            owl_lmbda=args.owl_lambda,
        )  # fmt: skip
    if args.method == "sparsegpt":
        from llmcompressor.modifiers.pruning import SparseGPTModifier

        return [
            SparseGPTModifier(block_size=args.block_size, dampening_frac=args.dampening, **common)
        ]
    from llmcompressor.modifiers.pruning import WandaPruningModifier

    return [WandaPruningModifier(**common)]


def run(args: argparse.Namespace) -> dict:
    """Load, prune with oneshot (timed), save dense. Returns the JSON record."""
    torch.set_num_threads(args.threads)
    import llmcompressor  # its loguru sink binds sys.stdout at import: see main()
    from llmcompressor import oneshot
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(args.model), dtype=torch.float32)
    patches = patch_owl() if args.owl else []
    processor, real_tokenizer = load_processor(args.model)
    dataset, n, seqlen = load_calib(args.calib)
    recipe = build_recipe(args)

    t0, cpu0 = time.perf_counter(), time.process_time()
    model = oneshot(
        model=model,  # preloaded, so wall_s excludes model loading
        processor=processor,
        dataset=dataset,  # pre-tokenized: no tokenization, 'truncation' collator
        recipe=recipe,
        num_calibration_samples=n,
        max_seq_length=seqlen,
        shuffle_calibration_samples=False,
        batch_size=1,
        pipeline="sequential",
    )
    wall_s = time.perf_counter() - t0
    cpu_s = time.process_time() - cpu0  # all threads of this process
    peak_rss_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux

    # save_pretrained is wrapped by llmcompressor; save_compressed=False forces the
    # "dense" format: plain weight tensors, no bitmask/sparse-24 packing.
    args.out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(args.out), save_compressed=False)
    if real_tokenizer:  # never ship the placeholder as if it were the model's
        processor.save_pretrained(str(args.out))

    return {
        "peer": "llmcompressor",
        "version": llmcompressor.__version__,
        "method": args.method,
        "sparsity": args.sparsity,
        "mask": args.mask,
        "owl": {"m": args.owl_m, "lambda": args.owl_lambda, "patches": patches}
        if args.owl
        else None,
        "wall_s": round(wall_s, 4),
        "cpu_s": round(cpu_s, 4),
        "peak_rss_mib": round(peak_rss_mib, 1),
        "out": str(args.out),
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    real_stdout = sys.stdout
    # llmcompressor's loguru console sink writes to whatever sys.stdout is when the
    # package is first imported, so import and run it with stdout -> stderr.
    with contextlib.redirect_stdout(sys.stderr):
        record = run(args)
    print(json.dumps(record), file=real_stdout, flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
