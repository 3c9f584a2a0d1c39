"""What only MASKED_LR does, on tiny llama / opt / gpt2 (Conv1D): zero init, training inside
the mask, learning-rate scales, packed masks, loading rules and input errors. The PEFT
contract (disable, trainable parameters, save -> reload, merging, two adapters) is in
tests/test_peft_contract.py."""

from __future__ import annotations

import importlib
import json

import pytest
import torch
from peft import PeftModel, get_peft_model
from peft.tuners.tuners_utils import BaseTunerLayer
from safetensors import safe_open

import hf_sparse.masked_lr
from hf_sparse.masked_lr import MaskedLRConfig, MaskedLRLayer, get_masked_lr_model
from hf_sparse.masked_lr.config import add_peft_type
from hf_sparse.masks import save_masks
from hf_sparse.models import target_linears
from tests.conftest import build_tiny_model, make_token_windows

ARCHS = ["llama", "opt", "gpt2"]


def random_masks(model, density: float = 0.05, seed: int = 0) -> dict[str, torch.Tensor]:
    """A mask for every linear weight of the decoder blocks, keyed by full parameter name."""
    generator = torch.Generator().manual_seed(seed)
    linears = {n: m for group in target_linears(model).values() for n, m in group.items()}
    return {
        f"{name}.weight": torch.rand(module.weight.shape, generator=generator) < density
        for name, module in linears.items()
    }


def masked_layers(model) -> dict[str, MaskedLRLayer]:
    return {n: m for n, m in model.named_modules() if isinstance(m, MaskedLRLayer)}


def logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


def train_steps(model, steps: int = 3, lr: float = 1e-2, weight_decay: float = 0.0) -> None:
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    ids = make_token_windows(n=2, length=12)
    for _ in range(steps):
        optimizer.zero_grad()
        model(ids, labels=ids).loss.backward()
        optimizer.step()


@pytest.mark.parametrize("arch", ARCHS)
def test_zero_init_equals_base(arch):
    base = build_tiny_model(arch)
    ids = make_token_windows()
    expected = logits(base, ids)
    model = get_masked_lr_model(base, MaskedLRConfig(), random_masks(base))
    assert masked_layers(model)
    assert torch.equal(logits(model, ids), expected)


@pytest.mark.parametrize("arch", ARCHS)
def test_training_changes_only_masked_entries(arch):
    base = build_tiny_model(arch)
    masks = random_masks(base)
    base_weights = {n: p.detach().clone() for n, p in base.named_parameters()}
    model = get_masked_lr_model(base, MaskedLRConfig(), masks)
    train_steps(model, weight_decay=0.01)
    for name, param in model.get_base_model().named_parameters():
        if "masked_lr_" not in name:
            assert torch.equal(param, base_weights[name.replace(".base_layer", "")]), name
    for name, layer in masked_layers(model).items():
        mask = masks[name.removeprefix("base_model.model.") + ".weight"]
        delta = layer.get_delta_weight("default").detach()
        assert torch.equal(delta[~mask], torch.zeros_like(delta[~mask])), name
        assert (delta[mask] != 0).float().mean() > 0.9, name


@pytest.mark.parametrize("arch", ARCHS)
def test_outside_scale_is_a_learning_rate_multiplier(arch):
    """Adam's first step moves every entry by about lr * scale, whatever its gradient."""
    base = build_tiny_model(arch)
    masks = random_masks(base, density=0.3)
    config = MaskedLRConfig(inside_lr_scale=1.0, outside_lr_scale=0.5)
    model = get_masked_lr_model(base, config, masks)
    train_steps(model, steps=1, lr=1e-3)
    for name, layer in masked_layers(model).items():
        mask = masks[name.removeprefix("base_model.model.") + ".weight"]
        moved = layer.get_delta_weight("default").detach().abs()
        grad = torch.zeros(mask.shape)
        grad[mask] = layer.masked_lr_inside["default"].grad.abs()
        grad[~mask] = layer.masked_lr_outside["default"].grad.abs()
        clear = grad > 1e-4  # |grad| >> eps: the first Adam step is lr * sign(grad)
        inside, outside = moved[mask & clear], moved[~mask & clear]
        assert inside.numel() > 0 and outside.numel() > 0
        torch.testing.assert_close(inside, torch.full_like(inside, 1e-3), rtol=1e-3, atol=0)
        torch.testing.assert_close(outside, torch.full_like(outside, 5e-4), rtol=1e-3, atol=0)


