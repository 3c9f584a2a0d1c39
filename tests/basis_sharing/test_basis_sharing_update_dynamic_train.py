"""Coefficient update, dynamic rank, Trainer fine-tuning, the callback and LoRA on top."""

from __future__ import annotations

import pytest
import torch
from hf_sparse.callbacks.basis_sharing import BasisSharingCallback
from transformers import Trainer, TrainingArguments

from hf_sparse.basis_sharing import (
    BasisSharingConfig,
    BasisSharingLayer,
    dynamic_rank,
    get_basis_sharing_model,
    update_coefficients_,
)
from hf_sparse.basis_sharing.update import collect_compressed_stats
from tests.conftest import build_tiny_model, make_token_windows


def tiny(arch: str = "llama"):
    return build_tiny_model(arch, num_hidden_layers=4)


def calib(n: int = 16) -> torch.Tensor:
    return make_token_windows(n=n, length=32, seed=1)


def layer_output_error(model, dense_weights, ids) -> float:
    """sum over layers of ||X W^T - layer(X)||^2 on the compressed model's own inputs."""
    grams = collect_compressed_stats(model, ids)
    total = 0.0
    for name, layer in model.base_model.layers("default").items():
        diff = (dense_weights[name] - layer.get_delta_weight("default")).detach().double()
        total += float(torch.trace(diff @ grams[name].double() @ diff.t()))
    return total


def test_update_lowers_the_error_on_the_compressed_models_inputs():
    ids = calib()
    dense = tiny()
    weights = {
        n: m.weight.detach().clone()
        for n, m in dense.named_modules()
        if isinstance(m, torch.nn.Linear) and "layers" in n
    }
    config = BasisSharingConfig(ratio=0.4, drop_dense_weights=False)
    model = get_basis_sharing_model(dense, config, calibration=ids)
    before = layer_output_error(model, weights, ids)
    bank = model.base_model.basis_sharing_bases["default"]
    bases = {k: v.detach().clone() for k, v in bank.items()}
    assert update_coefficients_(model, ids) == len(weights)
    after = layer_output_error(model, weights, ids)
    assert after < before
    for key, value in bank.items():
        torch.testing.assert_close(value, bases[key])  # only coefficients move


def test_compressed_stats_are_each_layers_input_gram():
    """Reference: plain hooks storing every input of every compressed layer (dropped dense
    weights included, so the collector must size them from the input)."""
    ids = calib(4)
    model = get_basis_sharing_model(tiny(), BasisSharingConfig(ratio=0.4), calibration=calib())
    layers = model.base_model.layers("default")
    seen: dict[str, list[torch.Tensor]] = {name: [] for name in layers}
    handles = [
        layer.register_forward_hook(
            lambda _m, args, _o, name=name: seen[name].append(args[0].detach().clone())
        )
        for name, layer in layers.items()
    ]
    with torch.no_grad():
        for batch in ids.split(3):  # the same batches as batch_size=3 below
            model(input_ids=batch, use_cache=False)
    for handle in handles:
        handle.remove()
    grams = collect_compressed_stats(model, ids, batch_size=3)
    assert set(grams) == set(layers)
    for name, inputs in seen.items():
        rows = torch.cat([x.reshape(-1, x.shape[-1]) for x in inputs]).double()
        assert grams[name].dtype == torch.float32
        torch.testing.assert_close(grams[name].double(), rows.t() @ rows, rtol=1e-5, atol=1e-4)
    # q/k/v read the same tensor: one product, shared
    assert grams["model.layers.0.self_attn.q_proj"] is grams["model.layers.0.self_attn.k_proj"]
    assert grams["model.layers.0.self_attn.q_proj"] is not grams["model.layers.0.self_attn.o_proj"]


def test_update_needs_dense_weights_once_dropped():
    model = get_basis_sharing_model(tiny(), BasisSharingConfig(ratio=0.4), calibration=calib())
    with pytest.raises(ValueError, match="dense_weights"):
        update_coefficients_(model, calib())


