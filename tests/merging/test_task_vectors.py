"""Task vectors from full checkpoints, LoRA and masked_lr adapters; checks before loading."""

from __future__ import annotations

import json

import pytest
import torch
from peft import LoraConfig, get_peft_model

import hf_sparse  # noqa: F401  (registers MASKED_LR)
from hf_sparse.masked_lr import MaskedLRConfig, get_masked_lr_model
from hf_sparse.merging.task_vectors import check_sources, inspect_source, load_task_vector
from tests.conftest import build_tiny_model


def test_full_checkpoint_task_vector_is_the_difference_of_changed_tensors(saved_family):
    base, _, folders = saved_family("llama", 1)
    info = inspect_source(folders[0])
    assert info.kind == "full"
    check_sources(base, [info])
    deltas = load_task_vector(base, info)
    fine = build_tiny_model("llama")
    fine.load_state_dict(_read_safetensors(folders[0]), strict=False)
    base_params = dict(base.named_parameters())
    changed = [n for n, p in fine.named_parameters() if not torch.equal(p, base_params[n])]
    assert sorted(deltas) == sorted(changed)
    assert all("layers" in n for n in deltas)  # embeddings and norms did not change
    for name in changed:
        expected = dict(fine.named_parameters())[name] - base_params[name]
        torch.testing.assert_close(deltas[name], expected, rtol=0, atol=0)


def _read_safetensors(folder):
    from safetensors.torch import load_file

    return load_file(str(folder / "model.safetensors"))


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("rslora", [False, True])
def test_lora_task_vector_equals_merge_and_unload(tmp_path, arch, rslora):
    base = build_tiny_model(arch)
    targets = ["q_proj", "down_proj"] if arch == "llama" else ["c_attn", "c_fc"]
    config = LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=targets,
        init_lora_weights=False,
        use_rslora=rslora,
        rank_pattern={targets[1]: 2},
        alpha_pattern={targets[1]: 3},
        fan_in_fan_out=arch == "gpt2",
    )
    peft_model = get_peft_model(build_tiny_model(arch), config)
    peft_model.save_pretrained(tmp_path / "adapter")
    merged = peft_model.merge_and_unload()
    info = inspect_source(tmp_path / "adapter")
    assert info.kind == "lora"
    check_sources(base, [info])
    deltas = load_task_vector(base, info)
    base_params = dict(base.named_parameters())
    expected = {
        n: p.detach() - base_params[n]
        for n, p in merged.named_parameters()
        if not torch.equal(p, base_params[n])
    }
    assert sorted(deltas) == sorted(expected)
    for name, delta in expected.items():
        torch.testing.assert_close(deltas[name], delta, rtol=1e-5, atol=1e-6)


def test_masked_lr_adapter_task_vector_equals_its_delta(tmp_path):
    base = build_tiny_model("llama")
    generator = torch.Generator().manual_seed(0)
    names = ["model.layers.0.mlp.down_proj.weight", "model.layers.1.self_attn.q_proj.weight"]
    params = dict(base.named_parameters())
    masks = {n: torch.rand(params[n].shape, generator=generator) < 0.2 for n in names}
    adapted = get_masked_lr_model(
        build_tiny_model("llama"),
        MaskedLRConfig(init_weights=False, inside_lr_scale=2.0),
        masks,
    )
    adapted.save_pretrained(tmp_path / "sparse")
    merged = adapted.merge_and_unload()
    info = inspect_source(tmp_path / "sparse")
    assert info.kind == "masked_lr"
    deltas = load_task_vector(base, info)
    assert sorted(deltas) == sorted(names)
    for name in names:
        expected = dict(merged.named_parameters())[name].detach() - params[name]
        torch.testing.assert_close(deltas[name], expected, rtol=1e-5, atol=1e-6)
        assert torch.equal(deltas[name] != 0, masks[name])


def test_mismatched_architecture_vocab_and_shapes_are_refused(tmp_path):
    base = build_tiny_model("llama")
    other_vocab = build_tiny_model("llama", vocab_size=96)
    other_vocab.save_pretrained(tmp_path / "vocab")
    with pytest.raises(ValueError, match="vocab_size"):
        check_sources(base, [inspect_source(tmp_path / "vocab")])
    build_tiny_model("gpt2").save_pretrained(tmp_path / "gpt2")
    with pytest.raises(ValueError, match="model_type"):
        check_sources(base, [inspect_source(tmp_path / "gpt2")])
    wider = build_tiny_model("llama", intermediate_size=96)
    wider.save_pretrained(tmp_path / "wider")
    with pytest.raises(ValueError, match="intermediate_size"):
        check_sources(base, [inspect_source(tmp_path / "wider")])
    # config edited to look compatible: the safetensors header still gives the shapes away
    config = json.loads((tmp_path / "wider" / "config.json").read_text())
    config["intermediate_size"] = base.config.intermediate_size
    (tmp_path / "wider" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="shape"):
        check_sources(base, [inspect_source(tmp_path / "wider")])


def test_adapter_of_another_base_is_refused(tmp_path):
    base = build_tiny_model("llama")
    peft_model = get_peft_model(build_tiny_model("llama"), LoraConfig(target_modules=["q_proj"]))
    peft_model.peft_config["default"].base_model_name_or_path = "someone/other-model"
    peft_model.save_pretrained(tmp_path / "adapter")
    info = inspect_source(tmp_path / "adapter")
    with pytest.raises(ValueError, match="trained on 'someone/other-model'"):
        check_sources(base, [info], base_name="smollm2-135m")
    check_sources(base, [info], base_name="smollm2-135m", check_base=False)
    check_sources(base, [info], base_name="someone/other-model")
    wrong = get_peft_model(
        build_tiny_model("llama", hidden_size=48), LoraConfig(target_modules=["q_proj"])
    )
    wrong.save_pretrained(tmp_path / "wrong")
    with pytest.raises(ValueError, match="does not fit"):
        check_sources(base, [inspect_source(tmp_path / "wrong")])


def test_unreadable_sources_get_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a folder"):
        inspect_source(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="neither config.json"):
        inspect_source(tmp_path / "empty")
    (tmp_path / "pickled").mkdir()
    (tmp_path / "pickled" / "config.json").write_text("{}")
    (tmp_path / "pickled" / "pytorch_model.bin").write_bytes(b"not read")
    with pytest.raises(ValueError, match="pickles are never loaded"):
        inspect_source(tmp_path / "pickled")
    (tmp_path / "ia3").mkdir()
    (tmp_path / "ia3" / "adapter_config.json").write_text('{"peft_type": "IA3"}')
    with pytest.raises(ValueError, match="IA3"):
        inspect_source(tmp_path / "ia3")
