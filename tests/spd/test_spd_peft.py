"""What only SPD does: bad input, the decomposition and its ablations, merging a chosen set of
components, the losses, tied layers, transformers models. The PEFT contract (disable, trainable
parameters, save -> reload, merging, two adapters) is in tests/test_peft_contract.py."""

from __future__ import annotations

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from torch import nn

from hf_sparse.spd import (
    SPDConfig,
    SPDLossConfig,
    get_spd_model,
    set_spd_ablation,
    spd_layers,
    spd_loss,
)
from hf_sparse.spd.layer import SPDRuntime
from hf_sparse.spd.model import spd_runtime
from hf_sparse.spd.toy_models import TMSConfig, build_toy_model


def _tms(seed: int = 0, hidden_layers: int = 0) -> nn.Module:
    return build_toy_model(TMSConfig(n_hidden_layers=hidden_layers), seed=seed).eval()


def _spd(model: nn.Module, **kwargs) -> PeftModel:
    torch.manual_seed(0)
    kwargs.setdefault("target_modules", ["linear1", "linear2"])
    return get_spd_model(model, SPDConfig(C=kwargs.pop("C", 6), **kwargs))


X = torch.rand(16, 5)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"C": 0}, "C must be an integer >= 1"),
        ({"C": 2.5}, "C must be"),
        ({"gate_hidden": 0}, "gate_hidden"),
        ({"leak": 0.0}, "leak"),
        ({"target_modules": None}, "target_modules is required"),
        ({"tied_modules": ["linear2", "linear1"]}, "tied_modules must map"),
        ({"tied_modules": {"linear2": "linear1", "linear1": "x"}}, "both tied and a source"),
    ],
)
def test_config_rejects_bad_values(kwargs, match):
    kwargs.setdefault("target_modules", ["linear1"])
    with pytest.raises(ValueError, match=match):
        SPDConfig(**kwargs)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"pnorm": 0.0}, "pnorm"),
        ({"pnorm": -2}, "pnorm"),
        ({"output_loss": "l1"}, "output_loss"),
        ({"n_mask_samples": 0}, "n_mask_samples"),
        ({"importance_minimality_end_frac": 1.5}, "end_frac"),
        ({"stochastic_recon_coeff": 0, "stochastic_recon_layerwise_coeff": 0}, "both"),
    ],
)
def test_loss_config_rejects_bad_values(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SPDLossConfig(**kwargs)


def test_targets_that_are_not_linear_layers_fail_before_any_change():
    model = _tms(hidden_layers=1)
    with pytest.raises(ValueError, match="linear layers only.*ModuleList"):
        get_spd_model(model, SPDConfig(C=3, target_modules=["linear1", "hidden_layers"]))
    assert isinstance(model.linear1, nn.Linear)  # untouched
    with pytest.raises(ValueError, match="matches no module"):
        get_spd_model(_tms(), SPDConfig(C=3, target_modules=["nope"]))


def test_all_components_plus_delta_is_the_target():
    expected = _tms()(X)
    model = _spd(_tms())
    set_spd_ablation(model, include_delta=True)
    torch.testing.assert_close(model(x=X), expected, atol=1e-5, rtol=1e-5)
    set_spd_ablation(model)
    assert not torch.allclose(model(x=X), expected, atol=1e-3)  # random U V != W


def test_keep_runs_exactly_the_chosen_components():
    model = _spd(_tms())
    layers = spd_layers(model)
    set_spd_ablation(model, keep={"linear1": [0, 3]})
    out = model(x=X)
    U1, V1 = layers["linear1"].components()
    U2, V2 = layers["linear2"].components()
    bias = layers["linear2"].get_base_layer().bias
    W1 = U1[:, [0, 3]] @ V1[[0, 3]]
    expected = torch.relu(X @ W1.t() @ (U2 @ V2).t() + bias)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="not decomposed"):
        set_spd_ablation(model, keep={"linear3": [0]})
    with pytest.raises(ValueError, match=r"\[0, 6\)"):
        set_spd_ablation(model, keep={"linear1": [6]})


