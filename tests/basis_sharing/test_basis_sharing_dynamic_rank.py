"""Dynamic rank that saves compute: sliced/gathered factors, caps, reordering, masks, heatmap."""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from hf_sparse.basis_sharing import (
    BasisSharingConfig,
    BasisSharingLayer,
    dynamic_rank,
    get_basis_sharing_model,
)
from hf_sparse.basis_sharing.dynamic_rank import static_fraction
from tests.conftest import build_tiny_model, make_token_windows

CASES = [
    ("global_static", False),
    ("global_static", True),
    ("prompt_adaptive", False),
    ("prompt_adaptive", True),
]


@pytest.fixture(scope="module")
def model():
    config = BasisSharingConfig(ratio=0.2, group_size=2)
    calibration = make_token_windows(n=16, length=32, seed=1)
    return get_basis_sharing_model(
        build_tiny_model("llama", num_hidden_layers=4), config, calibration=calibration
    )


def _capture(model):
    """Forward hooks recording (input, output) of every compressed layer."""
    seen: dict[str, list] = {}
    handles = []
    for name, module in model.base_model.layers("default").items():
        if isinstance(module, BasisSharingLayer):
            seen[name] = []
            handles.append(
                module.register_forward_hook(
                    lambda _m, args, out, name=name: seen[name].append((args[0], out))
                )
            )
    return seen, handles


@pytest.mark.parametrize(("strategy", "reorder"), CASES)
def test_sliced_output_equals_the_zeroed_full_rank_product(model, strategy, reorder):
    """Reference (obviously correct, slow): z = x B^T at full rank, directions outside the
    captured mask zeroed, then z C^T + bias. One sequence per call, so the mask is 0/1."""
    ids = make_token_windows(n=1, length=12, seed=3)
    layers = dict(model.base_model.layers("default"))
    seen, handles = _capture(model)
    with torch.no_grad(), dynamic_rank(model, strategy, energy=0.6, reorder=reorder) as report:
        model(input_ids=ids)
    for handle in handles:
        handle.remove()
    masks = report.rank_masks()
    assert set(masks) == set(layers)
    partial = 0
    for name, layer in layers.items():
        mask = masks[name]
        assert set(mask.unique().tolist()) <= {0.0, 1.0}
        partial += int(mask.sum() < mask.numel())
        ((x, y),) = seen[name]
        basis = layer.basis("default").double()
        coefficient = layer.basis_sharing_coefficient["default"].double()
        reference = ((x.double() @ basis.t()) * mask.double()) @ coefficient.t()
        bias = layer.get_base_layer().bias
        if bias is not None:
            reference = reference + bias.double()
        torch.testing.assert_close(y.double(), reference, rtol=1e-4, atol=1e-5)
        if not reorder:  # the kept set is a prefix in singular-value order
            r = int(mask.sum())
            assert mask[:r].eq(1).all()
    assert partial > 0  # at energy 0.6 some layer really dropped directions


def test_compute_falls_with_the_active_rank(model):
    ids = make_token_windows(n=2, length=16, seed=4)

    def flops(**kwargs) -> int:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            if kwargs:
                with dynamic_rank(model, **kwargs):
                    model(input_ids=ids)
            else:
                model(input_ids=ids)
        return counter.get_total_flops()

    full = flops()
    assert flops(strategy="baseline") == full
    capped = flops(strategy="global_static", energy=1.0, max_rank=1)
    static = flops(strategy="global_static", energy=0.6)
    assert capped < static < full
    # the saving is the compressed layers' share: dense parts (lm_head, attention) are unchanged
    with torch.no_grad(), dynamic_rank(model, "global_static", energy=1.0) as report:
        model(input_ids=ids)
    assert report.mean_fraction == 1.0


def test_decode_steps_gather_only_the_active_columns(model):
    """During generation the basis matmul of a decoding step has r_max rows, not k."""
    ids = make_token_windows(n=1, length=8, seed=5)
    layer_name, layer = next(iter(model.base_model.layers("default").items()))
    k = layer.basis_sharing_coefficient["default"].shape[1]
    widths = []
    original = torch.nn.functional.linear

    def spy(x, weight, bias=None):
        if x.shape[-2:-1] == (1,) and weight.shape[1] == layer.in_features:
            widths.append(weight.shape[0])
        return original(x, weight, bias)

    for reorder in (False, True):
        widths.clear()
        with torch.no_grad(), dynamic_rank(model, "prompt_adaptive", 0.5, reorder=reorder) as rep:
            torch.nn.functional.linear = spy
            try:
                model.generate(input_ids=ids, max_new_tokens=3, min_new_tokens=3, do_sample=False)
            finally:
                torch.nn.functional.linear = original
        ranks = [a for a, f in zip(rep.active, rep.full, strict=True) if f == k]
        assert widths and min(widths) < k  # decode projections on fewer than k directions
        assert max(ranks) < k


