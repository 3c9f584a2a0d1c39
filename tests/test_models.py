"""Architecture knowledge (hf_sparse.models) on tiny random models of every family."""

from __future__ import annotations

import pytest
import torch
from conftest import ARCHS, LAYERS, build_tiny_model
from torch import nn
from transformers import PretrainedConfig
from transformers.pytorch_utils import Conv1D

from hf_sparse.models import (
    ARCHITECTURES,
    ArchitectureSpec,
    UnsupportedArchitectureError,
    find_decoder_blocks,
    in_features,
    is_linear,
    linear_role,
    set_weight_matrix,
    target_linears,
    weight_matrix,
)

EXPECTED_ROLES = {
    "llama": {"q", "k", "v", "o", "gate", "up", "down"},
    "mistral": {"q", "k", "v", "o", "gate", "up", "down"},
    "qwen2": {"q", "k", "v", "o", "gate", "up", "down"},
    "opt": {"q", "k", "v", "o", "fc1", "fc2"},
    "gpt2": {"qkv", "o", "fc1", "fc2"},
    "gpt_neox": {"qkv", "o", "fc1", "fc2"},
}

BLOCK_PREFIX = {
    "llama": "model.layers",
    "mistral": "model.layers",
    "qwen2": "model.layers",
    "opt": "model.decoder.layers",
    "gpt2": "transformer.h",
    "gpt_neox": "gpt_neox.layers",
}


@pytest.fixture(scope="module")
def models():
    """One tiny model per architecture, shared by the read-only tests of this module."""
    return {arch: build_tiny_model(arch) for arch in ARCHS}


def _all_linears(model):
    return {n: m for g in target_linears(model).values() for n, m in g.items()}


def test_blocks_are_found_without_a_table_entry():
    # The table only holds overrides (fused-qkv head layouts); blocks come from the model.
    assert all(spec.blocks_path is None for spec in ARCHITECTURES.values())
    assert set(ARCHS) == set(EXPECTED_ROLES)


@pytest.mark.parametrize("arch", ARCHS)
def test_find_decoder_blocks(models, arch):
    model = models[arch]
    blocks = find_decoder_blocks(model)
    assert [name for name, _ in blocks] == [f"{BLOCK_PREFIX[arch]}.{i}" for i in range(LAYERS)]
    modules = dict(model.named_modules())
    for name, block in blocks:
        assert modules[name] is block
    assert blocks[0][1] is not blocks[1][1]


@pytest.mark.parametrize("arch", ARCHS)
def test_linear_roles_per_block(models, arch):
    grouped = target_linears(models[arch])
    assert list(grouped) == [f"{BLOCK_PREFIX[arch]}.{i}" for i in range(LAYERS)]
    for block_name, linears in grouped.items():
        assert all(name.startswith(block_name + ".") for name in linears)
        roles = [linear_role(name) for name in linears]
        assert set(roles) == EXPECTED_ROLES[arch]
        assert len(roles) == len(set(roles))  # one layer per role


@pytest.mark.parametrize(
    ("name", "role"),
    [
        ("model.layers.0.self_attn.q_proj", "q"),
        ("model.decoder.layers.1.self_attn.out_proj", "o"),
        ("transformer.h.0.attn.c_proj", "o"),
        ("transformer.h.0.mlp.c_proj", "fc2"),
        ("transformer.h.0.attn.c_attn", "qkv"),
        ("gpt_neox.layers.0.attention.dense", "o"),
        ("gpt_neox.layers.0.mlp.dense_4h_to_h", "fc2"),
        ("model.layers.0.self_attn.qkv_proj", "qkv"),
        ("model.layers.0.mlp.gate_up_proj", "gate_up"),
        ("transformer.h.0.self_attention.query_key_value", "qkv"),
        ("transformer.h.0.self_attention.dense", "o"),
        ("model.layers.0.self_attn.dense", "o"),
        ("model.layers.0.self_attn.W_pack", "qkv"),
        ("transformer.h.0.mlp.fc_in", "fc1"),
        ("transformer.h.0.mlp.fc_out", "fc2"),
        ("transformer.h.0.attn.out_proj", "o"),
        ("model.layers.0.mlp.experts.gate_up_proj.3", "gate_up"),
        ("model.layers.0.mlp.experts.down_proj.0", "down"),
        ("model.layers.0.mlp.gate", None),  # an MoE router
        ("model.layers.0.mlp.shared_expert_gate", None),
        ("model.layers.0.block_sparse_moe.router.layer", None),
        ("model.layers.0.mlp.shared_expert.down_proj", "down"),
        ("lm_head", None),
        ("model.layers.0.mlp.act_fn", None),
    ],
)
def test_linear_role_from_name(name, role):
    assert linear_role(name) == role


