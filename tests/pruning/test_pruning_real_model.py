"""SmolLM2-135M end to end through the CLI: prune, save, reload with plain from_pretrained."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from hf_sparse.cli import main
from hf_sparse.data import evaluation_windows
from hf_sparse.evaluation import perplexity, sparsity_report
from hf_sparse.masks.bitmask import load_masks
from hf_sparse.real_model import fetch_model

pytestmark = pytest.mark.real_model


@pytest.fixture(scope="module")
def smollm2() -> str:
    return str(fetch_model("smollm2-135m"))


def test_cli_prunes_smollm2_and_the_saved_model_reloads_identically(smollm2, tmp_path):
    torch.set_num_threads(2)
    out = tmp_path / "smollm2-sparsegpt"
    code = main(
        [
            "prune",
            smollm2,
            "--method",
            "sparsegpt",
            "--sparsity",
            "0.5",
            "--num-samples",
            "4",
            "--sequence-length",
            "128",
            "--no-eval",
            "--output-dir",
            str(out),
        ]
    )
    assert code == 0
    pruned = AutoModelForCausalLM.from_pretrained(out).eval()
    masks = load_masks(out / "sparsity_masks.safetensors")
    assert len(masks) == 30 * 7
    report = {r.name: r for r in sparsity_report(pruned, sorted(masks))}
    for name, keep in masks.items():
        assert report[name].sparsity == pytest.approx(0.5, abs=1e-3), name
        assert report[name].zeros == int((~keep).sum()), name
    dense = AutoModelForCausalLM.from_pretrained(smollm2).eval()
    assert torch.equal(pruned.lm_head.weight, dense.lm_head.weight)
    windows = evaluation_windows(AutoTokenizer.from_pretrained(out), "wikitext2", 128, 2)
    dense_ppl = perplexity(dense, windows, show_progress=False).perplexity
    pruned_ppl = perplexity(pruned, windows, show_progress=False).perplexity
    # Reloading gives bit-identical weights, hence identical logits, to what was saved.
    again = AutoModelForCausalLM.from_pretrained(out).eval()
    with torch.no_grad():
        assert torch.equal(again(windows).logits, pruned(windows).logits)
    assert dense_ppl < pruned_ppl < 4 * dense_ppl, (dense_ppl, pruned_ppl)