def test_ci_threshold_drops_unimportant_components_per_input():
    model = _spd(_tms())
    layers = spd_layers(model)
    with torch.no_grad():  # linear1: components 0 and 5 always on, the rest off; linear2: all on
        layers["linear1"].spd_gate_b2["default"].copy_(torch.tensor([5.0, -5, -5, -5, -5, 5]))
        layers["linear2"].spd_gate_b2["default"].fill_(5.0)
        for layer in layers.values():
            layer.spd_gate_w2["default"].zero_()
    set_spd_ablation(model, ci_threshold=0.5)
    out = model(x=X)
    set_spd_ablation(model, keep={"linear1": [0, 5]})
    torch.testing.assert_close(out, model(x=X))


def _nudge_trainable(model) -> None:
    """Move every trainable parameter off its initial value (so a round trip is not trivial)."""
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn_like(p))


def test_merge_writes_the_kept_components_and_unmerge_restores_the_target():
    model = _spd(_tms())
    _nudge_trainable(model)
    layers = spd_layers(model)
    target = layers["linear1"].target_weight().detach().clone()
    set_spd_ablation(model, keep={"linear1": [0, 3]})
    expected = model(x=X)
    model.merge_adapter()
    U, V = layers["linear1"].components()
    torch.testing.assert_close(layers["linear1"].get_base_layer().weight, U[:, [0, 3]] @ V[[0, 3]])
    assert torch.equal(layers["linear1"].target_weight(), target)  # the gates' and delta's W
    torch.testing.assert_close(model(x=X), expected)
    with pytest.raises(RuntimeError, match="unmerge_adapter"):
        set_spd_ablation(model)
    with spd_runtime(model, {}), pytest.raises(RuntimeError, match="unmerge_adapter"):
        model(x=X)
    with model.disable_adapter():  # unmerges, as peft's layers do
        torch.testing.assert_close(model(x=X), _tms()(X))
    assert torch.equal(layers["linear1"].get_base_layer().weight, target)
    set_spd_ablation(model, include_delta=True)  # every component plus W - UV: the target
    plain = model.merge_and_unload()
    assert isinstance(plain.linear1, nn.Linear) and not spd_layers(plain)
    torch.testing.assert_close(plain(X), _tms()(X), atol=1e-5, rtol=1e-5)


def test_a_causal_importance_threshold_cannot_be_merged():
    model = _spd(_tms())
    set_spd_ablation(model, ci_threshold=0.5)
    with pytest.raises(ValueError, match=r"ci_threshold.*set_spd_ablation\(model, keep=\.\.\.\)"):
        model.merge_and_unload()
    assert not any(layer.merged for layer in spd_layers(model).values())


def test_spd_loss_terms_and_gradients():
    model = _spd(_tms())
    config = SPDLossConfig(faithfulness_coeff=1.0)
    result = spd_loss(model, {"x": X}, config, generator=torch.Generator().manual_seed(0))
    for key in ("faithfulness", "stochastic_recon", "stochastic_recon_layerwise"):
        assert result.terms[key] > 0
    assert result.terms["importance_minimality"] > 0
    assert set(result.ci_lower) == {"linear1", "linear2"}
    result.total.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert all(g is not None and torch.isfinite(g).all() for g in grads.values())
    assert any(float(g.abs().sum()) > 0 for n, g in grads.items() if "gate" in n)


def test_masks_of_one_with_delta_reproduce_the_target():
    model = _spd(_tms())
    expected = _tms()(X)
    ones = {
        n: SPDRuntime("masked", mask=torch.ones(16, 6), delta_mask=torch.ones(16))
        for n in ("linear1", "linear2")
    }
    with spd_runtime(model, ones):
        torch.testing.assert_close(model(x=X), expected, atol=1e-5, rtol=1e-5)


