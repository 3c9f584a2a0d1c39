#!/usr/bin/env python3
"""Mask storage on SmolLM2-135M: our file vs a dense bool file vs int64 COO, from saved files.

    .venv/bin/python benchmarks/mask_memory.py --densities 1 5

Masks cover every parameter of the model (tied embeddings counted once) and keep the top
``density`` % by magnitude (the format cost does not depend on which entries are kept, only on
how many). Each format is written to disk with safetensors and its file size is reported:
- ours (auto): ``ParameterMasks.save``: per tensor 1 bit per entry or int32 positions,
  whichever is smaller;
- ours (bits): the same, forced to 1 bit per entry;
- dense bool: one ``torch.bool`` tensor per parameter (1 byte per entry);
- int64 COO: ``[ndim, nnz]`` int64 indices per parameter (what torch sparse COO stores; the
  golden-parameters reference code saves masks this way), values not counted.
"""

from __future__ import annotations

import argparse
import datetime
import json
import tempfile
from pathlib import Path

from safetensors.torch import save_file

from hf_sparse.loading import load_model_and_tokenizer
from hf_sparse.masks import ParameterMasks, top_k
from hf_sparse.real_model import resolve_model_path

ROOT = Path(__file__).resolve().parents[1]


def file_sizes(masks: ParameterMasks, folder: Path) -> dict[str, int]:
    paths = {
        "ours (auto)": masks.save(folder / "auto.safetensors"),
        "ours (bits)": masks.save(folder / "bits.safetensors", encoding="bits"),
    }
    paths["dense bool"] = folder / "bool.safetensors"
    save_file({n: m.contiguous() for n, m in masks.items()}, str(paths["dense bool"]))
    paths["int64 COO"] = folder / "coo.safetensors"
    coo = {n: t.indices().contiguous() for n, t in masks.to_sparse_coo().items()}
    save_file(coo, str(paths["int64 COO"]))
    reloaded = ParameterMasks.load(paths["ours (auto)"])
    if reloaded != masks:
        raise RuntimeError("our mask file did not reload to the same masks")
    return {name: path.stat().st_size for name, path in paths.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--densities", type=float, nargs="+", default=[1.0, 5.0])
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "out")
    args = parser.parse_args()

    model, _ = load_model_and_tokenizer(resolve_model_path(args.model))
    scores = {n: p.detach().abs() for n, p in model.named_parameters()}
    params = sum(s.numel() for s in scores.values())
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for density in args.densities:
            masks = top_k(scores, density, "global")
            sizes = file_sizes(masks, Path(tmp))
            rows.append({"density %": density, "kept": masks.count(), **sizes})
    print(f"{args.model}: {params:,} parameters in {len(scores)} tensors")
    header = ["density %", "kept", "ours (auto)", "ours (bits)", "dense bool", "int64 COO"]
    print("| " + " | ".join(header) + " | ours / bool | ours / COO |")
    print("|" + "---|" * (len(header) + 2))
    for row in rows:
        cells = [f"{row['density %']:g}", f"{row['kept']:,}"]
        cells += [f"{row[h] / 2**20:.2f} MiB" for h in header[2:]]
        cells += [
            f"{row['ours (auto)'] / row['dense bool']:.3f}",
            f"{row['ours (auto)'] / row['int64 COO']:.3f}",
        ]
        print("| " + " | ".join(cells) + " |")
    args.out.mkdir(parents=True, exist_ok=True)
    result = {"date": datetime.date.today().isoformat(), "parameters": params, "rows": rows}
    (args.out / "mask_memory.json").write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