def test_batched_prompt_adaptive_matches_each_sequence_alone(model):
    ids = make_token_windows(n=3, length=10, seed=6)
    with torch.no_grad(), dynamic_rank(model, "prompt_adaptive", energy=0.6) as report:
        batch = model(input_ids=ids).logits
    assert len(set(report.active)) > 1  # the sequences and layers chose different ranks
    for i in range(ids.shape[0]):
        with torch.no_grad(), dynamic_rank(model, "prompt_adaptive", energy=0.6):
            alone = model(input_ids=ids[i : i + 1]).logits
        torch.testing.assert_close(batch[i : i + 1], alone, rtol=1e-4, atol=1e-5)


def test_max_rank_caps_and_config_defaults(model):
    ids = make_token_windows(n=2, length=8, seed=7)
    with torch.no_grad(), dynamic_rank(model, "prompt_adaptive", energy=1.0, max_rank=2) as r:
        model(input_ids=ids)
    assert max(r.active) == 2
    config = model.peft_config["default"]
    config.dynamic_rank_threshold, config.max_basis_rank = 0.6, 3
    try:
        with torch.no_grad(), dynamic_rank(model, "global_static") as report:
            model(input_ids=ids)
    finally:
        config.dynamic_rank_threshold, config.max_basis_rank = 0.95, None
    assert report.energy == 0.6 and report.max_rank == 3 and max(report.active) <= 3
    assert report.mean_fraction == pytest.approx(static_fraction(model, 0.6, max_rank=3))
    bad = dynamic_rank(model, "global_static", max_rank=0)
    with pytest.raises(ValueError, match="max_rank must be a positive integer"), bad:
        pass


def test_reordering_keeps_each_layers_own_largest_directions(model):
    """With reorder, global_static keeps per layer the smallest set of ||C_j||^2 sigma_j^2
    holding the energy; that set is never larger than the group's prefix for the same share of
    that layer's energy, and at least one layer keeps a non-prefix set."""
    ids = make_token_windows(n=1, length=8, seed=8)
    with torch.no_grad(), dynamic_rank(model, "global_static", 0.7, reorder=True) as report:
        model(input_ids=ids)
    sigmas = model.base_model.basis_sharing_sigmas["default"]
    non_prefix = 0
    for name, layer in model.base_model.layers("default").items():
        mask = report.rank_masks()[name].bool()
        r = int(mask.sum())
        non_prefix += int(not mask[:r].all())
        score = layer.basis_sharing_coefficient["default"].detach().double().pow(2).sum(0)
        score = score * sigmas[layer.basis_sharing_key["default"]].double().pow(2)
        kept = score[mask].sum() / score.sum()
        assert kept >= 0.7 - 1e-6
        if r > 1:  # minimal: dropping the smallest kept direction falls below the energy
            assert (score[mask].sum() - score[mask].min()) / score.sum() < 0.7
    assert non_prefix > 0


def test_gradients_flow_through_the_active_columns_only(model):
    ids = make_token_windows(n=1, length=8, seed=9)
    layer = next(iter(model.base_model.layers("default").values()))
    coefficient = layer.basis_sharing_coefficient["default"]
    coefficient.grad = None
    with dynamic_rank(model, "global_static", energy=1.0, max_rank=2):
        model(input_ids=ids).logits.sum().backward()
    grad = coefficient.grad
    assert grad[:, :2].abs().sum() > 0 and grad[:, 2:].abs().sum() == 0
    coefficient.grad = None


def test_rank_mask_heatmap(model, tmp_path):
    pytest.importorskip("matplotlib")
    from hf_sparse.basis_sharing.plots import plot_rank_masks

    ids = make_token_windows(n=3, length=8, seed=10)
    with torch.no_grad(), dynamic_rank(model, "prompt_adaptive", energy=0.7) as report:
        model(input_ids=ids)
    masks = report.rank_masks()
    assert all(float(m.min()) >= 0 and float(m.max()) <= 1 for m in masks.values())
    path = tmp_path / "masks.png"
    plot_rank_masks(masks, path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="no rank masks"):
        plot_rank_masks({}, tmp_path / "empty.png")


def test_config_rejects_bad_dynamic_rank_settings():
    with pytest.raises(ValueError, match=r"dynamic_rank_threshold must be in \(0, 1\]"):
        BasisSharingConfig(dynamic_rank_threshold=1.5)
    with pytest.raises(ValueError, match="max_basis_rank must be a positive integer"):
        BasisSharingConfig(max_basis_rank=-3)
