"""SmolLM2-135M (GQA: 9 query heads, 3 KV heads): compress, save, reload, check the reduction."""

from __future__ import annotations

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from hf_sparse.basis_sharing import BasisSharingConfig, get_basis_sharing_model
from hf_sparse.real_model import MARKER, cache_root

pytestmark = pytest.mark.real_model


@pytest.fixture(scope="module")
def smollm2() -> str:
    path = cache_root() / "models" / "smollm2-135m"
    if not all((path / f).is_file() for f in (MARKER, "config.json", "model.safetensors")):
        pytest.skip(f"cached SmolLM2-135M missing at {path} (hf_sparse.fetch_model() makes it)")
    return str(path)


def test_smollm2_compresses_saves_and_reloads(smollm2, tmp_path):
    torch.set_num_threads(1)
    tokenizer = AutoTokenizer.from_pretrained(smollm2)
    text = " ".join(["The quick brown fox jumps over the lazy dog near the river bank."] * 60)
    ids = tokenizer(text, return_tensors="pt").input_ids[:, :512].reshape(4, 128)
    dense = AutoModelForCausalLM.from_pretrained(smollm2, dtype=torch.float32).eval()
    dense_total = sum(p.numel() for p in dense.parameters())
    # attention only keeps the test short; the benchmark covers every role
    config = BasisSharingConfig(ratio=0.2, group_size=2, target_roles=["q", "k", "v", "o"])
    model = get_basis_sharing_model(dense, config, calibration=ids[:2])
    counts = model.base_model.parameter_counts()
    assert 0.2 <= counts["removed"] / counts["dense"] < 0.21
    assert sum(p.numel() for p in model.parameters()) == dense_total - counts["removed"]
    assert config.group_ranks["k_0_1"] < config.group_ranks["q_0_1"]  # GQA: k is 576 -> 192
    with torch.no_grad():
        loss = model(input_ids=ids[2:], labels=ids[2:]).loss
        expected = model(input_ids=ids[2:]).logits
    assert torch.isfinite(loss) and float(loss) < 6.0  # repeated text stays predictable
    model.save_pretrained(tmp_path)
    size = (tmp_path / "adapter_model.safetensors").stat().st_size
    assert size < 4 * counts["compressed"] * 1.01
    base = AutoModelForCausalLM.from_pretrained(smollm2, dtype=torch.float32)
    loaded = PeftModel.from_pretrained(base, tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids[2:]).logits, expected, rtol=0, atol=1e-5)
