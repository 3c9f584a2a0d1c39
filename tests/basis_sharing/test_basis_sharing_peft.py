"""What only BASIS_SHARING does, on every architecture: shared bases and their plan, memory,
storage of each basis once, what trains, and input errors. The PEFT contract (disable, trainable
parameters, save -> reload, merging, two adapters) is in tests/test_peft_contract.py."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from hf_sparse.basis_sharing import (
    BasisSharingConfig,
    BasisSharingLayer,
    collect_input_stats,
    get_basis_sharing_model,
)
from tests.conftest import build_tiny_model, make_token_windows

LAYERS = 4
CASES = {  # name -> (architecture, config kwargs)
    "llama-g2": ("llama", {"ratio": 0.2, "group_size": 2}),
    "mistral-g4-refit": ("mistral", {"ratio": 0.3, "group_size": 4, "layer_refit": True}),
    "qwen2-g2-update": ("qwen2", {"ratio": 0.4, "group_size": 2, "update_coefficients": True}),
    "opt-g2": ("opt", {"ratio": 0.2, "group_size": 2}),
    "gpt2-g3": ("gpt2", {"ratio": 0.25, "group_size": 3}),
    "llama-plain-svd": ("llama", {"ratio": 0.2, "group_size": 1, "whitening": False}),
    "llama-g2-kv-private0": (
        "llama",
        {"ratio": 0.3, "group_size": 2, "shared_roles": ["k", "v"], "private_blocks": [0]},
    ),
}


def tiny(arch: str, seed: int = 0):
    layers = {"n_layer": LAYERS} if arch == "gpt2" else {"num_hidden_layers": LAYERS}
    return build_tiny_model(arch, seed=seed, **layers)


def calib() -> torch.Tensor:
    return make_token_windows(n=8, length=32, seed=1)


def logits(model, ids) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


def compressed(name: str):
    arch, kwargs = CASES[name]
    config = BasisSharingConfig(**kwargs)
    return get_basis_sharing_model(tiny(arch), config, calibration=calib())


def test_adapter_file_holds_each_basis_once_and_no_dense_weight(tmp_path):
    model = compressed("gpt2-g3")
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    with safe_open(tmp_path / "adapter_model.safetensors", "pt") as handle:
        keys = set(handle.keys())
    bases = [k for k in keys if k.startswith("base_model.basis_sharing_bases.")]
    assert sorted(k.rsplit(".", 1)[1] for k in bases) == sorted(set(saved["layer_groups"].values()))
    coefficients = [k for k in keys if k.endswith(".basis_sharing_coefficient")]
    assert len(coefficients) == len(saved["layer_groups"])
    assert not any(k.endswith(".weight") for k in keys)


@pytest.mark.parametrize("name", list(CASES))
def test_structure_sharing_and_memory(name):
    arch, kwargs = CASES[name]
    dense = tiny(arch)
    dense_total = sum(p.numel() for p in dense.parameters())
    model = compressed(name)
    tuner = model.base_model
    config = model.peft_config["default"]
    layers = tuner.layers("default")
    assert set(layers) == set(config.layer_groups)
    # layers with the same key read the very same basis tensor; it is registered once
    by_key: dict[str, list] = {}
    for layer in layers.values():
        by_key.setdefault(layer.basis_sharing_key["default"], []).append(layer)
    for key, members in by_key.items():
        assert all(m.basis("default") is members[0].basis("default") for m in members)
        assert members[0].basis("default").shape[0] == config.group_ranks[key]
    shared = [k for k, m in by_key.items() if len(m) > 1]
    assert bool(shared) == (config.group_size > 1)
    for layer in layers.values():
        assert not layer.dense_weight_present()
    counts = tuner.parameter_counts()
    total = sum(p.numel() for p in model.parameters())
    assert total == dense_total - counts["removed"]
    ratio = kwargs["ratio"]
    assert ratio <= counts["removed"] / counts["dense"] < ratio + 0.1  # floor of k: >= ratio


def test_gqa_keys_and_values_are_narrower_and_get_their_own_rank():
    model = compressed("llama-g2")
    config = model.peft_config["default"]
    tuner = model.base_model
    layer = tuner.layers("default")
    q = layer["model.layers.0.self_attn.q_proj"]
    k = layer["model.layers.0.self_attn.k_proj"]
    assert k.out_features == q.out_features // 2  # 2 KV heads of 4
    assert config.group_ranks["k_0_1"] < config.group_ranks["q_0_1"]
    assert config.layer_groups["model.layers.1.self_attn.k_proj"] == "k_0_1"
    assert config.layer_groups["model.layers.1.self_attn.o_proj"] == "o_1"  # private


def test_private_blocks_keep_their_own_basis_and_the_rest_group_in_order():
    model = compressed("llama-g2-kv-private0")
    groups = model.peft_config["default"].layer_groups
    attn = "model.layers.{}.self_attn.{}_proj"
    assert [groups[attn.format(i, "k")] for i in range(LAYERS)] == [
        "k_0",
        "k_1_2",
        "k_1_2",
        "k_3_3",
    ]
    assert [groups[attn.format(i, "q")] for i in range(LAYERS)] == ["q_0", "q_1", "q_2", "q_3"]
    layers = model.base_model.layers("default")
    k = [layers[attn.format(i, "k")].basis("default") for i in range(LAYERS)]
    assert k[1] is k[2] and k[0] is not k[1]
    # without private_blocks, block 0 shares with block 1
    plain = get_basis_sharing_model(
        tiny("llama"),
        BasisSharingConfig(ratio=0.3, group_size=2, shared_roles=["k", "v"]),
        calibration=calib(),
    )
    assert plain.peft_config["default"].layer_groups[attn.format(0, "k")] == "k_0_1"


def test_compression_error_falls_with_group_quality_and_whitening():
    """On calibration inputs, whitened per-layer SVD beats plain SVD at the same ratio."""
    ids = calib()
    dense_logits = logits(tiny("llama"), ids)
    errors = {}
    for whitening in (False, True):
        config = BasisSharingConfig(ratio=0.2, group_size=1, whitening=whitening)
        model = get_basis_sharing_model(tiny("llama"), config, calibration=ids)
        errors[whitening] = float((logits(model, ids) - dense_logits).pow(2).mean())
    assert errors[True] < errors[False]


def test_stats_are_reusable_across_configs_and_equal_calibration():
    ids = calib()
    stats = collect_input_stats(tiny("llama"), ids)
    a = get_basis_sharing_model(tiny("llama"), BasisSharingConfig(ratio=0.3), stats=stats)
    b = get_basis_sharing_model(tiny("llama"), BasisSharingConfig(ratio=0.3), calibration=ids)
    torch.testing.assert_close(logits(a, ids), logits(b, ids))
    c = get_basis_sharing_model(tiny("llama"), BasisSharingConfig(ratio=0.2), stats=stats)
    assert not torch.allclose(logits(a, ids), logits(c, ids))


def test_unload_without_merging_is_refused():
    model = compressed("llama-g2")
    with pytest.raises(ValueError, match="merge_and_unload"):
        model.base_model.unload()


def test_bases_train_instead_of_coefficients_when_asked():
    config = BasisSharingConfig(ratio=0.2, train_bases=True, train_coefficients=False)
    model = get_basis_sharing_model(tiny("llama"), config, calibration=calib())
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {
        f"base_model.basis_sharing_bases.default.{key}" for key in config.group_ranks
    }


# ---------------------------------------------------------------- bad input, before any work


def untouched(model) -> bool:
    return not any(isinstance(m, BasisSharingLayer) for m in model.modules())


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"ratio": 1.0}, "ratio must be in"),
        ({"ratio": 0}, "ratio must be in"),
        ({"group_size": 0}, "group_size must be a positive integer"),
        ({"target_roles": ["attn"]}, "unknown role"),
        ({"role_ratios": {"down": 1.2}}, r"role_ratios\['down'\] must be in"),
        ({"damping": -1.0}, "damping must be"),
        ({"private_blocks": [-1]}, "private_blocks must be a list of block indices"),
        ({"private_blocks": "0"}, "private_blocks must be a list of block indices"),
    ],
)
def test_config_errors_name_the_field(kwargs, message):
    with pytest.raises(ValueError, match=message):
        BasisSharingConfig(**kwargs)


@pytest.mark.parametrize(
    ("arch", "kwargs", "message"),
    [
        ("llama", {"group_size": 5}, "larger than the number of layers"),
        ("llama", {"target_roles": ["fc1"]}, "which this llama model lacks"),
        ("gpt2", {"target_roles": ["q"]}, "which this gpt2 model lacks"),
        ("llama", {"target_roles": ["q"], "shared_roles": ["k"]}, "not compressed here"),
        ("llama", {"private_blocks": [0, 4]}, r"private_blocks has \[4\].*4 blocks"),
    ],
)
def test_model_dependent_errors_come_before_any_change(arch, kwargs, message):
    model = tiny(arch)
    with pytest.raises(ValueError, match=message):
        get_basis_sharing_model(model, BasisSharingConfig(**kwargs), calibration=calib())
    assert untouched(model)


def test_a_rank_above_min_of_input_and_stacked_output_is_refused():
    # the formula never exceeds min(d_in, n*d_out); an explicit (edited) plan can
    model = tiny("llama")
    config = BasisSharingConfig(ratio=0.2, group_size=2, whitening=False)
    get_basis_sharing_model(tiny("llama"), config)
    plan = config.to_dict()
    plan["group_ranks"]["k_0_1"] = 33  # k: 2 layers of [16, 32] -> at most 32
    bad = BasisSharingConfig(
        **{
            k: v
            for k, v in plan.items()
            if k
            in ("ratio", "group_size", "whitening", "layer_groups", "group_ranks", "target_modules")
        }
    )
    with pytest.raises(ValueError, match=r"above min\(d_in, n\*d_out\) = 32"):
        get_basis_sharing_model(model, bad)
    assert untouched(model)


def test_missing_calibration_data_is_refused_before_work():
    model = tiny("llama")
    with pytest.raises(ValueError, match="calibration data is missing"):
        get_basis_sharing_model(model, BasisSharingConfig(ratio=0.2))
    stats = collect_input_stats(tiny("llama"), calib())
    config = BasisSharingConfig(ratio=0.2, update_coefficients=True)
    with pytest.raises(ValueError, match="update_coefficients=True needs calibration"):
        get_basis_sharing_model(model, config, stats=stats)
    stats = {"model.layers.0.self_attn.q_proj": stats["model.layers.0.self_attn.q_proj"]}
    with pytest.raises(ValueError, match="no calibration statistics"):
        get_basis_sharing_model(model, BasisSharingConfig(ratio=0.2), stats=stats)
    assert untouched(model) or all(
        m.dense_weight_present() for m in model.modules() if isinstance(m, BasisSharingLayer)
    )
