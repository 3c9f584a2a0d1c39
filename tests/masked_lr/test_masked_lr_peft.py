"""The MASKED_LR PEFT method on tiny llama / opt / gpt2 (Conv1D): equivalence, training,
storage, save -> fresh-process load, merging and input errors."""

from __future__ import annotations

import importlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from peft import PeftModel, get_peft_model
from peft.tuners.tuners_utils import BaseTunerLayer
from safetensors import safe_open
from safetensors.torch import save_file

import hf_sparse.masked_lr
from hf_sparse.masked_lr import MaskedLRConfig, MaskedLRLayer, get_masked_lr_model
from hf_sparse.masked_lr.config import add_peft_type
from hf_sparse.masks import save_masks
from hf_sparse.models import target_linears
from tests.conftest import build_tiny_model, make_token_windows

ARCHS = ["llama", "opt", "gpt2"]
ROOT = Path(__file__).resolve().parents[2]


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


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("outside", [0.0, 0.5])
def test_trainable_parameters_are_the_stored_entries(arch, outside):
    base = build_tiny_model(arch)
    masks = random_masks(base)
    model = get_masked_lr_model(base, MaskedLRConfig(outside_lr_scale=outside), masks)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    expected = sum(m.numel() if outside else int(m.sum()) for m in masks.values())
    assert trainable == expected


@pytest.mark.parametrize("arch", ARCHS)
def test_merge_and_unload_gives_a_plain_model_with_the_same_logits(arch):
    base = build_tiny_model(arch)
    base_class = type(base)
    ids = make_token_windows()
    base_logits = logits(base, ids)
    torch.manual_seed(1)
    model = get_masked_lr_model(base, MaskedLRConfig(init_weights=False), random_masks(base))
    adapted = logits(model, ids)
    assert not torch.allclose(adapted, base_logits)
    with model.disable_adapter():
        assert torch.equal(logits(model, ids), base_logits)
    model.merge_adapter()
    torch.testing.assert_close(logits(model, ids), adapted, rtol=0, atol=0)
    model.unmerge_adapter()
    torch.testing.assert_close(logits(model, ids), adapted, rtol=1e-5, atol=1e-6)
    merged = model.merge_and_unload()
    assert type(merged) is base_class
    assert not any(isinstance(m, BaseTunerLayer) for m in merged.modules())
    assert not any("masked_lr" in n for n, _ in merged.named_parameters())
    torch.testing.assert_close(logits(merged, ids), adapted, rtol=1e-5, atol=1e-6)


LOAD_SCRIPT = """
import json, sys, torch
from pathlib import Path
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

root = Path(sys.argv[1])
cases = json.loads((root / "cases.json").read_text())
# Without `import hf_sparse` peft does not know the method.
try:
    PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(root / cases[0] / "base"), root / cases[0] / "adapter"
    )
    raise SystemExit("loading without import hf_sparse should fail")
except KeyError as error:
    assert "MASKED_LR" in str(error), error

import hf_sparse  # registers MASKED_LR

for case in cases:
    base = AutoModelForCausalLM.from_pretrained(root / case / "base", attn_implementation="eager")
    model = PeftModel.from_pretrained(base, root / case / "adapter").eval()
    reference = load_file(root / case / "reference.safetensors")
    with torch.no_grad():
        out = model(reference["ids"]).logits
    assert torch.equal(out, reference["logits"]), (case, (out - reference["logits"]).abs().max())
print("loaded", len(cases))
"""


@pytest.mark.slow  # a fresh interpreter importing torch, transformers and peft: about 4 s
def test_save_then_load_in_a_fresh_process(tmp_path):
    cases = []
    for arch, outside in [("llama", 0.0), ("opt", 0.0), ("gpt2", 0.0), ("llama", 0.25)]:
        case = f"{arch}-{outside}"
        folder = tmp_path / case
        base = build_tiny_model(arch)
        base.save_pretrained(folder / "base")
        masks = random_masks(base)
        torch.manual_seed(2)
        config = MaskedLRConfig(init_weights=False, outside_lr_scale=outside)
        model = get_masked_lr_model(base, config, masks).eval()
        ids = make_token_windows()
        save_file({"ids": ids, "logits": logits(model, ids)}, folder / "reference.safetensors")
        model.save_pretrained(folder / "adapter")
        files = {p.name for p in (folder / "adapter").iterdir()}
        assert {"adapter_model.safetensors", "adapter_config.json"} <= files
        assert not any(name.endswith((".bin", ".pt", ".pkl")) for name in files)
        with safe_open(folder / "adapter" / "adapter_model.safetensors", "pt") as handle:
            names = handle.keys()
            packed = [k for k in names if k.endswith(".masked_lr_mask")]
            assert len(packed) == len(masks)
            assert all(handle.get_tensor(k).dtype == torch.uint8 for k in packed)
        saved = json.loads((folder / "adapter" / "adapter_config.json").read_text())
        assert saved["peft_type"] == "MASKED_LR" and saved["masks_file"] is None
        cases.append(case)
    (tmp_path / "cases.json").write_text(json.dumps(cases))
    result = subprocess.run(
        [sys.executable, "-c", LOAD_SCRIPT, str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"loaded {len(cases)}" in result.stdout


@pytest.mark.parametrize("low_cpu_mem_usage", [False, True])
def test_load_in_process_keeps_trained_values_and_masks(tmp_path, low_cpu_mem_usage):
    base = build_tiny_model("gpt2")
    masks = random_masks(base)
    model = get_masked_lr_model(base, MaskedLRConfig(), masks)
    train_steps(model)
    ids = make_token_windows()
    expected = logits(model, ids)
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(
        build_tiny_model("gpt2"), tmp_path, is_trainable=True, low_cpu_mem_usage=low_cpu_mem_usage
    )
    assert torch.equal(logits(loaded, ids), expected)
    for name, layer in masked_layers(loaded).items():
        mask = masks[name.removeprefix("base_model.model.") + ".weight"]
        assert torch.equal(layer.masked_lr_mask["default"], mask)
        assert layer.masked_lr_inside["default"].requires_grad


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


def test_integer_masks_and_a_second_adapter(tmp_path):
    base = build_tiny_model("opt")
    masks = random_masks(base)
    ids = make_token_windows()
    model = get_masked_lr_model(base, MaskedLRConfig(), {n: m.int() for n, m in masks.items()})
    torch.manual_seed(3)
    other = {n: m for n, m in random_masks(base, seed=1).items() if "fc1" in n}
    config = MaskedLRConfig(init_weights=False)
    model = get_masked_lr_model(model, config, other, adapter_name="other")
    first = logits(model, ids)
    model.set_adapter("other")
    second = logits(model, ids)
    assert not torch.allclose(second, first)
    layer = dict(model.named_modules())["base_model.model.model.decoder.layers.0.fc1"]
    assert set(layer.masked_lr_inside) == {"default", "other"}
    assert layer.masked_lr_inside["other"].requires_grad
    assert not layer.masked_lr_inside["default"].requires_grad
    model.save_pretrained(tmp_path)  # "other" goes to its own subfolder
    loaded = PeftModel.from_pretrained(build_tiny_model("opt"), tmp_path)
    loaded.load_adapter(tmp_path / "other", adapter_name="other")
    assert torch.equal(logits(loaded, ids), first)
    loaded.set_adapter("other")
    assert torch.equal(logits(loaded, ids), second)


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
        (random_masks, {"target_modules": ["c_attn"]}, ValueError, "does not select"),
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
    ids=["shape", "unknown", "untargeted", "unmasked", "values", "bias", "embedding", "none"],
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