@pytest.mark.parametrize("arch", ARCHS)
def test_weight_matrix_is_out_by_in(models, arch):
    torch.manual_seed(1)
    for name, module in _all_linears(models[arch]).items():
        assert is_linear(module)
        matrix = weight_matrix(module)
        x = torch.randn(3, 5, matrix.shape[1])
        output = module(x)
        assert matrix.shape == (output.shape[-1], x.shape[-1]), name
        assert in_features(module) == x.shape[-1]
        bias = module.bias if module.bias is not None else torch.zeros(matrix.shape[0])
        torch.testing.assert_close(output, x @ matrix.T + bias, msg=name)
        if isinstance(module, Conv1D):
            # A view of the stored [in, out] weight, not a copy.
            assert torch.equal(matrix, module.weight.t())
            assert matrix.data_ptr() == module.weight.data_ptr()
        else:
            assert matrix is module.weight


def test_gpt2_uses_conv1d(models):
    layers = _all_linears(models["gpt2"])
    assert layers and all(isinstance(m, Conv1D) for m in layers.values())
    c_fc = layers["transformer.h.0.mlp.c_fc"]
    assert c_fc.weight.shape == (32, 64)
    assert weight_matrix(c_fc).shape == (64, 32)


def test_weight_matrix_rejects_other_modules():
    with pytest.raises(TypeError, match="Embedding"):
        weight_matrix(nn.Embedding(4, 4))


@pytest.mark.parametrize("arch", ARCHS)
def test_set_weight_matrix_round_trip(arch):
    model = build_tiny_model(arch)
    generator = torch.Generator().manual_seed(2)
    for name, module in _all_linears(model).items():
        out_dim, in_dim = weight_matrix(module).shape
        new = torch.randn(out_dim, in_dim, generator=generator, dtype=torch.float64)
        set_weight_matrix(module, new)
        assert module.weight.dtype == torch.float32  # the layer keeps its dtype
        torch.testing.assert_close(weight_matrix(module), new.float(), rtol=0, atol=0)
        x = torch.randn(2, in_dim, generator=generator)
        bias = module.bias if module.bias is not None else torch.zeros(out_dim)
        torch.testing.assert_close(module(x), x @ new.float().T + bias, msg=name)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_set_weight_matrix_rejects_wrong_shapes(arch):
    model = build_tiny_model(arch)
    for name, module in _all_linears(model).items():
        out_dim, in_dim = weight_matrix(module).shape
        before = module.weight.detach().clone()
        bad_shapes = [(out_dim + 1, in_dim), (out_dim, in_dim - 1), (out_dim * in_dim,)]
        if out_dim != in_dim:
            bad_shapes.append((in_dim, out_dim))  # the stored layout of the other layer type
        for shape in bad_shapes:
            with pytest.raises(ValueError, match="shape mismatch"):
                set_weight_matrix(module, torch.zeros(shape))
        assert torch.equal(module.weight, before), name


