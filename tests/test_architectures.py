"""Every method on a table of tiny random models of the families users bring (``ALL_ARCHS``).

Decoder blocks, linear roles, fused projections and stacked MoE experts are found from the
model itself (no ``blocks=``). Each family runs SparseGPT and Wanda (unstructured and 2:4),
importance scoring, golden masks + MASKED_LR, Basis Sharing, and two-source TIES and
SparseGPT-TV merges of fine-tune stand-ins (base + small seeded deltas, saved as folders), and
every output reloads with ``from_pretrained`` / ``PeftModel.from_pretrained`` with equal
logits. Each method is one small ``*_step`` helper, so a new method or a renamed API changes
one place.

Kept fast: 2 layers, hidden 32, vocab 128, windows of 16 tokens.
"""

from __future__ import annotations

import copy
import logging

import pytest
import torch
from conftest import (
    ALL_ARCHS,
    HEADS,
    HIDDEN,
    MOE_ARCHS,
    SLIDING_WINDOW,
    build_tiny_model,
    build_word_tokenizer,
    make_token_windows,
)
from peft import PeftModel
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast

import hf_sparse  # noqa: F401  (registers MASKED_LR and BASIS_SHARING before from_pretrained)
from hf_sparse.basis_sharing import BasisSharingConfig, get_basis_sharing_model
from hf_sparse.calibration import run_sequential
from hf_sparse.cli import main
from hf_sparse.importance import compute_importance, default_parameters
from hf_sparse.masked_lr import GoldenConfig, MaskedLRConfig, get_masked_lr_model, golden_masks
from hf_sparse.merging import MergeConfig, merge_
from hf_sparse.merging.sparse_delta import save_sparse_delta_adapter
from hf_sparse.models import (
    ExpertLinear,
    UnsupportedArchitectureError,
    find_decoder_blocks,
    find_linear,
    linear_role,
    parameter_layouts,
    target_linears,
    weight_matrix,
)
from hf_sparse.moe import is_router
from hf_sparse.outputs import results_record
from hf_sparse.pruning import SparseGPTConfig, WandaConfig, prune_

WINDOWS = make_token_windows(n=4, length=16, seed=0)  # calibration
IDS = make_token_windows(n=2, length=16, seed=1)  # logits comparisons
PRUNERS = {"sparsegpt": SparseGPTConfig, "wanda": WandaConfig}
MERGE_DENSITY = 0.3
# Sliding windows for the families of ARCHS (whose shared tiny configs have none).
SLIDING_OVERRIDES = {
    "mistral": {"sliding_window": SLIDING_WINDOW},
    "qwen2": {"use_sliding_window": True, "sliding_window": SLIDING_WINDOW, "max_window_layers": 1},
}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny matrices: one thread is faster than handing them between threads (with 2 threads
    on a busy 2-core machine a 128x32 float64 SVD took 0.4 s instead of 0.4 ms)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def logits(model: nn.Module, ids: torch.Tensor = IDS) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits


def linears_of(model: nn.Module) -> dict[str, nn.Module]:
    return {n: m for group in target_linears(model).values() for n, m in group.items()}


def stacked_names(model: nn.Module) -> set[str]:
    """Names of the stacked expert parameters among the targets."""
    return {
        n.rpartition(".")[0] for n, m in linears_of(model).items() if isinstance(m, ExpertLinear)
    }


def stored_matrix(state: dict[str, torch.Tensor], name: str) -> torch.Tensor:
    """The stored tensor of a target, read from a state dict (expert views: one slice)."""
    if f"{name}.weight" in state:
        return state[f"{name}.weight"]
    owner, _, index = name.rpartition(".")
    return state[owner][int(index)]


