"""SPD maths against slow, obviously-correct references written here."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from hf_sparse.spd import core


def _grad(fn, x: torch.Tensor, upstream: float = 1.0) -> torch.Tensor:
    x = x.clone().requires_grad_(True)
    (upstream * fn(x)).sum().backward()
    return x.grad


X = torch.tensor([-2.0, -0.5, 0.0, 0.3, 1.0, 1.5, 3.0])


def test_lower_hard_sigmoid_clamps_and_upper_leaks_its_value_above_one():
    assert torch.equal(core.lower_leaky_hard_sigmoid(X), X.clamp(0, 1))
    expected = [0.0, 0.0, 0.0, 0.3, 1.0, 1.0 + 0.05 * 0.5, 1.0 + 0.05 * 2.0]
    assert core.upper_leaky_hard_sigmoid(X, 0.05).tolist() == pytest.approx(expected)


def test_lower_leaky_gradient_leaks_below_zero_only_to_switch_a_gate_on():
    # upstream gradient -1 (the loss falls as the gate opens): leaks below 0
    grad = _grad(lambda x: core.lower_leaky_hard_sigmoid(x, 0.05), X, upstream=-1.0)
    expected = [-0.05 if v <= 0 else (-1.0 if v <= 1 else 0.0) for v in X.tolist()]
    assert grad.tolist() == pytest.approx(expected)
    # upstream gradient +1 (the loss wants the gate shut): nothing below 0
    grad = _grad(lambda x: core.lower_leaky_hard_sigmoid(x, 0.05), X, upstream=1.0)
    expected = [0.0 if v <= 0 else (1.0 if v <= 1 else 0.0) for v in X.tolist()]
    assert grad.tolist() == pytest.approx(expected)


def test_upper_leaky_gradient_leaks_above_one_only():
    grad = _grad(lambda x: core.upper_leaky_hard_sigmoid(x, 0.05), X)
    expected = [0.0 if v < 0 else (1.0 if v <= 1 else 0.05) for v in X.tolist()]
    assert grad.tolist() == pytest.approx(expected)


def test_gate_mlp_matches_a_loop_over_components():
    torch.manual_seed(0)
    B, C, H = 3, 4, 5
    inner = torch.randn(B, C)
    w1, b1, w2 = torch.randn(C, H), torch.randn(C, H), torch.randn(C, H)
    b2 = torch.randn(C)
    out = core.gate_mlp(inner, w1, b1, w2, b2)
    for b in range(B):
        for c in range(C):
            hidden = F.gelu(inner[b, c] * w1[c] + b1[c])
            assert out[b, c] == pytest.approx(float(hidden @ w2[c] + b2[c]), abs=1e-5)


def test_component_output_is_a_masked_sum_of_rank_one_matrices():
    torch.manual_seed(1)
    d_in, d_out, C = 6, 4, 5
    x = torch.randn(7, d_in)
    U, V = torch.randn(d_out, C), torch.randn(C, d_in)
    bias = torch.randn(d_out)
    mask = torch.rand(7, C)
    out = core.component_output(x, U, V, mask, bias)
    for n in range(7):
        weight = sum(mask[n, c] * torch.outer(U[:, c], V[c]) for c in range(C))
        torch.testing.assert_close(out[n], weight @ x[n] + bias, atol=1e-5, rtol=1e-5)


def test_delta_component_restores_the_target_and_takes_its_own_mask():
    torch.manual_seed(2)
    W, U, V = torch.randn(4, 6), torch.randn(4, 3), torch.randn(3, 6)
    x = torch.randn(5, 6)
    delta = core.weight_delta(W, U, V)
    full = core.component_output(x, U, V, None, None, delta)
    torch.testing.assert_close(full, x @ W.t(), atol=1e-5, rtol=1e-5)
    half = core.component_output(x, U, V, None, None, delta, torch.full((5,), 0.5))
    torch.testing.assert_close(half, x @ (U @ V).t() + 0.5 * x @ delta.t(), atol=1e-5, rtol=1e-5)


def test_faithfulness_is_the_mean_squared_residual():
    torch.manual_seed(3)
    W1, U1, V1 = torch.randn(3, 4), torch.randn(3, 2), torch.randn(2, 4)
    W2 = torch.randn(2, 2)
    U2, V2 = torch.eye(2), W2.clone()
    loss = core.faithfulness_loss([W1, W2], [U1, U2], [V1, V2])
    expected = ((W1 - U1 @ V1) ** 2).sum() / (W1.numel() + W2.numel())
    assert float(loss) == pytest.approx(float(expected))
    assert float(core.faithfulness_loss([W2], [U2], [V2])) == 0.0


@pytest.mark.parametrize("p", [0.5, 1.0, 2.0])
def test_importance_minimality_sums_components_and_layers(p):
    ci1 = torch.tensor([[0.0, 0.5, 1.0], [0.2, 0.0, 0.0]])
    ci2 = torch.tensor([[[0.3]], [[0.9]]])
    loss = core.importance_minimality_loss([ci1, ci2], p, eps=0.0)
    expected = ((0.5**p + 1.0) + 0.2**p) / 2 + (0.3**p + 0.9**p) / 2
    assert float(loss) == pytest.approx(expected)


@pytest.mark.parametrize("p", [0, -1.0, float("nan"), "1"])
def test_pnorm_must_be_positive(p):
    with pytest.raises(ValueError, match="pnorm"):
        core.importance_minimality_loss([torch.ones(2, 2)], p)


def test_stochastic_mask_keeps_important_components_and_samples_the_rest():
    generator = torch.Generator().manual_seed(0)
    ci = torch.cat([torch.ones(4000, 1), torch.zeros(4000, 1), torch.full((4000, 1), 0.5)], 1)
    m = core.stochastic_mask(ci, generator)
    assert torch.equal(m[:, 0], torch.ones(4000))
    assert float(m[:, 1].min()) >= 0 and float(m[:, 1].max()) < 1
    assert float(m[:, 1].mean()) == pytest.approx(0.5, abs=0.03)
    assert float(m[:, 2].min()) >= 0.5 and float(m[:, 2].mean()) == pytest.approx(0.75, abs=0.02)


def test_kl_loss_matches_torch_and_respects_the_mask():
    torch.manual_seed(4)
    target, out = torch.randn(2, 3, 7), torch.randn(2, 3, 7)
    reference = F.kl_div(
        F.log_softmax(out, -1), F.log_softmax(target, -1), log_target=True, reduction="none"
    ).sum(-1)
    assert float(core.kl_loss(out, target)) == pytest.approx(float(reference.mean()), rel=1e-5)
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    expected = float(reference[mask.bool()].mean())
    assert float(core.kl_loss(out, target, mask)) == pytest.approx(expected, rel=1e-5)
    assert float(core.kl_loss(target, target)) == pytest.approx(0.0, abs=1e-6)


def test_recon_loss_refuses_unknown_kinds():
    with pytest.raises(ValueError, match="mse"):
        core.recon_loss("l1", torch.zeros(1), torch.zeros(1))


def test_importance_schedule_is_linear_between_fractions():
    at = lambda step: core.importance_coeff_at(step, 100, 1e-3, 3e-3, 0.2, 0.6)  # noqa: E731
    assert at(0) == at(20) == 1e-3
    assert at(40) == pytest.approx(2e-3)
    assert at(60) == at(99) == 3e-3
    assert core.importance_coeff_at(50, 100, 5.0, 5.0) == 5.0
    assert not math.isnan(core.importance_coeff_at(0, 0, 1.0, 2.0))
