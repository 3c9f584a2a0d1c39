"""prune_ on tiny models of every architecture: sparsity per layer, structure, errors, saving."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from hf_sparse.evaluation import sparsity_report
from hf_sparse.models import target_linears, weight_matrix
from hf_sparse.pruning import (
    MagnitudeConfig,
    SparseGPTConfig,
    WandaConfig,
    apply_masks_,
    prune_,
    pruning_config_from_dict,
)
from tests.conftest import ARCHS, build_tiny_model, make_token_windows

CONFIGS = {
    "magnitude-50": MagnitudeConfig(sparsity=0.5),
    "wanda-50": WandaConfig(sparsity=0.5),
    "sparsegpt-50": SparseGPTConfig(sparsity=0.5, block_size=16),
    "wanda-2:4": WandaConfig(mask="2:4"),
    "sparsegpt-4:8": SparseGPTConfig(mask="4:8", block_size=16),
    "sparsegpt-30": SparseGPTConfig(sparsity=0.3),
}


def _linears(model, config):
    return {
        n: m
        for g in target_linears(model, config.targets, config.ignore).values()
        for n, m in g.items()
    }


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("case", list(CONFIGS))
def test_every_target_layer_has_the_requested_sparsity(arch, case):
    config = CONFIGS[case]
    model = build_tiny_model(arch)
    result = prune_(
        model, config, make_token_windows(n=4, length=16), batch_size=2, show_progress=False
    )
    linears = _linears(model, config)
    assert set(result.masks) == set(linears)
    for name, module in linears.items():
        weight = weight_matrix(module)
        keep = result.masks[name]
        assert torch.all(weight[~keep] == 0), name
        assert keep.float().mean().item() == pytest.approx(1 - config.sparsity, abs=1 / 64), name
        if config.pattern is not None:
            groups = keep.reshape(keep.shape[0], -1, config.pattern.m).sum(-1)
            assert torch.all(groups == config.pattern.n), name
    assert model.config.sparsity["method"] == config.method
    assert model.config.sparsity["measured_sparsity"] == pytest.approx(config.sparsity, abs=0.02)


def test_lm_head_and_embeddings_are_untouched():
    model = build_tiny_model("llama")
    before = {n: p.clone() for n, p in model.named_parameters() if "embed" in n or "lm_head" in n}
    prune_(model, SparseGPTConfig(sparsity=0.5), make_token_windows(n=2), show_progress=False)
    for name, param in model.named_parameters():
        if name in before:
            assert torch.equal(param, before[name]), name


def test_sparsegpt_beats_wanda_and_magnitude_on_reconstruction():
    """The OBS update should lower the output error of the first pruned block."""
    windows = make_token_windows(n=8, length=32)
    dense = build_tiny_model("llama")
    with torch.no_grad():
        reference = dense(windows).logits
    errors = {}
    for config in (
        MagnitudeConfig(sparsity=0.5),
        WandaConfig(sparsity=0.5),
        SparseGPTConfig(sparsity=0.5),
    ):
        model = build_tiny_model("llama")
        prune_(model, config, windows, show_progress=False)
        with torch.no_grad():
            errors[config.method] = (model(windows).logits - reference).pow(2).mean().item()
    assert errors["sparsegpt"] < errors["wanda"] < errors["magnitude"], errors


def test_sparsity_per_layer_and_targets():
    config = SparseGPTConfig(
        sparsity=0.5, targets=["q", "k", "down"], sparsity_per_layer={"down": 0.25}
    )
    model = build_tiny_model("llama")
    result = prune_(model, config, make_token_windows(n=2), show_progress=False)
    assert {n.split(".")[-1] for n in result.masks} == {"q_proj", "k_proj", "down_proj"}
    for name, keep in result.masks.items():
        expected = 0.25 if name.endswith("down_proj") else 0.5
        assert 1 - keep.float().mean().item() == pytest.approx(expected, abs=1 / 32)
    untouched = sparsity_report(
        model, [n.replace("q_proj", "v_proj") for n in result.masks if n.endswith("q_proj")]
    )
    assert all(r.zeros == 0 for r in untouched)


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"sparsity": 1.5}, "sparsity must be in \\[0, 1\\)"),
        ({"sparsity": -0.1}, "sparsity must be in \\[0, 1\\)"),
        ({"mask": "3:2"}, "0 < N < M"),
        ({"mask": "two:four"}, "'unstructured' or 'N:M'"),
        ({"sparsity": 0.3, "mask": "2:4"}, "contradicts"),
        ({}, "sparsity is required"),
        ({"sparsity": 0.5, "dampening": 0}, "dampening"),
        ({"sparsity": 0.5, "blocksize": 64}, "unknown key.*valid keys"),
    ],
)
def test_bad_configs_are_rejected_with_a_clear_message(values, message):
    with pytest.raises(ValueError, match=message):
        pruning_config_from_dict("sparsegpt", values)


def test_unknown_method_lists_the_valid_ones():
    with pytest.raises(ValueError, match="magnitude.*sparsegpt.*wanda"):
        pruning_config_from_dict("obs", {"sparsity": 0.5})


def test_errors_before_any_work():
    model = build_tiny_model("llama")
    before = [p.clone() for p in model.parameters()]
    with pytest.raises(ValueError, match="needs calibration data"):
        prune_(model, WandaConfig(sparsity=0.5), None)
    with pytest.raises(ValueError, match="matches no linear layer"):
        prune_(
            model,
            SparseGPTConfig(sparsity=0.5, targets=["nonexistent_proj"]),
            make_token_windows(n=2),
        )
    with pytest.raises(ValueError, match="calibration is empty"):
        prune_(model, SparseGPTConfig(sparsity=0.5), torch.zeros(0, 8, dtype=torch.long))
    odd = build_tiny_model("llama", intermediate_size=68)  # down_proj has 68 inputs
    with pytest.raises(ValueError, match="divisible by 8"):
        prune_(odd, SparseGPTConfig(mask="4:8"), make_token_windows(n=2))
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))


def test_apply_masks_rejects_mismatched_shapes_and_unknown_modules():
    model = build_tiny_model("llama")
    name = "model.layers.0.self_attn.q_proj"
    with pytest.raises(ValueError, match="shape"):
        apply_masks_(model, {name: torch.ones(3, 3, dtype=torch.bool)})
    with pytest.raises(KeyError, match="does not have"):
        apply_masks_(model, {"model.layers.9.nothing": torch.ones(3, 3, dtype=torch.bool)})


@pytest.mark.parametrize("arch", ["llama", "gpt2", "opt"])
def test_saved_model_reloads_with_plain_from_pretrained(arch, tmp_path):
    model = build_tiny_model(arch)
    prune_(model, SparseGPTConfig(sparsity=0.5), make_token_windows(n=2), show_progress=False)
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    ids = make_token_windows(n=2, length=12, seed=3)
    with torch.no_grad():
        assert torch.allclose(reloaded(ids).logits, model(ids).logits, atol=1e-6)
    assert reloaded.config.sparsity["method"] == "sparsegpt"


def test_peft_wrapped_model_prunes_base_layers_not_adapters():
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(build_tiny_model("llama"), LoraConfig(target_modules=["q_proj"], r=4))
    lora_before = {n: p.clone() for n, p in model.named_parameters() if "lora_" in n}
    result = prune_(
        model,
        SparseGPTConfig(sparsity=0.5, targets=["q", "down"]),
        make_token_windows(n=2),
        show_progress=False,
    )
    assert sorted(
        n.rsplit(".", 2)[-2:][0] if n.endswith("base_layer") else n.rsplit(".", 1)[-1]
        for n in result.masks
    ) == ["down_proj", "down_proj", "q_proj", "q_proj"]
    for name, param in model.named_parameters():
        if name in lora_before:
            assert torch.equal(param, lora_before[name]), name


def test_stacked_obs_solve_equals_layer_by_layer_solves():
    """q/k/v (and gate/up) are solved stacked; rows are independent given H."""
    from hf_sparse.pruning.core import obs_prune

    torch.manual_seed(0)
    x = torch.randn(256, 32)
    hessian = x.t() @ x / 256
    a, b = torch.randn(12, 32), torch.randn(8, 32)
    stacked, keep = obs_prune(
        torch.cat([a, b]), hessian, 0.5, block_size=8, row_groups=[(12, 0.5), (8, 0.25)]
    )
    alone_a, keep_a = obs_prune(a, hessian, 0.5, block_size=8)
    alone_b, keep_b = obs_prune(b, hessian, 0.25, block_size=8)
    assert torch.equal(keep, torch.cat([keep_a, keep_b]))
    assert torch.allclose(stacked, torch.cat([alone_a, alone_b]), atol=1e-5)
    with pytest.raises(ValueError, match="do not cover"):
        obs_prune(a, hessian, 0.5, row_groups=[(5, 0.5)])
