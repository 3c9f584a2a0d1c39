"""SPD on a GPT-2-style model (transformers' ``Conv1D``, weights stored ``[in, out]``), and SPD
adapters reloaded in a fresh Python process."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import TrainingArguments
from transformers.pytorch_utils import Conv1D

from hf_sparse.spd import SPDConfig, SPDLossConfig, get_spd_model, set_spd_ablation, spd_layers
from hf_sparse.spd.lm import _Windows, lm_metrics
from hf_sparse.spd.trainer import SPDTrainer

ROOT = Path(__file__).resolve().parents[2]
MLP = "transformer.h.1.mlp"
TARGETS = [f"{MLP}.c_fc", f"{MLP}.c_proj", "transformer.h.0.attn.c_attn"]


def _decomposed(tiny_model, C: int = 4):
    torch.manual_seed(0)
    return get_spd_model(tiny_model("gpt2"), SPDConfig(C=C, target_modules=TARGETS))


def _inputs(ids: torch.Tensor) -> dict[str, torch.Tensor]:
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def test_conv1d_targets_are_decomposed_in_out_by_in_layout(tiny_model, token_windows):
    model = _decomposed(tiny_model)
    layers = spd_layers(model)
    assert set(layers) == set(TARGETS)
    for layer in layers.values():
        base = layer.get_base_layer()
        assert isinstance(base, Conv1D)
        weight = layer.target_weight()
        assert weight.shape == (base.nf, base.weight.shape[0])  # [out, in]
        x = torch.randn(2, 5, weight.shape[1])
        torch.testing.assert_close(x @ weight.t() + base.bias, base(x))
        U, V = layer.components()
        assert U.shape == (base.nf, 4) and V.shape == (4, base.weight.shape[0])
    ids = token_windows(n=2, length=8)
    reference = tiny_model("gpt2")(**_inputs(ids)).logits
    set_spd_ablation(model, include_delta=True)  # every component plus W - UV: the target
    with torch.no_grad():
        torch.testing.assert_close(model(**_inputs(ids)).logits, reference, atol=1e-4, rtol=1e-4)


def test_conv1d_merge_of_a_fixed_component_set_matches_the_ablated_forward(
    tiny_model, token_windows
):
    model = _decomposed(tiny_model).eval()
    ids = token_windows(n=2, length=8)
    set_spd_ablation(model, keep={f"{MLP}.c_fc": [0, 2], f"{MLP}.c_proj": [1]})
    with torch.no_grad():
        ablated = model(**_inputs(ids)).logits
        merged = model.merge_and_unload()
        assert isinstance(dict(merged.named_modules())[f"{MLP}.c_fc"], Conv1D)
        torch.testing.assert_close(merged(**_inputs(ids)).logits, ablated, atol=1e-4, rtol=1e-4)


@pytest.mark.slow
def test_spd_trains_on_gpt2_and_its_metrics_run(tiny_model, token_windows, tmp_path):
    model = _decomposed(tiny_model, C=6)
    windows = token_windows(n=8, length=8, seed=1)
    loss = SPDLossConfig(output_loss="kl", faithfulness_warmup_steps=20)
    args = TrainingArguments(str(tmp_path), max_steps=15, learning_rate=1e-2, report_to=[],
                             per_device_train_batch_size=4, save_strategy="no",
                             use_cpu=True, remove_unused_columns=False, logging_steps=5,
                             disable_tqdm=True)  # fmt: skip
    layer = spd_layers(model)[f"{MLP}.c_fc"]
    before = layer.components()[0].detach().clone()
    trainer = SPDTrainer(model=model, args=args, train_dataset=_Windows(windows), spd_loss=loss)
    trainer.train()
    assert trainer.spd_warmup_loss is not None
    assert not torch.equal(layer.components()[0].detach(), before)  # U moved
    logged = [e for e in trainer.state.log_history if "spd/stochastic_recon" in e]
    assert logged and all(torch.isfinite(torch.tensor(e["loss"])) for e in logged)
    metrics = lm_metrics(model.eval(), windows[:3], loss)
    assert metrics["kl"]["all_components_plus_delta"] == pytest.approx(0.0, abs=1e-5)
    assert set(metrics["layers"]) == set(TARGETS)


FRESH = textwrap.dedent(
    """
    import json, sys
    import torch
    import hf_sparse  # registers the SPD PEFT type before PeftModel.from_pretrained
    from peft import PeftModel
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM
    from hf_sparse.spd import set_spd_ablation

    types = []
    for folder in sys.argv[1:]:
        base = AutoModelForCausalLM.from_pretrained(
            folder + "/base", attn_implementation="eager"
        ).eval()
        model = PeftModel.from_pretrained(base, folder + "/adapter").eval()
        ids = load_file(folder + "/ids.safetensors")["ids"]
        inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        with torch.no_grad():
            out = {"default": model(**inputs).logits}
            set_spd_ablation(model, ci_threshold=0.1)
            out["ci"] = model(**inputs).logits
            set_spd_ablation(model, include_delta=True)
            out["delta"] = model(**inputs).logits
        save_file({k: v.contiguous() for k, v in out.items()}, folder + "/out.safetensors")
        types.append(str(model.peft_config["default"].peft_type))
    print(json.dumps(types))
    """
)


def _save_case(tiny_model, token_windows, folder: Path, arch: str) -> dict[str, torch.Tensor]:
    """Save a base model, an SPD adapter with moved gates and token ids; return the logits
    of the three ablation modes in this process."""
    targets = TARGETS if arch == "gpt2" else ["model.layers.1.mlp.up_proj"]
    torch.manual_seed(0)
    model = get_spd_model(tiny_model(arch), SPDConfig(C=4, target_modules=targets)).eval()
    with torch.no_grad():  # move the gates off their init so the reload has something to show
        for layer in spd_layers(model).values():
            for name, param in layer.named_parameters():
                if name.startswith("spd_gate_b"):
                    param.add_(torch.randn_like(param))
    tiny_model(arch).save_pretrained(folder / "base")
    model.save_pretrained(folder / "adapter")
    ids = token_windows(n=2, length=8, seed=2)
    save_file({"ids": ids}, folder / "ids.safetensors")
    with torch.no_grad():
        expected = {"default": model(**_inputs(ids)).logits}
        set_spd_ablation(model, ci_threshold=0.1)
        expected["ci"] = model(**_inputs(ids)).logits
        set_spd_ablation(model, include_delta=True)
        expected["delta"] = model(**_inputs(ids)).logits
    assert not torch.allclose(expected["default"], expected["delta"])  # the modes differ
    return expected


@pytest.mark.slow
def test_adapters_reload_in_a_fresh_process(tiny_model, token_windows, tmp_path):
    """GPT-2 (Conv1D) and llama adapters, reloaded by a new interpreter that only imports
    hf_sparse and peft (one process for both: interpreter start-up dominates)."""
    archs = ("gpt2", "llama")
    expected = {a: _save_case(tiny_model, token_windows, tmp_path / a, a) for a in archs}
    folders = [str(tmp_path / a) for a in archs]
    done = subprocess.run([sys.executable, "-c", FRESH, *folders], cwd=ROOT, capture_output=True,
                          text=True, timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    types = json.loads(done.stdout.strip().splitlines()[-1])
    assert len(types) == 2 and all(t.endswith("SPD") for t in types)
    for arch in archs:
        got = load_file(tmp_path / arch / "out.safetensors")
        for key, value in expected[arch].items():
            torch.testing.assert_close(got[key], value, atol=1e-5, rtol=1e-5)