def test_adapter_file_holds_the_values_and_each_mask_packed(tmp_path):
    """One packed uint8 mask per adapted module next to its values, no masks file in the saved
    config (the masks travel with the adapter), and the same masks after reloading."""
    base = build_tiny_model("gpt2")
    masks = random_masks(base)
    get_masked_lr_model(base, MaskedLRConfig(), masks).save_pretrained(tmp_path)
    with safe_open(tmp_path / "adapter_model.safetensors", "pt") as handle:
        packed = [k for k in handle.keys() if k.endswith(".masked_lr_mask")]  # noqa: SIM118
        assert len(packed) == len(masks)
        assert all(handle.get_tensor(k).dtype == torch.uint8 for k in packed)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["masks_file"] is None
    loaded = PeftModel.from_pretrained(build_tiny_model("gpt2"), tmp_path)
    for name, layer in masked_layers(loaded).items():
        mask = masks[name.removeprefix("base_model.model.") + ".weight"]
        assert torch.equal(layer.masked_lr_mask["default"], mask)


def test_a_saved_config_without_its_weights_refuses_to_run(tmp_path):
    base = build_tiny_model("llama")
    get_masked_lr_model(base, MaskedLRConfig(), random_masks(base)).save_pretrained(tmp_path)
    config = MaskedLRConfig.from_pretrained(tmp_path)
    model = get_peft_model(build_tiny_model("llama"), config)
    with pytest.raises(RuntimeError, match="has no mask yet"):
        model(make_token_windows())
    # Masks given in memory win over the saved config's promise of masks in the file.
    fresh = get_masked_lr_model(build_tiny_model("llama"), config, random_masks(base, seed=4))
    assert torch.equal(logits(fresh, make_token_windows()), logits(base, make_token_windows()))


def test_masks_file_with_peft_prefixed_names(tmp_path):
    base = build_tiny_model("llama")
    masks = random_masks(base)
    path = save_masks({f"base_model.model.{n}": m for n, m in masks.items()}, tmp_path / "m")
    model = get_masked_lr_model(base, MaskedLRConfig(masks_file=str(path)))
    assert len(masked_layers(model)) == len(masks)
    for name, layer in masked_layers(model).items():
        assert torch.equal(layer.masked_lr_mask["default"], masks[name[17:] + ".weight"])


def test_integer_masks_work_as_bool_masks():
    base = build_tiny_model("opt")
    masks = random_masks(base)
    model = get_masked_lr_model(base, MaskedLRConfig(), {n: m.int() for n, m in masks.items()})
    for name, layer in masked_layers(model).items():
        mask = layer.masked_lr_mask["default"]
        assert mask.dtype == torch.bool
        assert torch.equal(mask, masks[name.removeprefix("base_model.model.") + ".weight"])


def test_registration_survives_a_second_import_and_reload():
    assert add_peft_type("MASKED_LR") is add_peft_type("MASKED_LR")
    importlib.reload(hf_sparse.masked_lr)
    from peft.mapping import PEFT_TYPE_TO_TUNER_MAPPING

    assert PEFT_TYPE_TO_TUNER_MAPPING["MASKED_LR"] is hf_sparse.masked_lr.MaskedLRModel


def _gpt2_masks_wrong_layout(model):
    masks = random_masks(model)
    name = next(iter(masks))
    masks[name] = masks[name].t()
    return masks


