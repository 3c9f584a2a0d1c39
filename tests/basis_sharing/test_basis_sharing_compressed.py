"""The compressed Basis Sharing model: a folder that stores each basis once, loads with stock
transformers (remote code where hf_sparse is absent, registered classes once it is imported),
gives the adapter's logits and generates with a KV cache."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from safetensors import safe_open
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from hf_sparse.basis_sharing import (
    BasisSharingConfig,
    basis_sharing_recipe_from_dict,
    get_basis_sharing_model,
    is_compressed_basis_sharing,
    load_compressed,
    save_compressed,
    to_compressed,
)
from tests.conftest import build_tiny_model, make_token_windows

CASES = {  # name -> (architecture, model overrides, config kwargs)
    "llama-tied-g2": ("llama", {"tie_word_embeddings": True}, {"ratio": 0.3, "group_size": 2}),
    "qwen2-bias-g4-refit": (
        "qwen2",
        {},
        {
            "ratio": 0.2,
            "group_size": 4,
            "shared_roles": ["gate", "up", "down"],
            "layer_refit": True,
        },
    ),
    "mistral-g2-private0": (
        "mistral",
        {},
        {"ratio": 0.4, "group_size": 2, "private_blocks": [0]},
    ),
    "gpt2-conv1d-g3": ("gpt2", {}, {"ratio": 0.25, "group_size": 3}),
}


def _tiny(arch: str, overrides: dict) -> torch.nn.Module:
    layers = {"n_layer": 4} if arch == "gpt2" else {"num_hidden_layers": 4}
    return build_tiny_model(arch, seed=0, **layers, **overrides)


def _adapter(name: str) -> PeftModel:
    arch, overrides, kwargs = CASES[name]
    config = BasisSharingConfig(**kwargs)
    windows = make_token_windows(n=8, length=32, seed=1)
    return get_basis_sharing_model(_tiny(arch, overrides), config, calibration=windows)


def _logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


IDS = make_token_windows(n=2, length=12, seed=3)


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> dict[str, dict[str, Path]]:
    """Per case: the dense base, the adapter and the compressed model, as folders."""
    folders = {}
    for name in ("llama-tied-g2", "qwen2-bias-g4-refit"):
        root = tmp_path_factory.mktemp(name)
        arch, overrides, _ = CASES[name]
        _tiny(arch, overrides).save_pretrained(root / "base")
        adapter = _adapter(name)
        adapter.save_pretrained(root / "adapter")
        save_compressed(adapter, root / "compressed")
        folders[name] = {k: root / k for k in ("base", "adapter", "compressed")}
    return folders


def _stock_adapter(folders: dict[str, Path]) -> PeftModel:
    base = AutoModelForCausalLM.from_pretrained(folders["base"])
    return PeftModel.from_pretrained(base, folders["adapter"]).eval()


@pytest.mark.parametrize("name", list(CASES))
def test_in_memory_compressed_model_gives_the_adapters_logits_exactly(name):
    adapter = _adapter(name)
    compressed = to_compressed(adapter)
    assert torch.equal(_logits(compressed, IDS), _logits(adapter, IDS))
    # nothing is copied: the coefficients and bases are the adapter's own tensors
    tuner = adapter.base_model
    layer_name, layer = next(iter(tuner.layers("default").items()))
    shared = compressed.lm.get_submodule(layer_name)
    assert shared.coefficient.weight is layer.basis_sharing_coefficient["default"]
    assert shared.basis.weight is layer.basis("default")


@pytest.mark.parametrize("name", ["llama-tied-g2", "qwen2-bias-g4-refit"])
def test_saved_folder_loads_with_auto_classes_and_matches_the_stock_loaded_adapter(saved, name):
    folders = saved[name]
    assert is_compressed_basis_sharing(folders["compressed"])
    assert not is_compressed_basis_sharing(folders["adapter"])
    assert not is_compressed_basis_sharing(folders["base"])
    model = AutoModelForCausalLM.from_pretrained(folders["compressed"])  # no trust_remote_code
    assert type(model).__module__.startswith("hf_sparse.basis_sharing.remote")
    expected = _logits(_stock_adapter(folders), IDS)
    torch.testing.assert_close(_logits(model.eval(), IDS), expected, rtol=1e-5, atol=1e-5)
    again = load_compressed(folders["compressed"]).eval()
    torch.testing.assert_close(_logits(again, IDS), expected, rtol=1e-5, atol=1e-5)


def test_folder_stores_each_basis_once_and_no_dense_weight_of_a_compressed_layer(saved):
    folders = saved["llama-tied-g2"]
    config = json.loads((folders["compressed"] / "config.json").read_text())
    assert config["model_type"] == "basis_shared"
    assert config["text_config"]["model_type"] == "llama"
    assert set(config["auto_map"]) == {"AutoConfig", "AutoModelForCausalLM"}
    for file in ("configuration_basis_shared.py", "modeling_basis_shared.py"):
        assert (folders["compressed"] / file).is_file()
    adapter_config = json.loads((folders["adapter"] / "adapter_config.json").read_text())
    assert config["layers"] == adapter_config["layer_groups"]
    with safe_open(folders["compressed"] / "model.safetensors", "pt") as handle:
        keys = set(handle.keys())
    bases = {k for k in keys if k.startswith("bases.")}
    assert bases == {f"bases.{key}.weight" for key in set(config["layers"].values())}
    for layer in config["layers"]:
        assert f"lm.{layer}.coefficient.weight" in keys
        assert f"lm.{layer}.weight" not in keys
    assert "lm.lm_head.weight" not in keys  # tied to the embeddings: stored once
    assert "lm.model.embed_tokens.weight" in keys
    # smaller than the dense model, and a group's layers read the very same basis tensor
    dense = (folders["base"] / "model.safetensors").stat().st_size
    assert (folders["compressed"] / "model.safetensors").stat().st_size < dense
    model = load_compressed(folders["compressed"])
    shared_key = next(k for k in config["bases"] if list(config["layers"].values()).count(k) > 1)
    readers = [n for n, k in config["layers"].items() if k == shared_key]
    assert len(readers) == 2
    assert all(
        model.lm.get_submodule(n).basis.weight is model.lm.get_submodule(readers[0]).basis.weight
        for n in readers
    )
    assert model.lm.lm_head.weight is model.lm.model.embed_tokens.weight


def test_generate_with_kv_cache_matches_the_adapter(saved):
    folders = saved["qwen2-bias-g4-refit"]
    model = load_compressed(folders["compressed"]).eval()
    adapter = _stock_adapter(folders)
    prompt = IDS[:, :4]
    settings = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    cached = model.generate(prompt, attention_mask=torch.ones_like(prompt), **settings)
    uncached = model.generate(
        prompt, attention_mask=torch.ones_like(prompt), use_cache=False, **settings
    )
    reference = adapter.generate(
        input_ids=prompt, attention_mask=torch.ones_like(prompt), **settings
    )
    assert cached.shape == (2, 10)
    assert torch.equal(cached, uncached)
    assert torch.equal(cached, reference)


_NO_HF_SPARSE = textwrap.dedent(
    """
    import importlib.abc, sys

    class Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name == "hf_sparse" or name.startswith("hf_sparse."):
                raise ModuleNotFoundError(f"hf_sparse is not installed here ({name})")
            return None

    sys.meta_path.insert(0, Block())
    import torch
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM

    folder, ids_file, out_file = sys.argv[1:4]
    try:
        import hf_sparse  # noqa: F401
        raise SystemExit("hf_sparse is importable: the test would prove nothing")
    except ModuleNotFoundError:
        pass
    try:
        AutoModelForCausalLM.from_pretrained(folder)
        raise SystemExit("loaded without trust_remote_code although hf_sparse is absent")
    except ValueError as error:
        assert "trust_remote_code" in str(error), error
    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
    ids = load_file(ids_file)["ids"]
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    tokens = model.generate(ids[:, :4], attention_mask=torch.ones_like(ids[:, :4]),
                            max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert not any(m == "hf_sparse" or m.startswith("hf_sparse.") for m in sys.modules)
    save_file({"logits": logits, "tokens": tokens}, out_file)
    print(type(model).__module__)
    """
)


@pytest.mark.slow  # a fresh Python that imports torch and transformers: ~5-10 s
def test_loads_where_hf_sparse_cannot_be_imported_through_remote_code(saved, tmp_path):
    folders = saved["qwen2-bias-g4-refit"]
    shipped = tmp_path / "downloaded"  # as a user gets it: the folder alone, elsewhere
    shutil.copytree(folders["compressed"], shipped)
    script = tmp_path / "run.py"
    script.write_text(_NO_HF_SPARSE)
    from safetensors.torch import save_file

    save_file({"ids": IDS}, tmp_path / "ids.safetensors")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "HF_SPARSE"))}
    env.update(HF_MODULES_CACHE=str(tmp_path / "modules"), OMP_NUM_THREADS="1")
    out = tmp_path / "out.safetensors"
    done = subprocess.run(
        [sys.executable, "-I", str(script), str(shipped), str(tmp_path / "ids.safetensors"),
         str(out)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900,  # a loaded machine
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split()[-1].startswith("transformers_modules.")  # the folder's code
    result = load_file(out)
    adapter = _stock_adapter(folders)
    torch.testing.assert_close(result["logits"], _logits(adapter, IDS), rtol=1e-5, atol=1e-5)
    reference = adapter.generate(
        input_ids=IDS[:, :4], attention_mask=torch.ones_like(IDS[:, :4]), max_new_tokens=6,
        do_sample=False, pad_token_id=0,
    )  # fmt: skip
    assert torch.equal(result["tokens"], reference)


def test_what_cannot_be_exported_is_refused_before_any_write(tmp_path):
    with pytest.raises(TypeError, match="expected a Basis Sharing PeftModel"):
        to_compressed(_tiny("llama", {}))
    arch, overrides, kwargs = CASES["llama-tied-g2"]
    deferred = get_basis_sharing_model(
        _tiny(arch, overrides), BasisSharingConfig(**kwargs), defer=True
    )
    with pytest.raises(ValueError, match="not compressed yet"):
        save_compressed(deferred, tmp_path / "a")
    adapter = _adapter("llama-tied-g2")
    with pytest.raises(ValueError, match="no adapter 'other'"):
        to_compressed(adapter, "other")
    layer = next(iter(adapter.base_model.layers("default").values()))
    layer.basis_sharing_rank_policy = lambda _layer, _name, z: z
    with pytest.raises(ValueError, match="dynamic-rank"):
        save_compressed(adapter, tmp_path / "b")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
    layer.basis_sharing_rank_policy = None
    existing = tmp_path / "c"
    existing.mkdir()
    (existing / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError):
        save_compressed(adapter, existing)
    assert [p.name for p in existing.iterdir()] == ["keep.txt"]
    with pytest.raises(ValueError, match="not a compressed Basis Sharing model"):
        load_compressed(existing)


def test_recipe_output_key_is_checked():
    data = {"model": "m", "basis_sharing": {"ratio": 0.2}, "output": "zip"}
    with pytest.raises(ValueError, match="output must be one of \\['adapter', 'compressed'\\]"):
        basis_sharing_recipe_from_dict(data)
    data["output"] = "compressed"
    assert basis_sharing_recipe_from_dict(data).to_dict()["output"] == "compressed"


@pytest.mark.slow  # two tiny compressions end to end through the command line: ~3 s
def test_recipe_output_compressed_ships_a_model_with_the_adapters_perplexity(tmp_path, capsys):
    from hf_sparse.cli import main
    from tests.conftest import build_word_tokenizer

    text = " ".join(f"w{i % 97} w{(i * 7) % 89} w{(i * 13) % 31}" for i in range(3000))
    (tmp_path / "text.txt").write_text(text)
    base = tmp_path / "tiny"
    _tiny("llama", {"tie_word_embeddings": True}).save_pretrained(base)
    build_word_tokenizer(text).save_pretrained(base)
    results = {}
    for output in ("adapter", "compressed"):
        out = tmp_path / output
        argv = ["compress", "--model", str(base), "--ratio", "0.3", "--group-size", "2",
                "--dataset", str(tmp_path / "text.txt"), "--num-samples", "4",
                "--sequence-length", "32", "--eval-windows", "2", "--eval-sequence-length",
                "32", "--output", output, "--output-dir", str(out)]  # fmt: skip
        assert main(argv) == 0, capsys.readouterr().err
        assert f"removed), {output} " in capsys.readouterr().out
        results[output] = json.loads((out / "hf_sparse_results.json").read_text())
    assert results["compressed"]["output"] == "compressed"
    ppl = {k: r["metrics"]["compressed"]["perplexity"] for k, r in results.items()}
    assert ppl["compressed"] == pytest.approx(ppl["adapter"], rel=1e-6)
    assert ppl["compressed"] != pytest.approx(results["adapter"]["metrics"]["dense"]["perplexity"])
    folder = tmp_path / "compressed"
    assert is_compressed_basis_sharing(folder) and not (folder / "adapter_config.json").exists()
    assert (folder / "tokenizer.json").is_file() and (folder / "recipe.yaml").is_file()
    model = AutoModelForCausalLM.from_pretrained(folder)
    adapter = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(base), tmp_path / "adapter"
    )
    torch.testing.assert_close(_logits(model, IDS), _logits(adapter, IDS), rtol=1e-5, atol=1e-5)


def test_a_loaded_model_trains_and_re_saves_as_a_self_contained_folder(saved, tmp_path):
    model = load_compressed(saved["llama-tied-g2"]["compressed"])
    model.train()
    loss = model(input_ids=IDS, labels=IDS).loss
    loss.backward()
    key = next(iter(model.bases))
    assert model.bases[key].weight.grad is not None
    layer = model.lm.get_submodule(next(iter(model.config.layers)))
    assert layer.coefficient.weight.grad.abs().sum() > 0
    with torch.no_grad():
        layer.coefficient.weight.mul_(1.5)  # a "fine-tuned" model
    model.eval()
    model.save_pretrained(tmp_path / "resaved")
    for file in ("configuration_basis_shared.py", "modeling_basis_shared.py"):
        assert (tmp_path / "resaved" / file).is_file()
    config = json.loads((tmp_path / "resaved" / "config.json").read_text())
    assert config["auto_map"]["AutoModelForCausalLM"] == (
        "modeling_basis_shared.BasisSharedForCausalLM"
    )
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "resaved", trust_remote_code=True)
    torch.testing.assert_close(_logits(again.eval(), IDS), _logits(model, IDS))


def test_lora_on_the_coefficients_and_the_shared_bases_of_a_loaded_model(saved):
    from peft import LoraConfig, get_peft_model

    model = load_compressed(saved["llama-tied-g2"]["compressed"])
    before = _logits(model, IDS)
    targets = r".*(coefficient|bases\.\w+)$"  # a string: peft matches it as a regex
    lora = get_peft_model(model, LoraConfig(r=2, target_modules=targets))
    wrapped = [n for n, m in lora.named_modules() if hasattr(m, "lora_A")]
    assert any(n.endswith("coefficient") for n in wrapped)
    assert any(".bases." in n for n in wrapped)
    torch.testing.assert_close(_logits(lora, IDS), before)  # LoRA starts as a no-op
    for name, param in lora.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.1)
    assert not torch.allclose(_logits(lora, IDS), before)  # both kinds of LoRA layer are read
