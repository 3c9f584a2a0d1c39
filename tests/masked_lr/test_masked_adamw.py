"""MaskedAdamW against torch.optim.AdamW, frozen entries, state round trips, Trainer use."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from transformers import Trainer, TrainingArguments

from hf_sparse.masked_lr import MaskedAdamW
from hf_sparse.models import target_linears
from tests.conftest import build_tiny_model, make_token_windows

STEPS = 5


def make_params(seed: int = 0) -> list[nn.Parameter]:
    generator = torch.Generator().manual_seed(seed)
    return [
        nn.Parameter(torch.randn(6, 10, generator=generator)),
        nn.Parameter(torch.randn(7, generator=generator)),
    ]


def clone(params: list[nn.Parameter]) -> list[nn.Parameter]:
    return [nn.Parameter(p.detach().clone()) for p in params]


def random_masks(params, density: float = 0.3, seed: int = 1) -> dict[nn.Parameter, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {p: torch.rand(p.shape, generator=generator) < density for p in params}


def run(optimizer, params, steps: int = STEPS, seed: int = 2) -> None:
    """The same pseudo-random gradients for every optimizer run with the same seed."""
    generator = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=generator)
        optimizer.step()


@pytest.mark.parametrize("amsgrad", [False, True])
@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
@pytest.mark.parametrize("masked", [True, False])
def test_all_true_masks_match_adamw(amsgrad, weight_decay, masked):
    params = make_params()
    reference = clone(params)
    masks = {p: torch.ones(p.shape, dtype=torch.bool) for p in params} if masked else None
    kwargs = dict(lr=1e-2, weight_decay=weight_decay, amsgrad=amsgrad)
    run(MaskedAdamW(params, masks=masks, **kwargs), params)
    run(torch.optim.AdamW(reference, **kwargs), reference)
    for p, q in zip(params, reference, strict=True):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-7)


def test_defaults_and_maximize_match_adamw():
    params = make_params()
    reference = clone(params)
    run(MaskedAdamW(params, maximize=True), params)
    run(torch.optim.AdamW(reference, maximize=True), reference)
    for p, q in zip(params, reference, strict=True):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-7)


def test_outside_scale_zero_freezes_entries_bit_for_bit():
    params = make_params()
    before = [p.detach().clone() for p in params]
    masks = random_masks(params)
    run(MaskedAdamW(params, lr=1e-1, weight_decay=0.5, masks=masks), params)
    for p, old in zip(params, before, strict=True):
        mask = masks[p]
        assert torch.equal(p[~mask], old[~mask])
        assert (p[mask] != old[mask]).all()


def test_outside_scale_equals_adamw_with_scaled_lr():
    params = make_params()
    inside_ref, outside_ref = clone(params), clone(params)
    masks = random_masks(params)
    kwargs = dict(weight_decay=0.1, amsgrad=True)
    run(MaskedAdamW(params, lr=1e-2, masks=masks, outside_lr_scale=0.1, **kwargs), params)
    run(torch.optim.AdamW(inside_ref, lr=1e-2, **kwargs), inside_ref)
    run(torch.optim.AdamW(outside_ref, lr=1e-3, **kwargs), outside_ref)
    for p, inside, outside in zip(params, inside_ref, outside_ref, strict=True):
        mask = masks[p]
        torch.testing.assert_close(p[mask], inside[mask], rtol=0, atol=1e-7)
        torch.testing.assert_close(p[~mask], outside[~mask], rtol=0, atol=1e-7)


def test_param_groups_carry_their_own_scales():
    params = make_params()
    reference = clone(params)
    masks = random_masks(params)
    groups = [
        {"params": [params[0]], "inside_lr_scale": 0.5, "outside_lr_scale": 0.5},
        {"params": [params[1]]},
    ]
    optimizer = MaskedAdamW(groups, lr=1e-2, masks=masks)
    before = params[1].detach().clone()
    run(optimizer, params)
    run(
        torch.optim.AdamW([{"params": [reference[0]], "lr": 5e-3}, {"params": [reference[1]]}]),
        reference,
    )
    torch.testing.assert_close(params[0], reference[0], rtol=0, atol=1e-7)
    assert torch.equal(params[1][~masks[params[1]]], before[~masks[params[1]]])


def test_masks_set_later_and_by_name():
    model = nn.Sequential(nn.Linear(10, 6), nn.ReLU(), nn.Linear(6, 3))
    optimizer = MaskedAdamW(model.named_parameters(), lr=1e-2)
    params = list(model.parameters())
    run(optimizer, params, steps=2)  # no masks yet: plain AdamW
    mask = torch.rand(6, 10, generator=torch.Generator().manual_seed(0)) < 0.5
    optimizer.set_masks({"base_model.model.0.weight": mask})  # wrapper prefixes are ignored
    before = model[0].weight.detach().clone()
    run(optimizer, params, steps=2, seed=3)
    assert torch.equal(model[0].weight[~mask], before[~mask])
    assert (model[0].weight[mask] != before[mask]).all()
    assert torch.equal(optimizer.get_masks()[model[0].weight], mask)


def test_state_dict_round_trip_keeps_masks_and_moments():
    params = make_params()
    masks = random_masks(params)
    optimizer = MaskedAdamW(params, lr=1e-2, masks=masks, outside_lr_scale=0.2)
    run(optimizer, params, steps=2)
    saved = copy.deepcopy(optimizer.state_dict())  # as after torch.save / torch.load
    resumed_params = clone(params)
    resumed = MaskedAdamW(resumed_params, lr=1e-2, outside_lr_scale=0.2)
    resumed.load_state_dict(saved)
    for p, q in zip(params, resumed_params, strict=True):
        assert resumed.state[q]["lr_mask"].dtype == torch.bool
        assert torch.equal(resumed.state[q]["lr_mask"], masks[p])
    run(optimizer, params, steps=2, seed=5)
    run(resumed, resumed_params, steps=2, seed=5)
    for p, q in zip(params, resumed_params, strict=True):
        assert torch.equal(p, q)


def test_masks_saved_before_the_first_step():
    params = make_params()
    masks = random_masks(params)
    saved = MaskedAdamW(params, masks=masks).state_dict()
    resumed = MaskedAdamW(clone(params))
    resumed.load_state_dict(saved)
    assert [m.dtype for m in resumed.get_masks().values()] == [torch.bool, torch.bool]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"outside_lr_scale": -1.0}, "outside_lr_scale of param group 0 must be finite and >= 0"),
        ({"inside_lr_scale": float("inf")}, "inside_lr_scale of param group 0"),
        ({"lr": -1.0}, "lr must be >= 0"),
        ({"betas": (0.9, 1.0)}, "betas must be two numbers"),
    ],
)
def test_bad_hyperparameters(kwargs, message):
    with pytest.raises(ValueError, match=message):
        MaskedAdamW(make_params(), **kwargs)


def test_bad_group_scale_names_the_group():
    params = make_params()
    groups = [{"params": [params[0]]}, {"params": [params[1]], "outside_lr_scale": -0.5}]
    with pytest.raises(ValueError, match="param group 1"):
        MaskedAdamW(groups)


def test_bad_masks():
    params = make_params()
    with pytest.raises(ValueError, match=r"shape \(10, 6\) but the parameter has shape \(6, 10\)"):
        MaskedAdamW(params, masks={params[0]: torch.ones(10, 6, dtype=torch.bool)})
    with pytest.raises(ValueError, match="other than 0 and 1"):
        MaskedAdamW(params, masks={params[1]: torch.full((7,), 2)})
    with pytest.raises(ValueError, match="does not hold.*named_parameters"):
        MaskedAdamW(params, masks={"0.weight": torch.ones(6, 10)})
    stranger = nn.Parameter(torch.zeros(3))
    optimizer = MaskedAdamW(params)
    with pytest.raises(ValueError, match="does not hold"):
        optimizer.set_masks({params[1]: torch.ones(7), stranger: torch.ones(3)})
    assert not optimizer.get_masks()  # nothing was set: every mask is checked first


def test_trainer_trains_only_masked_entries(tmp_path):
    model = build_tiny_model("llama")
    generator = torch.Generator().manual_seed(0)
    linears = {n: m for group in target_linears(model).values() for n, m in group.items()}
    masks = {
        f"{name}.weight": torch.rand(m.weight.shape, generator=generator) < 0.1
        for name, m in linears.items()
    }
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = MaskedAdamW(model.named_parameters(), lr=1e-2, masks=masks)
    args = TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=3,
        per_device_train_batch_size=2,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
    )
    windows = make_token_windows(n=6, length=12)
    data = [{"input_ids": w, "labels": w.clone()} for w in windows]
    Trainer(model=model, args=args, train_dataset=data, optimizers=(optimizer, None)).train()
    after = dict(model.named_parameters())
    for name, mask in masks.items():
        assert torch.equal(after[name][~mask], before[name][~mask]), name
        assert (after[name][mask] != before[name][mask]).float().mean() > 0.9, name
    assert not torch.equal(after["model.norm.weight"], before["model.norm.weight"])


def test_absolute_rates_inside_and_outside_equal_adamw_at_those_rates():
    params = make_params()
    inside_ref, outside_ref = clone(params), clone(params)
    masks = random_masks(params)
    kwargs = dict(weight_decay=0.1)
    optimizer = MaskedAdamW(
        params, lr=1e-2, masks=masks, masked_lr=3e-2, unmasked_lr=2e-3, **kwargs
    )
    run(optimizer, params)
    run(torch.optim.AdamW(inside_ref, lr=3e-2, **kwargs), inside_ref)
    run(torch.optim.AdamW(outside_ref, lr=2e-3, **kwargs), outside_ref)
    for p, inside, outside in zip(params, inside_ref, outside_ref, strict=True):
        mask = masks[p]
        torch.testing.assert_close(p[mask], inside[mask], rtol=0, atol=1e-6)
        torch.testing.assert_close(p[~mask], outside[~mask], rtol=0, atol=1e-6)
    info = optimizer.get_lr_info()
    assert len(info) == 1 and info[0]["masked_params"] == 2
    assert info[0]["masked_lr"] == pytest.approx(3e-2) and info[0]["unmasked_lr"] == pytest.approx(
        2e-3
    )
    kept = sum(int(m.sum()) for m in masks.values())
    assert info[0]["mask_density"] == pytest.approx(kept / sum(m.numel() for m in masks.values()))
    for group in optimizer.param_groups:  # a scheduler halving lr halves both rates
        group["lr"] *= 0.5
    assert optimizer.get_lr_info()[0]["masked_lr"] == pytest.approx(1.5e-2)


def test_lr_info_per_group_and_absolute_rate_errors():
    params = make_params()
    masks = {params[0]: random_masks(params)[params[0]]}
    groups = [{"params": [params[0]], "masked_lr": 1e-3}, {"params": [params[1]], "lr": 5e-3}]
    info = MaskedAdamW(groups, lr=1e-2, masks=masks).get_lr_info()
    assert [i["masked_params"] for i in info] == [1, 0]
    assert info[0]["masked_lr"] == pytest.approx(1e-3) and info[0]["unmasked_lr"] == 0.0
    assert info[1]["lr"] == 5e-3 and info[1]["mask_density"] is None
    with pytest.raises(ValueError, match="masked_lr of param group 0 must be finite and >= 0"):
        MaskedAdamW(make_params(), masked_lr=-1.0)
    with pytest.raises(ValueError, match="needs a group lr > 0"):
        MaskedAdamW(make_params(), lr=0.0, unmasked_lr=1e-3)