def test_dynamic_rank_strategies():
    ids = calib(4)
    model = get_basis_sharing_model(tiny(), BasisSharingConfig(ratio=0.2), calibration=calib())
    with torch.no_grad():
        full = model(input_ids=ids).logits
        with dynamic_rank(model, "baseline") as report:
            assert torch.equal(model(input_ids=ids).logits, full)
        assert report.mean_fraction == 1.0 and len(report.active) > 0
        with dynamic_rank(model, "global_static", energy=1.0) as report:
            torch.testing.assert_close(model(input_ids=ids).logits, full)
        fractions = {}
        for strategy in ("global_static", "prompt_adaptive"):
            with dynamic_rank(model, strategy, energy=0.6) as report:
                model(input_ids=ids)
            fractions[strategy] = report.mean_fraction
            assert 0 < report.mean_fraction < 1
            assert all(1 <= a <= f for a, f in zip(report.active, report.full, strict=True))
        # per sequence: one rank per sequence and layer call
        with dynamic_rank(model, "prompt_adaptive", energy=0.6) as report:
            model(input_ids=ids)
        assert len(report.active) == ids.shape[0] * len(model.base_model.layers("default"))
        with dynamic_rank(model, "prompt_adaptive", energy=0.9) as high:
            model(input_ids=ids)
        assert high.mean_rank > report.mean_rank
    assert all(
        m.basis_sharing_rank_policy is None
        for m in model.modules()
        if isinstance(m, BasisSharingLayer)
    )
    from hf_sparse.basis_sharing.dynamic_rank import energy_for_fraction, static_fraction

    # generation: decoding steps keep the ranks their prompt chose at prefill
    n_layers = len(model.base_model.layers("default"))
    with dynamic_rank(model, "prompt_adaptive", energy=0.6) as gen, torch.no_grad():
        model.generate(input_ids=ids[:1, :8], max_new_tokens=3, min_new_tokens=3, do_sample=False)
    prefill = gen.active[:n_layers]
    assert gen.active == prefill * (len(gen.active) // n_layers)

    target = report.mean_fraction
    matched = energy_for_fraction(model, target)
    assert static_fraction(model, matched) <= target + 1e-9
    with dynamic_rank(model, "global_static", matched) as same_budget, torch.no_grad():
        model(input_ids=ids)
    assert same_budget.mean_fraction == pytest.approx(static_fraction(model, matched))
    with pytest.raises(ValueError, match="strategy must be one of"), dynamic_rank(model, "oracle"):
        pass


def _trainer(model, tmp_path, callbacks=(), steps: int = 3) -> Trainer:
    data = [{"input_ids": w, "labels": w.clone()} for w in calib(8)]
    args = TrainingArguments(
        output_dir=str(tmp_path),
        per_device_train_batch_size=4,
        max_steps=steps,
        learning_rate=1e-2,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        logging_steps=1,
    )
    return Trainer(model=model, args=args, train_dataset=data, callbacks=list(callbacks))


def test_trainer_trains_the_coefficients_of_a_compressed_model(tmp_path):
    model = get_basis_sharing_model(tiny(), BasisSharingConfig(ratio=0.3), calibration=calib())
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    result = _trainer(model, tmp_path).train()
    assert result.training_loss > 0
    for name, param in model.named_parameters():
        moved = not torch.equal(param, before[name])
        assert moved == ("basis_sharing_coefficient" in name), name


def test_callback_compresses_at_train_begin_and_then_trains(tmp_path):
    model = get_basis_sharing_model(tiny(), BasisSharingConfig(ratio=0.3), defer=True)
    layers = model.base_model.layers("default")
    assert all(layer.dense_weight_present() for layer in layers.values())
    ids = calib(2)
    with torch.no_grad():
        dense = model(input_ids=ids).logits  # pending: the dense model
    callback = BasisSharingCallback(num_batches=2)
    _trainer(model, tmp_path, [callback]).train()
    assert callback.compressed and callback.counts["removed"] > 0
    assert not any(layer.dense_weight_present() for layer in layers.values())
    with torch.no_grad():
        assert not torch.allclose(model(input_ids=ids).logits, dense)
    coefficient = next(iter(layers.values())).basis_sharing_coefficient["default"]
    assert coefficient.abs().sum() > 0  # filled, then trained in the same parameter


def test_callback_rejects_bad_arguments():
    with pytest.raises(ValueError, match="num_batches"):
        BasisSharingCallback(num_batches=0)


def test_lora_on_top_of_the_factorized_compressed_model(tmp_path):
    from peft import LoraConfig, PeftModel, get_peft_model

    from hf_sparse.basis_sharing import FactorizedLinear, unload_factorized

    ids = calib(4)
    compressed = get_basis_sharing_model(
        tiny("gpt2"), BasisSharingConfig(ratio=0.3), calibration=calib()
    )
    with torch.no_grad():
        expected = compressed(input_ids=ids).logits
    total = sum(p.numel() for p in compressed.parameters())
    plain = unload_factorized(compressed)
    factorized = [m for m in plain.modules() if isinstance(m, FactorizedLinear)]
    assert factorized and factorized[0].basis is factorized[4].basis  # c_attn of layers 0, 1
    assert sum(p.numel() for p in plain.parameters()) == total  # sharing kept, nothing copied
    with torch.no_grad():
        torch.testing.assert_close(plain(input_ids=ids).logits, expected)
    lora = get_peft_model(plain, LoraConfig(r=4, target_modules=["coefficient"]))
    names = {n for n, p in lora.named_parameters() if p.requires_grad}
    assert names and all("lora_" in n for n in names)
    _trainer(lora, tmp_path, steps=3).train()
    lora.eval()  # GPT-2 has dropout
    with torch.no_grad():
        trained = lora(input_ids=ids).logits
    assert not torch.allclose(trained, expected)
    lora.save_pretrained(tmp_path / "lora")
    rebuilt = unload_factorized(
        get_basis_sharing_model(tiny("gpt2"), BasisSharingConfig(ratio=0.3), calibration=calib())
    )
    loaded = PeftModel.from_pretrained(rebuilt, tmp_path / "lora").eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, trained)