def test_decomposes_a_transformers_model_with_kl(tiny_model, token_windows):
    base = tiny_model("llama")
    config = SPDConfig(
        C=4, target_modules=["model.layers.0.mlp.up_proj", "model.layers.1.self_attn.o_proj"]
    )
    torch.manual_seed(0)
    model = get_spd_model(base, config)
    ids = token_windows(n=2, length=8)
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    result = spd_loss(model, inputs, SPDLossConfig(output_loss="kl"))
    assert result.terms["stochastic_recon"] > 0
    assert result.ci_lower["model.layers.0.mlp.up_proj"].shape == (2, 8, 4)
    set_spd_ablation(model, include_delta=True)
    with torch.no_grad():
        torch.testing.assert_close(
            model(**inputs).logits, tiny_model("llama")(**inputs).logits, atol=1e-4, rtol=1e-4
        )


def test_lm_passes_replay_the_undecomposed_first_blocks_exactly(tiny_model, token_windows):
    from hf_sparse.spd.objective import model_output, target_pass

    torch.manual_seed(0)
    model = get_spd_model(
        tiny_model("llama"), SPDConfig(C=4, target_modules=["model.layers.1.mlp.down_proj"])
    )
    ids = token_windows(n=2, length=8)
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    target = target_pass(model, inputs)
    assert target.prefix is not None and len(target.prefix.blocks) == 1
    name = "model.layers.1.mlp.down_proj"
    mask = torch.rand(2, 8, 4)
    with torch.no_grad():
        with spd_runtime(model, {name: SPDRuntime("masked", mask=mask)}):
            full = model_output(model, inputs)
            with target.replay():
                replayed = model_output(model, inputs)
                block = target.prefix.blocks[0]
                assert "forward" in block.__dict__
        assert "forward" not in block.__dict__  # restored
    torch.testing.assert_close(replayed, full)
    assert not torch.allclose(full, target.output)


def _tied(model: nn.Module, **kwargs) -> PeftModel:
    return _spd(model, tied_modules={"linear2": "linear1"}, **kwargs)


def test_tied_layer_uses_the_source_components_transposed():
    model = _tied(_tms())
    layers = spd_layers(model)
    U1, V1 = layers["linear1"].components()
    U2, V2 = layers["linear2"].components()
    assert torch.equal(U2, V1.t()) and torch.equal(V2, U1.t())
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert not any("linear2.spd_U" in n or "linear2.spd_V" in n for n in trainable)
    assert any("linear2.spd_gate_w1" in n for n in trainable)  # own gates
    set_spd_ablation(model, include_delta=True)  # the delta still makes it exact
    torch.testing.assert_close(model(x=X), _tms()(X), atol=1e-5, rtol=1e-5)


def test_a_loss_on_the_tied_layer_trains_the_source_components():
    model = _tied(_tms())
    layers = spd_layers(model)
    ones = {"linear2": SPDRuntime("masked", use_delta=False)}
    with spd_runtime(model, ones):
        model(x=X).pow(2).sum().backward()
    assert float(layers["linear1"].spd_U["default"].grad.abs().sum()) > 0
    assert float(layers["linear1"].spd_V["default"].grad.abs().sum()) > 0


def test_tied_decomposition_saves_once_and_reloads_tied(tmp_path):
    model = _tied(_tms())
    _nudge_trainable(model)
    expected = model(x=X)
    model.save_pretrained(tmp_path)
    saved = load_file(tmp_path / "adapter_model.safetensors")
    assert not any("linear2" in k and (".spd_U" in k or ".spd_V" in k) for k in saved)
    reloaded = PeftModel.from_pretrained(_tms(), tmp_path)
    torch.testing.assert_close(reloaded(x=X), expected)
    layers = spd_layers(reloaded)
    with torch.no_grad():
        layers["linear1"].spd_U["default"].mul_(2.0)
    torch.testing.assert_close(
        layers["linear2"].components()[1], layers["linear1"].spd_U["default"].t()
    )


def test_tied_modules_must_name_decomposed_layers_of_transposed_shape():
    model = _tms()
    with pytest.raises(ValueError, match="matches 0 decomposed layers"):
        _spd(model, tied_modules={"linear3": "linear1"})
    assert not spd_layers(model)  # refused before any layer was replaced
    with pytest.raises(ValueError, match="transpose"):
        _spd(
            _tms(hidden_layers=1),
            target_modules=["linear1", "hidden_layers.0"],
            tied_modules={"hidden_layers.0": "linear1"},
        )