def test_masks_outside_target_modules_are_left_out_with_a_warning(caplog):
    """Golden masks cover every block linear; target_modules picks the subset to train."""
    base = build_tiny_model("gpt2")
    masks = random_masks(base)
    with caplog.at_level("WARNING", logger="hf_sparse.masked_lr.model"):
        model = get_masked_lr_model(base, MaskedLRConfig(target_modules=["c_attn"]), masks)
    adapted = {n.removeprefix("base_model.model.") for n in masked_layers(model)}
    assert adapted == {n.removesuffix(".weight") for n in masks if "c_attn" in n}
    assert "are for modules target_modules does not select" in caplog.text


@pytest.mark.parametrize(
    ("make_masks", "config", "error", "message"),
    [
        (_gpt2_masks_wrong_layout, {}, ValueError, r"shape \(96, 32\).*shape \(32, 96\).*Conv1D"),
        (
            lambda m: {**random_masks(m), "transformer.h.9.mlp.c_fc.weight": torch.ones(2, 2)},
            {},
            ValueError,
            r"does not have.*transformer\.h\.9\.mlp\.c_fc\.weight",
        ),
        (
            lambda m: {k: v for k, v in random_masks(m).items() if "c_attn" in k},
            {"target_modules": ["c_attn", "c_fc"]},
            ValueError,
            r"have no mask.*transformer\.h\.0\.mlp\.c_fc",
        ),
        (
            lambda m: {n: v.float() * 2 for n, v in random_masks(m).items()},
            {},
            ValueError,
            "other than 0 and 1",
        ),
        (lambda m: {"transformer.h.0.attn.c_attn.bias": torch.ones(96)}, {}, ValueError, "bias"),
        (lambda m: {"transformer.wte.weight": torch.ones(128, 32)}, {}, TypeError, "Embedding"),
        (lambda m: None, {}, ValueError, "needs masks"),
    ],
    ids=["shape", "unknown", "unmasked", "values", "bias", "embedding", "none"],
)
def test_bad_masks_fail_before_the_model_changes(make_masks, config, error, message):
    base = build_tiny_model("gpt2")
    config = MaskedLRConfig(**config)
    target_modules = config.target_modules
    with pytest.raises(error, match=message):
        get_masked_lr_model(base, config, make_masks(base))
    assert not any(isinstance(m, BaseTunerLayer) for m in base.modules())
    assert config.target_modules == target_modules


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"outside_lr_scale": -0.1}, "outside_lr_scale must be finite and >= 0, got -0.1"),
        ({"inside_lr_scale": 0.0}, "inside_lr_scale must be finite and > 0, got 0.0"),
        ({"inside_lr_scale": float("nan")}, "inside_lr_scale"),
        ({"outside_lr_scale": "0.5"}, "outside_lr_scale must be a number"),
    ],
)
def test_bad_scales(fields, message):
    with pytest.raises(ValueError, match=message):
        MaskedLRConfig(**fields)


def test_very_sparse_masks_are_saved_as_positions(tmp_path):
    from safetensors import safe_open

    model = build_tiny_model("llama")
    name = "model.layers.0.mlp.up_proj.weight"
    mask = torch.zeros_like(dict(model.named_parameters())[name], dtype=torch.bool)
    mask.view(-1)[::500] = True  # 0.2% density: 4 bytes per kept entry beat 1 bit per entry
    peft_model = get_masked_lr_model(model, MaskedLRConfig(), masks={name: mask})
    peft_model.save_pretrained(tmp_path)
    with safe_open(str(tmp_path / "adapter_model.safetensors"), "pt") as handle:
        stored = {k: handle.get_tensor(k) for k in handle.keys() if "masked_lr_mask" in k}  # noqa: SIM118
    assert [t.dtype for t in stored.values()] == [torch.int32]
    reloaded = PeftModel.from_pretrained(build_tiny_model("llama"), tmp_path)
    layer = reloaded.base_model.model.model.layers[0].mlp.up_proj
    assert torch.equal(layer.masked_lr_mask["default"].cpu(), mask)