@pytest.mark.parametrize(
    ("arch", "targets", "ignore", "expected_leaves"),
    [
        ("llama", ["q", "down"], ("lm_head",), {"self_attn.q_proj", "mlp.down_proj"}),
        ("llama", [r"re:mlp\.(gate|up)_proj$"], (), {"mlp.gate_proj", "mlp.up_proj"}),
        ("llama", None, ["re:self_attn"], {"mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"}),
        ("llama", ["re:self_attn"], ["k", "v"], {"self_attn.q_proj", "self_attn.o_proj"}),
        ("llama", ["mlp.down_proj", "o"], (), {"mlp.down_proj", "self_attn.o_proj"}),
        ("opt", ["fc1", "fc2", "o"], (), {"fc1", "fc2", "self_attn.out_proj"}),
        ("gpt2", ["Conv1D"], ["re:attn"], {"mlp.c_fc", "mlp.c_proj"}),
        ("gpt2", ["o", "fc2"], (), {"attn.c_proj", "mlp.c_proj"}),
        ("gpt_neox", ["qkv"], (), {"attention.query_key_value"}),
        (
            "mistral",
            ["Linear"],
            ["re:mlp"],
            {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"},
        ),
    ],
)
def test_target_linears_patterns(models, arch, targets, ignore, expected_leaves):
    grouped = target_linears(models[arch], targets, ignore)
    assert len(grouped) == LAYERS
    for block_name, linears in grouped.items():
        leaves = {name[len(block_name) + 1 :] for name in linears}
        assert leaves == expected_leaves


def test_target_linears_default_ignores_lm_head(models):
    names = [n for g in target_linears(models["llama"]).values() for n in g]
    assert "lm_head" not in names and len(names) == 7 * LAYERS


@pytest.mark.parametrize("bad", ["nonexistent_proj", "re:^nowhere$", "c_attn"])
def test_target_pattern_matching_nothing_raises(models, bad):
    with pytest.raises(ValueError, match="matches no linear layer") as err:
        target_linears(models["llama"], ["q", bad])
    assert repr(bad) in str(err.value)
    assert "'q'" in str(err.value)  # lists the roles that exist


def test_targets_all_ignored_raises(models):
    with pytest.raises(ValueError, match="leave no layer"):
        target_linears(models["llama"], ["q"], ignore=["re:q_proj"])


class _MysteryBlock(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.mix = nn.Linear(width, width)
        self.out = nn.Linear(width, width, bias=False)

    def forward(self, x):
        return x + self.out(torch.relu(self.mix(x)))


class _MysteryModel(nn.Module):
    """A decoder-only model of a family the library has never heard of."""

    def __init__(self, model_type: str = "mystery", width: int = 8) -> None:
        super().__init__()
        self.config = PretrainedConfig()
        self.config.model_type = model_type
        self.embed = nn.Embedding(16, width)
        self.stack = nn.ModuleList([_MysteryBlock(width) for _ in range(3)])
        self.head = nn.Linear(width, 16)

    def forward(self, input_ids):
        x = self.embed(input_ids)
        for block in self.stack:
            x = block(x)
        return self.head(x)


def test_unknown_architecture_raises_naming_blocks():
    model = _MysteryModel()
    with pytest.raises(UnsupportedArchitectureError, match="'mystery'") as err:
        find_decoder_blocks(model)
    assert isinstance(err.value, ValueError)
    assert "_no_split_modules" in str(err.value)  # why
    assert "blocks=" in str(err.value) and "['stack']" in str(err.value)  # what to pass
    with pytest.raises(UnsupportedArchitectureError):
        target_linears(model)


def test_no_split_modules_finds_the_blocks_of_an_unknown_family():
    model = _MysteryModel()
    model._no_split_modules = ["_MysteryBlock"]
    assert [name for name, _ in find_decoder_blocks(model)] == ["stack.0", "stack.1", "stack.2"]


def test_two_lists_of_decoder_layers_are_ambiguous():
    model = _MysteryModel()
    model._no_split_modules = ["_MysteryBlock"]
    model.other = nn.ModuleList([_MysteryBlock(8)])
    with pytest.raises(UnsupportedArchitectureError, match=r"several ModuleLists .* blocks="):
        find_decoder_blocks(model)
    assert len(find_decoder_blocks(model, "stack")) == 3


@pytest.mark.parametrize("blocks", ["re:stack$", "stack", "re:^st"])
def test_unknown_architecture_with_blocks_override(blocks):
    model = _MysteryModel()
    found = find_decoder_blocks(model, blocks)
    assert [name for name, _ in found] == ["stack.0", "stack.1", "stack.2"]
    assert all(b is s for (_, b), s in zip(found, model.stack, strict=True))
    grouped = target_linears(model, blocks=blocks)
    assert grouped["stack.1"] == {
        "stack.1.mix": model.stack[1].mix,
        "stack.1.out": model.stack[1].out,
    }
    assert "head" not in {n for g in grouped.values() for n in g}


@pytest.mark.parametrize(
    ("blocks", "message"),
    [
        ("re:nothing", r"matches no ModuleList; the model has \['stack'\]"),
        ("nothing", "matches no ModuleList"),
        ("embed", "Embedding, not a non-empty ModuleList"),
        ("stack.0", "_MysteryBlock, not a non-empty ModuleList"),
    ],
)
def test_blocks_override_that_is_not_a_module_list(blocks, message):
    with pytest.raises(UnsupportedArchitectureError, match=message):
        find_decoder_blocks(_MysteryModel(), blocks)


def test_override_path_missing_raises(monkeypatch):
    monkeypatch.setitem(ARCHITECTURES, "mystery", ArchitectureSpec(blocks_path="model.layers"))
    model = _MysteryModel()  # the override names model.layers, which it does not have
    with pytest.raises(UnsupportedArchitectureError, match="model.layers.*blocks="):
        find_decoder_blocks(model)
    assert len(find_decoder_blocks(model, "stack")) == 3
    monkeypatch.setitem(ARCHITECTURES, "mystery", ArchitectureSpec(blocks_path="stack"))
    assert len(find_decoder_blocks(model)) == 3


def test_peft_wrapped_model_finds_blocks():
    from peft import LoraConfig, get_peft_model

    base = build_tiny_model("llama")
    plain = [block for _, block in find_decoder_blocks(base)]
    wrapped = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    found = find_decoder_blocks(wrapped)
    assert len(found) == LAYERS
    assert all(name.endswith(f"model.layers.{i}") for i, (name, _) in enumerate(found))
    assert found[0][0] != "model.layers.0"  # the wrapper's prefix is kept
    assert [block for _, block in found] == plain
    # Layers PEFT did not wrap keep their roles.
    grouped = target_linears(wrapped, ["down", "o"])
    for block_name, linears in grouped.items():
        assert {n[len(block_name) + 1 :] for n in linears} == {"mlp.down_proj", "self_attn.o_proj"}
