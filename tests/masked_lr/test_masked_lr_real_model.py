"""SmolLM2-135M: golden mask through the CLI, a sparse-delta adapter trained on Alpaca, saved,
reloaded with PeftModel.from_pretrained in a fresh process with identical logits."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer

from hf_sparse.cli import main
from hf_sparse.masked_lr import MaskedLRConfig, get_masked_lr_model
from hf_sparse.masked_lr.config import FinetuneConfig
from hf_sparse.masked_lr.finetune import PadCollator, instruction_splits, train_args
from hf_sparse.masks import ParameterMasks
from hf_sparse.real_model import fetch_model

pytestmark = pytest.mark.real_model

RELOAD = """
import sys, torch, hf_sparse
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM
torch.set_num_threads(2)  # as the test process: the same kernels give bit-identical logits
base = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.float32)
model = PeftModel.from_pretrained(base, sys.argv[2]).eval()
ref = load_file(sys.argv[3])
with torch.no_grad():
    logits = model(input_ids=ref["ids"]).logits
print(float((logits - ref["logits"]).abs().max()))
"""


def test_golden_mask_adapter_trains_saves_and_reloads(tmp_path):
    torch.set_num_threads(2)
    path = str(fetch_model("smollm2-135m"))
    out = tmp_path / "golden"
    argv = ["mask", "golden", path, "--top-k-percent", "10", "--num-samples", "2"]
    argv += ["--max-length", "48", "--last-blocks-percent", "10", "--output-dir", str(out)]
    assert main(argv) == 0
    masks = ParameterMasks.load(out / "masks.safetensors")
    assert masks.count() > 0 and all(".layers.2" in n for n in masks)  # blocks 27-29 of 30

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(path)
    peft_model = get_masked_lr_model(model, MaskedLRConfig(), masks=masks)
    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    assert trainable == masks.count()
    config = FinetuneConfig(max_steps=2, batch_size=2, max_length=48, learning_rate=1e-3)
    train, _ = instruction_splits(tokenizer, "alpaca", 4, 1, 48)
    trainer = Trainer(
        model=peft_model,
        args=train_args(config, tmp_path / "run", disable_tqdm=True),
        train_dataset=train,
        data_collator=PadCollator(tokenizer.eos_token_id),
    )
    trainer.train()
    peft_model.save_pretrained(tmp_path / "adapter")
    ids = tokenizer("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        logits = peft_model.eval()(input_ids=ids).logits
    save_file({"ids": ids, "logits": logits.contiguous()}, str(tmp_path / "ref.safetensors"))
    result = subprocess.run(
        [
            sys.executable,
            "-c",
            RELOAD,
            path,
            str(tmp_path / "adapter"),
            str(tmp_path / "ref.safetensors"),
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    assert float(result.stdout.strip().splitlines()[-1]) == 0.0
    adapter_bytes = (tmp_path / "adapter" / "adapter_model.safetensors").stat().st_size
    assert adapter_bytes < 4 * trainable + sum(m.numel() for m in masks.values()) // 8 + 65536