def nudge_trainable_(model: nn.Module, seed: int = 0) -> None:
    """Move every trainable parameter, so a reloaded adapter that lost one would show."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.add_(0.05 * torch.randn(param.shape, generator=generator))


# One helper per method.


def prune_step(model: nn.Module, method: str, mask: str):
    config = PRUNERS[method](sparsity=0.5) if mask == "unstructured" else PRUNERS[method](mask=mask)
    return prune_(model, config, WINDOWS, batch_size=2, show_progress=False)


def importance_step(model: nn.Module, metric: str) -> dict[str, torch.Tensor]:
    return compute_importance(model, WINDOWS[:2], metric=metric, show_progress=False)


def golden_step(model: nn.Module, params: list[str] | None = None):
    dataset = [{"input_ids": w.tolist()} for w in WINDOWS[:2]]
    config = GoldenConfig(top_k_percent=20, num_samples=2, params=params)
    return golden_masks(model, config, dataset, show_progress=False).masks


def masked_lr_step(model: nn.Module, masks) -> PeftModel:
    return get_masked_lr_model(model, MaskedLRConfig(), masks)


def basis_sharing_step(model: nn.Module) -> PeftModel:
    config = BasisSharingConfig(ratio=0.2, group_size=2)
    return get_basis_sharing_model(model, config, calibration=WINDOWS, batch_size=2)


def fine_tune_folders(arch: str, folder, count: int = 2) -> list[str]:
    """Fine-tune stand-ins saved as folders: the base plus small seeded deltas on every matrix
    of the decoder blocks (stacked MoE experts and routers included)."""
    base = build_tiny_model(arch)
    prefixes = tuple(f"{name}." for name, _ in find_decoder_blocks(base))
    paths = []
    for index in range(count):
        tuned = copy.deepcopy(base)
        generator = torch.Generator().manual_seed(100 + index)
        with torch.no_grad():
            for name, param in tuned.named_parameters():
                if name.startswith(prefixes) and param.ndim >= 2:
                    param.add_(0.02 * torch.randn(param.shape, generator=generator))
        tuned.save_pretrained(folder / f"ft{index}")
        paths.append(str(folder / f"ft{index}"))
    return paths


def merge_step(model: nn.Module, method: str, sources: list[str]):
    config = MergeConfig(method, density=MERGE_DENSITY)
    return merge_(model, config, sources, calibration=WINDOWS, batch_size=2, show_progress=False)


def reload_full(model: nn.Module, folder) -> nn.Module:
    model.save_pretrained(folder)
    return AutoModelForCausalLM.from_pretrained(folder, attn_implementation="eager").eval()


def reload_adapter(model: PeftModel, arch: str, folder) -> PeftModel:
    model.save_pretrained(folder)
    return PeftModel.from_pretrained(build_tiny_model(arch), folder).eval()


# Architecture knowledge: blocks, roles, experts, routers.


@pytest.mark.parametrize("arch", ALL_ARCHS)
def test_blocks_and_targets_found_without_blocks(arch):
    model = build_tiny_model(arch)
    blocks = find_decoder_blocks(model)
    assert len(blocks) == 2
    layer_classes = set(model._no_split_modules)
    assert all(type(block).__name__ in layer_classes for _, block in blocks)
    grouped = target_linears(model)
    assert list(grouped) == [name for name, _ in blocks]
    for block_name, linears in grouped.items():
        assert linears and all(n.startswith(block_name + ".") for n in linears)
        # Every target has a role, so per-role targets, stacked solves and Basis Sharing work.
        assert all(linear_role(n) is not None for n in linears), sorted(linears)
        assert not [n for n in linears if is_router(n)]
    if arch in MOE_ARCHS:
        experts = {n: m for n, m in linears_of(model).items() if isinstance(m, ExpertLinear)}
        stacked = {n: p for n, p in model.named_parameters() if p.ndim == 3 and ".experts." in n}
        assert stacked, "the MoE table entries store experts as 3-D parameters"
        assert len(experts) == sum(p.shape[0] for p in stacked.values())
        for name, view in experts.items():
            assert find_linear(model, name).weight.data_ptr() == view.weight.data_ptr()


@pytest.mark.parametrize(
    ("arch", "name", "head_rows"),
    [
        ("gpt2", "transformer.h.0.attn.c_attn.weight", HIDDEN // HEADS),  # q, k, v side by side
        ("phi3", "model.layers.0.self_attn.qkv_proj.weight", HIDDEN // HEADS),
        ("gpt_neox", "gpt_neox.layers.0.attention.query_key_value.weight", 3 * HIDDEN // HEADS),
        ("bloom", "transformer.h.0.self_attention.query_key_value.weight", 3 * HIDDEN // HEADS),
        # Falcon multi-query: HEADS query heads then one k and one v head, each head_dim rows.
        ("falcon", "transformer.h.0.self_attention.query_key_value.weight", HIDDEN // HEADS),
    ],
)
def test_fused_qkv_head_layouts(arch, name, head_rows):
    layout = parameter_layouts(build_tiny_model(arch))[name]
    assert layout.head_size == head_rows
    assert layout.head_axis == (1 if arch == "gpt2" else 0)  # Conv1D stores [in, out]


def test_falcon_new_architecture_groups_rows_per_kv_group():
    model = build_tiny_model("falcon", new_decoder_architecture=True, num_kv_heads=2)
    name = "transformer.h.0.self_attention.query_key_value.weight"
    # [kv groups, heads per group + k + v, head_dim] rows.
    assert parameter_layouts(model)[name].head_size == (HEADS // 2 + 2) * (HIDDEN // HEADS)


# Block inputs captured and replayed per block (sliding-window vs global layers, rotary tables).


@pytest.mark.parametrize("arch", ALL_ARCHS)
def test_sequential_replay_equals_model_forward(arch):
    model = build_tiny_model(arch, **SLIDING_OVERRIDES.get(arch, {}))
    blocks = [block for _, block in find_decoder_blocks(model)]
    reference = []
    handles = [
        b.register_forward_hook(lambda _m, _a, out: reference.append(_first(out))) for b in blocks
    ]
    with torch.no_grad():
        hidden_states = model(input_ids=WINDOWS, use_cache=False, output_hidden_states=True)
    for handle in handles:
        handle.remove()
    outputs: dict[int, list[torch.Tensor]] = {}

    def process_block(name, block):  # record what the engine's own pass produces
        index = blocks.index(block)
        outputs[index] = []
        handles.append(block.register_forward_hook(lambda *a: outputs[index].append(a[2])))

    run_sequential(model, WINDOWS, process_block, batch_size=3, show_progress=False)
    for handle in handles:
        handle.remove()
    for index in range(len(blocks)):
        replayed = torch.cat([_first(out) for out in outputs[index]])
        torch.testing.assert_close(replayed, reference[index], rtol=0, atol=1e-6)
        if index + 1 < len(blocks):  # the last entry is after the final norm
            expected = hidden_states.hidden_states[index + 1]
            torch.testing.assert_close(replayed, expected, rtol=0, atol=1e-6)


def _first(output):
    return output[0] if isinstance(output, tuple | list) else output


def test_per_layer_arguments_matter_for_gemma3():
    """Block 1 of the tiny Gemma-3 is a global layer: replayed with block 0's (sliding-window)
    mask and local rotary table, as a single-capture engine would, it computes something
    else. The replay test above would catch such an engine."""
    model = build_tiny_model("gemma3_text")
    assert model.config.layer_types == ["sliding_attention", "full_attention"]
    calls = []
    blocks = [block for _, block in find_decoder_blocks(model)]
    handles = [
        b.register_forward_pre_hook(lambda _m, a, k: calls.append((a, k)), with_kwargs=True)
        for b in blocks
    ]
    with torch.no_grad():
        model(input_ids=WINDOWS, use_cache=False)
    for handle in handles:
        handle.remove()
    (args0, kwargs0), (args1, kwargs1) = calls
    hidden = args1[0] if args1 else kwargs1["hidden_states"]
    rest = {k: v for k, v in kwargs1.items() if k != "hidden_states"}
    wrong = {**rest, "attention_mask": kwargs0["attention_mask"]}
    wrong["position_embeddings"] = kwargs0["position_embeddings"]
    with torch.no_grad():
        right_out = _first(blocks[1](hidden, **rest))
        wrong_out = _first(blocks[1](hidden, **wrong))
    assert not torch.allclose(right_out, wrong_out, atol=1e-3)


# Pruning: SparseGPT and Wanda, unstructured and 2:4, on every family.


@pytest.mark.parametrize("mask", ["unstructured", "2:4"])
@pytest.mark.parametrize("method", sorted(PRUNERS))
@pytest.mark.parametrize("arch", ALL_ARCHS)
def test_prune_and_reload(arch, method, mask, tmp_path):
    model = build_tiny_model(arch)
    routers = {n: p.clone() for n, p in model.named_parameters() if is_router(n.rpartition(".")[0])}
    result = prune_step(model, method, mask)
    targets = linears_of(model)
    assert set(result.masks) == set(targets)
    state = model.state_dict()
    zeros = sum(int((stored_matrix(state, n) == 0).sum()) for n in targets)
    total = sum(stored_matrix(state, n).numel() for n in targets)
    assert result.measured_sparsity == pytest.approx(zeros / total)
    assert model.config.sparsity["measured_sparsity"] == pytest.approx(zeros / total, abs=1e-6)
    assert 0.5 - 1e-9 <= zeros / total <= 0.52
    for name, keep in result.masks.items():
        assert not weight_matrix(targets[name])[~keep].any(), name
    for name in stacked_names(model):  # each expert really is pruned
        for expert in state[name]:
            assert (expert == 0).float().mean() >= 0.5 - 1e-9, name
    for name, before in routers.items():  # routers untouched
        assert torch.equal(dict(model.named_parameters())[name], before), name
    reloaded = reload_full(model, tmp_path)
    assert reloaded.config.sparsity["method"] == method
    torch.testing.assert_close(logits(reloaded), logits(model), rtol=0, atol=1e-5)


# Importance scoring.


@pytest.mark.parametrize("arch", ALL_ARCHS)
def test_importance_fisher_and_wanda(arch):
    model = build_tiny_model(arch)
    params = dict(model.named_parameters())
    expected = default_parameters(model)
    assert stacked_names(model) <= set(expected)  # MoE: the stacked experts are scored
    for metric in ("fisher", "wanda"):
        scores = importance_step(model, metric)
        assert list(scores) == expected
        for name, score in scores.items():
            assert score.shape == params[name].shape, (metric, name)
            assert torch.isfinite(score).all() and (score >= 0).all(), (metric, name)
        assert sum(float(s.sum()) for s in scores.values()) > 0
        for name in stacked_names(model):
            assert scores[name].flatten(1).sum(1).gt(0).any(), (metric, name)


# Golden masks + MASKED_LR.


@pytest.mark.parametrize("arch", ALL_ARCHS)
def test_golden_masks_masked_lr_and_reload(arch, tmp_path):
    model = build_tiny_model(arch)
    params = None
    if arch in MOE_ARCHS:  # masked_lr adapts nn.Linear layers: say so for stacked experts
        with pytest.raises(ValueError, match="stacked MoE expert weights"):
            masked_lr_step(model, golden_step(model))
        params = [n for n in default_parameters(model) if n not in stacked_names(model)]
    masks = golden_step(model, params)
    assert masks and all(m.any() for m in masks.values())
    before = logits(model)
    adapted = masked_lr_step(model, masks)
    nudge_trainable_(adapted)
    after = logits(adapted)
    assert not torch.allclose(after, before)
    reloaded = reload_adapter(adapted, arch, tmp_path)
    torch.testing.assert_close(logits(reloaded), after, rtol=0, atol=1e-5)


# Basis Sharing.


@pytest.mark.parametrize("arch", ALL_ARCHS)
def test_basis_sharing_and_reload(arch, tmp_path, caplog):
    model = build_tiny_model(arch)
    dense_roles = {
        linear_role(n) for n, m in linears_of(model).items() if not isinstance(m, ExpertLinear)
    }
    with caplog.at_level(logging.WARNING, logger="hf_sparse.basis_sharing.plan"):
        compressed = basis_sharing_step(model)
    config = compressed.peft_config["default"]
    assert {linear_role(n) for n in config.target_modules} == dense_roles
    if arch in MOE_ARCHS:
        assert "stay dense" in caplog.text  # the experts are not compressed, and it says so
    expected = logits(compressed)
    reloaded = reload_adapter(compressed, arch, tmp_path)
    torch.testing.assert_close(logits(reloaded), expected, rtol=0, atol=1e-5)


# Merging: two fine-tune stand-ins, TIES and SparseGPT-TV.


def _top_magnitude(delta: torch.Tensor, density: float) -> torch.Tensor:
    k = round(delta.numel() * density)
    return delta.abs() >= delta.abs().flatten().kthvalue(delta.numel() - k + 1).values


@pytest.mark.parametrize("arch", ALL_ARCHS)
def test_ties_merge_and_reload(arch, tmp_path):
    sources = fine_tune_folders(arch, tmp_path)
    tuned = [AutoModelForCausalLM.from_pretrained(s).state_dict() for s in sources]
    model = build_tiny_model(arch)
    base = {n: p.detach().clone() for n, p in model.named_parameters()}
    result = merge_step(model, "ties", sources)
    changed = {n for n in base if not torch.equal(tuned[0][n], base[n])}
    assert set(result.deltas) == changed and stacked_names(model) <= changed
    merged = dict(model.named_parameters())
    for name, delta in result.deltas.items():
        taus = [t[name] - base[name] for t in tuned]
        # TIES keeps only entries in some task's top 30% by magnitude, with the elected sign.
        kept = _top_magnitude(taus[0], MERGE_DENSITY) | _top_magnitude(taus[1], MERGE_DENSITY)
        assert not delta[~kept].any(), name
        sign = torch.sign(sum(tau * _top_magnitude(tau, MERGE_DENSITY) for tau in taus))
        assert (torch.sign(delta[delta != 0]) == sign[delta != 0]).all(), name
        torch.testing.assert_close(merged[name], base[name] + delta, rtol=0, atol=1e-6)
    assert MERGE_DENSITY < result.density <= 2 * MERGE_DENSITY
    reloaded = reload_full(model, tmp_path / "merged")
    assert reloaded.config.merging["method"] == "ties"
    torch.testing.assert_close(logits(reloaded), logits(model), rtol=0, atol=1e-5)


@pytest.mark.parametrize("arch", ALL_ARCHS)
def test_sparsegpt_tv_merge_and_reload(arch, tmp_path, caplog):
    sources = fine_tune_folders(arch, tmp_path)
    model = build_tiny_model(arch)
    before = logits(model)
    with caplog.at_level(logging.WARNING, logger="hf_sparse.merging.apply"):
        result = merge_step(model, "sparsegpt_tv", sources)
    dense = {n for n, m in linears_of(model).items() if not isinstance(m, ExpertLinear)}
    # Every dense target linear went through the OBS solver, once per task, and lost less than
    # its whole output change; stacked experts are merged by magnitude, and it says so.
    assert set(result.layer_errors) == dense
    for name, errors in result.layer_errors.items():
        assert len(errors) == 2 and all(0 <= e < 1 for e in errors), (name, errors)
    assert ("not solved by OBS" in caplog.text) == (arch in MOE_ARCHS)
    for name in dense:
        delta = result.deltas[f"{name}.weight"]
        assert delta.count_nonzero() <= 2 * MERGE_DENSITY * delta.numel(), name
    expected = logits(model)
    assert not torch.allclose(expected, before)
    reloaded = reload_full(model, tmp_path / "merged")
    assert reloaded.config.merging["method"] == "sparsegpt_tv"
    torch.testing.assert_close(logits(reloaded), expected, rtol=0, atol=1e-5)
    # The merged task vector as a sparse-delta adapter of the base (merge recipes' output:
    # adapter): linear weights only, so MoE models (stacked experts, routers) need output: full.
    record = results_record("merging", config={"method": "sparsegpt_tv"})
    if arch in MOE_ARCHS:
        with pytest.raises(ValueError, match="linear weights only.*save a full model instead"):
            save_sparse_delta_adapter(build_tiny_model(arch), result.deltas, tmp_path / "a", record)
        return
    save_sparse_delta_adapter(build_tiny_model(arch), result.deltas, tmp_path / "adapter", record)
    adapter = PeftModel.from_pretrained(build_tiny_model(arch), tmp_path / "adapter").eval()
    torch.testing.assert_close(logits(adapter), expected, rtol=0, atol=1e-5)


# The command line: `hf-sparse prune` needs no --blocks for any family of the table.


@pytest.mark.parametrize("arch", ALL_ARCHS)
def test_cli_prune_without_blocks(arch, tmp_path, capsys, monkeypatch):
    # The folder holds our word-level tokenizer; AutoTokenizer would build Qwen2's own BPE
    # class for a qwen2 config and drop every word, so load the tokenizer file as it is.
    monkeypatch.setattr(AutoTokenizer, "from_pretrained", PreTrainedTokenizerFast.from_pretrained)
    words = " ".join(f"w{i % 97}" for i in range(400))
    folder = tmp_path / arch
    build_tiny_model(arch).save_pretrained(folder)
    build_word_tokenizer(words).save_pretrained(folder)
    (tmp_path / "text.txt").write_text(words)
    out = tmp_path / "pruned"
    code = main(
        ["prune", str(folder), "--method", "wanda", "--sparsity", "0.5", "--dataset",
         str(tmp_path / "text.txt"), "--num-samples", "2", "--sequence-length", "16",
         "--no-eval", "--output-dir", str(out)]
    )  # fmt: skip
    assert code == 0
    assert "sparsity:           50.00%" in capsys.readouterr().out
    pruned = AutoModelForCausalLM.from_pretrained(out)
    assert pruned.config.sparsity["measured_sparsity"] == pytest.approx(0.5, abs=0.01)


# Errors that name why and what to pass.


def test_model_without_no_split_modules_asks_for_blocks():
    model = build_tiny_model("llama")
    for module in (model, model.model):
        module._no_split_modules = []
    with pytest.raises(UnsupportedArchitectureError, match="_no_split_modules.*blocks=") as err:
        prune_(model, WandaConfig(sparsity=0.5), WINDOWS, show_progress=False)
    assert "'model.layers'" in str(err.value)  # the ModuleLists it could be
    result = prune_(
        model, WandaConfig(sparsity=0.5, blocks="model.layers"), WINDOWS, show_progress=False
    )
    assert result.measured_sparsity == pytest.approx(0.5)
