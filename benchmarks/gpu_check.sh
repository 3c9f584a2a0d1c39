#!/usr/bin/env bash
# GPU check (issue 16 item 6): the quick start (SparseGPT 50% on SmolLM2-135M, dequantized from
# the Q4_1 GGUF; protocol v1: 64 x 512 calibration windows, 32 x 512 evaluation windows) on the
# CUDA device in fp32 and in bf16, and the onloading path (model kept on the CPU, each block
# moved to the GPU in turn, block inputs on the CPU). Prints, per run: prune time, peak device
# memory (torch.cuda.max_memory_allocated) and perplexity; writes
# benchmarks/out/gpu_check.json. Where CUDA is missing it says so and exits 0.
#
#   benchmarks/gpu_check.sh                    # uses .venv/bin/python
#   PYTHON=python3 CALIB_WINDOWS=16 benchmarks/gpu_check.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-.venv/bin/python}"

if ! "$PYTHON" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
    echo "gpu_check: no GPU (torch.cuda.is_available() is False); nothing measured."
    exit 0
fi

CALIB_WINDOWS="${CALIB_WINDOWS:-64}" EVAL_WINDOWS="${EVAL_WINDOWS:-32}" "$PYTHON" - <<'EOF'
import json
import os
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from hf_sparse.data import calibration_windows, evaluation_windows
from hf_sparse.evaluation import perplexity
from hf_sparse.pruning import SparseGPTConfig, prune_
from hf_sparse.real_model import fetch_model

path = fetch_model("smollm2-135m")
tokenizer = AutoTokenizer.from_pretrained(path)
calib = calibration_windows(tokenizer, "wikitext2", count=int(os.environ["CALIB_WINDOWS"]),
                            length=512, seed=0)
evaluation = evaluation_windows(tokenizer, "wikitext2", length=512,
                                count=int(os.environ["EVAL_WINDOWS"]))
device = torch.device("cuda")
print(f"device: {torch.cuda.get_device_name(device)}, torch {torch.__version__}")
RUNS = {  # name -> (dtype, where the model is loaded, block inputs on the CPU)
    "fp32 on the GPU": (torch.float32, "cuda", False),
    "bf16 on the GPU": (torch.bfloat16, "cuda", False),
    "fp32 onloading (model on the CPU)": (torch.float32, "cpu", True),
    "bf16 onloading (model on the CPU)": (torch.bfloat16, "cpu", True),
}
results = {}
for name, (dtype, home, offload_inputs) in RUNS.items():
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(home).eval()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    config = SparseGPTConfig(sparsity=0.5, device="cuda", offload_inputs=offload_inputs)
    start = time.perf_counter()
    result = prune_(model, config, calib, batch_size=8, show_progress=False)
    torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() / 2**20
    assert {p.dtype for p in model.parameters()} == {dtype}, "weights left the model's dtype"
    model.to("cuda")
    ppl = perplexity(model, evaluation, batch_size=8, show_progress=False).perplexity
    results[name] = {"prune_s": seconds, "peak_device_mib": peak, "ppl": ppl,
                     "measured_sparsity": result.measured_sparsity}
    print(f"{name}: prune {seconds:.1f} s, peak device memory {peak:.0f} MiB, ppl {ppl:.3f}, "
          f"sparsity {result.measured_sparsity:.4f}", flush=True)
    del model
    torch.cuda.empty_cache()
out = Path("benchmarks/out")
out.mkdir(parents=True, exist_ok=True)
(out / "gpu_check.json").write_text(json.dumps(results, indent=1))
EOF
