"""Mixture-of-experts specifics on the tiny MoE families of the table: routers are never
targets, stacked experts are pruned and scored one expert at a time from the tokens routed to
it, an expert no token reaches falls back to magnitude (recorded), and stacked weights we cannot
split raise naming what to pass. (Multi-process: ``test_distributed_moe.py``.)"""

from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F
from conftest import HIDDEN, MOE_ARCHS, avoid_expert, build_tiny_model
from test_architectures import (  # noqa: F401  (_one_thread: an autouse fixture)
    PRUNERS,
    WINDOWS,
    _one_thread,
    prune_step,
    stacked_names,
    stored_matrix,
)
from torch import nn

from hf_sparse.importance import compute_importance, default_parameters
from hf_sparse.models import UnsupportedArchitectureError, target_linears
from hf_sparse.moe import is_router
from hf_sparse.pruning import MagnitudeConfig, WandaConfig, prune_
from hf_sparse.pruning.apply import NO_TOKENS_FALLBACK
from hf_sparse.pruning.core import magnitude_mask


@pytest.mark.parametrize("arch", MOE_ARCHS)
def test_routers_are_never_targets(arch):
    model = build_tiny_model(arch)
    routers = {n for n, m in model.named_modules() if n and is_router(n, m)}
    assert routers
    for targets in (None, ["re:mlp|moe"], ["re:."]):
        names = {n for g in target_linears(model, targets).values() for n in g}
        assert not {n for n in names for r in routers if n == r or n.startswith(r + ".")}
    assert not [n for n in default_parameters(model) if is_router(n.rpartition(".")[0])]


def test_a_router_pattern_says_routers_are_never_pruned():
    model = build_tiny_model("qwen2_moe")
    assert isinstance(model.model.layers[0].mlp.shared_expert_gate, nn.Linear)
    with pytest.raises(ValueError, match="only MoE routers .* never pruned"):
        target_linears(model, ["shared_expert_gate"])


def test_measured_sparsity_counts_the_weights_not_the_masks():
    model = build_tiny_model("mixtral")
    with torch.no_grad():
        model.model.layers[0].mlp.experts.down_proj[1].zero_()  # zero before pruning
    result = prune_step(model, "wanda", "unstructured")
    state = model.state_dict()
    zeros = sum(int((stored_matrix(state, n) == 0).sum()) for n in result.masks)
    total = sum(stored_matrix(state, n).numel() for n in result.masks)
    assert result.measured_sparsity == pytest.approx(zeros / total)
    assert result.measured_sparsity > result.sparsity + 0.01  # the masks keep some zeros


def test_magnitude_prunes_stacked_experts():
    model = build_tiny_model("mixtral")
    result = prune_(model, MagnitudeConfig(sparsity=0.5), show_progress=False)
    assert stacked_names(model) <= {n.rpartition(".")[0] for n in result.masks}
    experts = model.model.layers[0].mlp.experts.down_proj
    assert (experts == 0).float().mean().item() == pytest.approx(0.5)


def test_wanda_scores_of_experts_use_the_tokens_routed_to_each():
    """Reference: per-expert ||X_j|| from the rows the router sent to that expert, written out
    with the Mixtral expert formula (SiLU(gate) * up, then down)."""
    model = build_tiny_model("mixtral")
    experts = model.model.layers[1].mlp.experts
    seen = []
    handle = experts.register_forward_hook(lambda _m, args, _o: seen.append(args[:2]))
    with torch.no_grad():
        for window in WINDOWS[:2]:
            model(input_ids=window[None], use_cache=False)
    handle.remove()
    names = ["model.layers.1.mlp.experts.gate_up_proj", "model.layers.1.mlp.experts.down_proj"]
    scores = compute_importance(
        model, WINDOWS[:2], metric="wanda", params=names, show_progress=False
    )
    inner = experts.down_proj.shape[2]
    for e in range(experts.gate_up_proj.shape[0]):
        rows = torch.cat([h[(idx == e).any(-1)] for h, idx in seen])
        gate, up = (rows @ experts.gate_up_proj[e].T).split(inner, dim=-1)
        mid = F.silu(gate) * up
        for name, x, weight in (
            (names[0], rows, experts.gate_up_proj[e]),
            (names[1], mid, experts.down_proj[e]),
        ):
            reference = weight.abs() * x.pow(2).sum(0).sqrt()
            torch.testing.assert_close(scores[name][e], reference.detach(), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("method", sorted(PRUNERS))
def test_expert_without_tokens_falls_back_to_magnitude(method, caplog):
    model = build_tiny_model("mixtral")
    mlp = model.model.layers[0].mlp
    handle = mlp.gate.register_forward_hook(avoid_expert(3))
    originals = {
        p: getattr(mlp.experts, p)[3].detach().clone() for p in ("gate_up_proj", "down_proj")
    }
    with caplog.at_level(logging.WARNING, logger="hf_sparse.pruning.apply"):
        result = prune_step(model, method, "unstructured")
    handle.remove()
    starved = {f"model.layers.0.mlp.experts.{p}.3" for p in originals}
    assert result.fallbacks == dict.fromkeys(starved, NO_TOKENS_FALLBACK)
    assert model.config.sparsity["fallback_layers"] == result.fallbacks
    assert "no calibration token" in caplog.text
    for param, original in originals.items():
        name = f"model.layers.0.mlp.experts.{param}.3"
        expected = magnitude_mask(original, 0.5)
        assert torch.equal(result.masks[name], expected)
        torch.testing.assert_close(getattr(mlp.experts, param)[3], original * expected)
    # The other experts of that block were calibrated and pruned by the method itself.
    assert len([n for n in result.masks if ".experts." in n]) == 2 * 2 * 4


class _Stacked(nn.Module):
    """A layer with a 3-D weight that is not a transformers experts module."""

    def __init__(self) -> None:
        super().__init__()
        self.kernel = nn.Parameter(torch.zeros(2, HIDDEN, HIDDEN))

    def forward(self, x):
        return x


def test_unknown_stacked_weights_raise_naming_ignore():
    model = build_tiny_model("llama")
    model.model.layers[0].mlp.mystery = _Stacked()
    with pytest.raises(UnsupportedArchitectureError, match=r"mlp\.mystery\.kernel.*ignore=") as err:
        target_linears(model)
    assert "(2, 32, 32)" in str(err.value)
    with pytest.raises(UnsupportedArchitectureError):
        prune_(model, WandaConfig(sparsity=0.5), WINDOWS, show_progress=False)
    grouped = target_linears(model, ignore=["lm_head", r"re:mlp\.mystery"])
    assert len(grouped["model.layers.0"]) == 7
    assert len(target_linears(model, ["q"])["model.layers.0"]) == 1  # not targeted: fine
