"""Importance metrics against slow, obviously-correct references on tiny models."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from conftest import build_tiny_model, make_token_windows
from torch import nn
from transformers.pytorch_utils import Conv1D

from hf_sparse.importance import IMPORTANCE_METRICS, compute_importance
from hf_sparse.models import weight_matrix

UP = "model.layers.1.mlp.up_proj.weight"


def windows(n: int = 3, length: int = 10):
    return make_token_windows(n=n, length=length, seed=1)


def per_sample_grads(model, batch, name):
    param = dict(model.named_parameters())[name]
    grads = []
    for row in batch:
        model.zero_grad()
        loss = model(input_ids=row[None], labels=row[None]).loss
        (grad,) = torch.autograd.grad(loss, [param])
        grads.append(grad)
    return torch.stack(grads)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("metric", sorted(IMPORTANCE_METRICS))
def test_every_metric_gives_finite_scores_in_parameter_shape(arch, metric):
    model = build_tiny_model(arch)
    params = None
    if metric == "hessian_diag":  # one Hessian-vector product per entry: a small target
        params = [
            next(
                n
                for n, p in model.named_parameters()
                if p.ndim == 1 and "layers" in n or ".h." in n
            )
        ]
    scores = compute_importance(model, windows(), metric, params, show_progress=False)
    params = dict(model.named_parameters())
    assert scores and all(scores[n].shape == params[n].shape for n in scores)
    assert all(torch.isfinite(s).all() and s.dtype == torch.float32 for s in scores.values())
    assert all((s >= 0).all() for s in scores.values())


def test_gradient_metrics_match_autograd_references():
    model = build_tiny_model("llama")
    batch = windows()
    grads = per_sample_grads(model, batch, UP)
    weight = dict(model.named_parameters())[UP].detach()
    gradient = compute_importance(model, batch, "gradient", [UP], show_progress=False)[UP]
    assert torch.allclose(gradient, grads.mean(0).abs(), atol=1e-7)
    gxw = compute_importance(model, batch, "grad_x_weight", [UP], show_progress=False)[UP]
    assert torch.allclose(gxw, (grads.mean(0) * weight).abs(), atol=1e-8)
    fisher = compute_importance(model, batch, "fisher", [UP], show_progress=False)[UP]
    assert torch.allclose(fisher, grads.square().mean(0), atol=1e-9)
    magnitude = compute_importance(model, None, "magnitude", [UP], show_progress=False)[UP]
    assert torch.equal(magnitude, weight.abs())


class Quadratic(nn.Module):
    """loss = 0.5 w^T A w: the Hessian is A, whatever the input."""

    def __init__(self, a: torch.Tensor):
        super().__init__()
        self.register_buffer("a", a)
        self.w = nn.Parameter(torch.randn(a.shape[0], generator=torch.Generator().manual_seed(0)))

    def forward(self, input_ids=None, labels=None, use_cache=None):
        return SimpleNamespace(loss=0.5 * self.w @ self.a @ self.w)


def test_hutchinson_converges_to_the_hessian_diagonal():
    generator = torch.Generator().manual_seed(0)
    b = torch.randn(6, 6, generator=generator) * 0.3
    a = b @ b.t() + torch.diag(torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0, 6.0]))
    model = Quadratic(a)
    batch = torch.zeros(1, 2, dtype=torch.long)
    scores = compute_importance(model, batch, "hutchinson", ["w"], False, probes=4000)
    assert torch.allclose(scores["w"], a.diagonal(), rtol=0.05)
    few = compute_importance(model, batch, "hutchinson", ["w"], False, probes=1, seed=3)
    assert not torch.allclose(few["w"], a.diagonal(), rtol=0.01)  # a 1-probe estimate is noisy


@pytest.mark.slow  # exact Hessian diagonal by double backward: ~3 s
def test_hutchinson_on_a_tiny_lm_matches_the_exact_diagonal():
    model = build_tiny_model("llama")
    name = "model.layers.1.input_layernorm.weight"  # 32 entries: exact Hessian is cheap
    batch = windows(n=1)
    param = dict(model.named_parameters())[name]

    def loss_of(vector):
        inputs = {"input_ids": batch, "labels": batch}
        return torch.func.functional_call(model, {name: vector}, args=(), kwargs=inputs).loss

    exact = torch.autograd.functional.hessian(loss_of, param.detach().clone()).diagonal().abs()
    estimate = compute_importance(model, batch, "hutchinson", [name], False, probes=1500)[name]
    assert torch.allclose(estimate, exact, rtol=0.25, atol=0.05 * exact.max())


@pytest.mark.parametrize(
    ("arch", "layer_name"),
    [
        ("llama", "model.layers.0.mlp.down_proj"),
        ("gpt2", "transformer.h.0.mlp.c_proj"),  # Conv1D, stored [in, out] = [64, 32]
        ("gpt2", "transformer.h.0.attn.c_proj"),  # square Conv1D: shapes cannot tell
    ],
)
def test_activation_metrics_match_direct_formulas(arch, layer_name):
    model = build_tiny_model(arch)
    layer = dict(model.named_modules())[layer_name]
    inputs = []
    handle = layer.register_forward_hook(
        lambda m, a, o: inputs.append(a[0].reshape(-1, a[0].shape[-1]))
    )
    batch = windows()
    with torch.no_grad():
        for row in batch:
            model(input_ids=row[None])
    handle.remove()
    x = torch.cat(inputs).double()
    weight = weight_matrix(layer).detach().double()
    name = f"{layer_name}.weight"
    wanda = compute_importance(model, batch, "wanda", [name], show_progress=False)[name]
    expected = weight.abs() * x.square().sum(0).sqrt()
    stored = lambda t: t.t() if isinstance(layer, Conv1D) else t  # noqa: E731
    assert torch.allclose(wanda.double(), stored(expected), rtol=1e-4)
    hessian = x.t() @ x / x.shape[0]
    damped = hessian + 0.01 * hessian.diagonal().mean() * torch.eye(hessian.shape[0], dtype=x.dtype)
    expected_obs = weight.square() / torch.linalg.inv(damped).diagonal()
    obs = compute_importance(model, batch, "obs", [name], show_progress=False)[name]
    assert torch.allclose(obs.double(), stored(expected_obs), rtol=1e-3)


def test_gradient_metrics_on_a_bf16_model_accumulate_in_float32():
    reference = build_tiny_model("llama")
    model = build_tiny_model("llama").to(torch.bfloat16)
    for metric in ("gradient", "fisher", "hutchinson"):
        scores = compute_importance(model, windows(), metric, [UP], show_progress=False)[UP]
        exact = compute_importance(reference, windows(), metric, [UP], show_progress=False)[UP]
        assert scores.dtype == torch.float32 and torch.isfinite(scores).all()
        assert torch.corrcoef(torch.stack([scores.flatten(), exact.flatten()]))[0, 1] > 0.9
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())


def test_model_state_is_restored():
    model = build_tiny_model("llama").train()
    frozen = "model.layers.0.self_attn.q_proj.weight"
    dict(model.named_parameters())[frozen].requires_grad_(False)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    for metric in ("gradient", "fisher", "hutchinson", "wanda"):
        compute_importance(model, windows(), metric, show_progress=False)
        assert model.training
        assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
        assert all(p.grad is None for p in model.parameters())


def test_dict_batches_with_padding_and_prompt_labels():
    model = build_tiny_model("llama")
    batch = windows(n=2, length=8)
    labels = batch.clone()
    labels[:, :4] = -100
    attention = torch.ones_like(batch)
    attention[1, 6:] = 0
    scores = compute_importance(
        model,
        [{"input_ids": batch, "labels": labels, "attention_mask": attention}],
        "fisher",
        [UP],
        show_progress=False,
    )
    rows = [
        {"input_ids": batch[0], "labels": labels[0]},
        {"input_ids": batch[1, :6], "labels": labels[1, :6]},
    ]
    reference = compute_importance(model, rows, "fisher", [UP], show_progress=False)
    assert torch.allclose(scores[UP], reference[UP])


def test_bad_input_is_refused_with_the_fix():
    model = build_tiny_model("llama")
    with pytest.raises(ValueError, match="valid metrics"):
        compute_importance(model, windows(), "saliency")
    with pytest.raises(ValueError, match=r"unknown option.*probes"):
        compute_importance(model, windows(), "fisher", probes=3)
    with pytest.raises(ValueError, match="empty"):
        compute_importance(model, [], "gradient")
    with pytest.raises(ValueError, match="matches no parameter"):
        compute_importance(model, windows(), "gradient", ["no_such"])
    with pytest.raises(ValueError, match="damp must be a positive number"):
        compute_importance(model, windows(), "obs", damp=0)
    with pytest.raises(ValueError, match="linear-layer weights only"):
        compute_importance(model, windows(), "wanda", ["model.embed_tokens.weight"])
    with pytest.raises(ValueError, match="same length"):
        compute_importance(model, [{"input_ids": [1, 2, 3], "labels": [1, 2]}], "gradient")


def test_hutchinson_runs_on_sdpa_attention():
    from conftest import tiny_config
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(tiny_config("llama"), attn_implementation="sdpa")
    scores = compute_importance(model.eval(), windows(n=1), "hutchinson", ["q"], False, probes=1)
    assert all(torch.isfinite(s).all() for s in scores.values())


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("metric", ["gradient", "fisher"])
def test_chunked_loss_gradients_equal_whole_sample_gradients(arch, metric):
    from hf_sparse.importance import loss_chunks

    model = build_tiny_model(arch)
    ids = make_token_windows(n=2, length=11, seed=3)
    labels = ids.clone()
    labels[0, :4] = -100  # a prompt without loss
    batches = [{"input_ids": ids[i : i + 1], "labels": labels[i : i + 1]} for i in range(2)]
    whole = compute_importance(model, batches, metric, show_progress=False)
    with loss_chunks(3):
        chunked = compute_importance(model, batches, metric, show_progress=False)
    assert sorted(chunked) == sorted(whole)
    for name in whole:
        torch.testing.assert_close(chunked[name], whole[name], rtol=1e-4, atol=1e-7)
    with pytest.raises(ValueError, match="chunk_size must be a positive number"), loss_chunks(0):
        pass


def test_exact_hessian_diagonal_matches_autograd_hessians_across_tensor_boundaries():
    model = build_tiny_model("llama")
    names = ["model.layers.0.input_layernorm.weight", "model.layers.1.input_layernorm.weight"]
    batch = windows(n=2)
    scores = compute_importance(model, batch, "hessian_diag", names, False, chunk=10)
    params = dict(model.named_parameters())
    for name in names:
        exact = torch.zeros(params[name].shape, dtype=torch.float64)
        for row in batch:

            def loss_of(vector, row=row, name=name):
                inputs = {"input_ids": row[None], "labels": row[None]}
                return torch.func.functional_call(model, {name: vector}, (), inputs).loss

            hessian = torch.autograd.functional.hessian(loss_of, params[name].detach().clone())
            exact += hessian.diagonal().double()
        expected = (exact / len(batch)).abs().float()
        torch.testing.assert_close(scores[name], expected, rtol=1e-4, atol=1e-6)
    with pytest.raises(ValueError, match="above max_entries=10"):
        compute_importance(model, batch, "hessian_diag", names, False, max_entries=10)
