"""Golden masks, the reverse golden search and its fluctuation strategies."""

from __future__ import annotations

import pytest
import torch
from conftest import build_tiny_model, make_token_windows

from hf_sparse.importance import compute_importance
from hf_sparse.importance.samples import as_samples
from hf_sparse.masked_lr import (
    FLUCTUATION_STRATEGIES,
    GoldenConfig,
    ReverseGoldenConfig,
    golden_masks,
    initial_state,
    resolve_strategy,
    reverse_golden_masks,
)
from hf_sparse.masked_lr.reverse import KLProbe
from hf_sparse.masks import count_for, top_k
from hf_sparse.models import parameter_layouts


def examples(n: int = 10, length: int = 12):
    return [{"input_ids": row} for row in make_token_windows(n=n, length=length, seed=2)]


def test_golden_is_the_intersection_of_per_sample_top_k():
    model = build_tiny_model("llama")
    data = examples()
    config = GoldenConfig(top_k_percent=30, num_samples=4)
    result = golden_masks(model, config, data, show_progress=False)
    expected = None
    for example in data[:4]:
        scores = compute_importance(model, [example], "gradient", show_progress=False)
        masks = top_k(scores, 30, "tensor", parameter_layouts(model))
        expected = masks if expected is None else expected & masks
    assert result.masks == expected
    assert result.samples_used == 4
    assert 0 < result.masks.density() < 0.3
    assert sum(r["kept"] for r in result.per_tensor) == result.masks.count()


def test_golden_last_blocks_and_prompt_fn():
    model = build_tiny_model("llama")
    texts = ["a", "b", "c"]
    windows = make_token_windows(n=3, length=9, seed=4)
    prompt = dict(zip(texts, windows, strict=True))
    result = golden_masks(
        model,
        GoldenConfig(top_k_percent=20, num_samples=3, last_blocks_percent=50),
        texts,
        lambda t: {"input_ids": prompt[t], "labels": prompt[t]},
        show_progress=False,
    )
    assert result.masks and all(n.startswith("model.layers.1.") for n in result.masks)


def test_golden_bad_input():
    model = build_tiny_model("llama")
    data = examples()
    for bad in (0, 101):
        with pytest.raises(ValueError, match=r"top_k_percent must be in \(0, 100\]"):
            GoldenConfig(top_k_percent=bad)
    with pytest.raises(ValueError, match="empty"):
        golden_masks(model, GoldenConfig(), [])
    with pytest.raises(ValueError, match="example 1.*same length"):
        golden_masks(
            model,
            GoldenConfig(num_samples=2),
            [0, 1],
            lambda i: {"input_ids": [1, 2, 3], "labels": [1, 2, 3][: 3 - i]},
        )
    with pytest.raises(ValueError, match="per-sample metric"):
        GoldenConfig(metric="magnitude")
    with pytest.raises(ValueError, match="num_samples"):
        GoldenConfig(num_samples=0)
    with pytest.raises(ValueError, match="scope must be one of"):
        GoldenConfig(scope="layer")
    with pytest.raises(ValueError, match=r"last_blocks_percent must be in \(0, 100\]"):
        GoldenConfig(last_blocks_percent=0)
    assert golden_masks(model, GoldenConfig(num_samples=2), data, show_progress=False).masks


def test_reverse_search_beats_random_and_restores_weights():
    model = build_tiny_model("llama")
    data = examples(12)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    config = ReverseGoldenConfig(target_percent=5.0, num_samples=6, eval_samples=4, rounds=6)
    result = reverse_golden_masks(model, config, data, show_progress=False)
    after = {n: p.detach().clone() for n, p in model.named_parameters()}
    assert all(torch.equal(before[n], after[n]) for n in before)
    total = result.masks.numel()
    assert result.masks.count() == count_for(5.0, total)
    assert result.kl == max(h["kl"] for h in result.history) > 0

    held_out = as_samples(data[6:10])
    probe = KLProbe(model, held_out)
    assert probe.kl_with_zeroed(dict(result.masks)) == pytest.approx(result.kl, rel=1e-5)
    generator = torch.Generator().manual_seed(0)
    random_kls = []
    for _ in range(3):
        flat = torch.zeros(total, dtype=torch.bool)
        flat[torch.randperm(total, generator=generator)[: result.masks.count()]] = True
        masks, start = {}, 0
        for name, mask in result.masks.items():
            masks[name] = flat[start : start + mask.numel()].reshape(mask.shape)
            start += mask.numel()
        random_kls.append(probe.kl_with_zeroed(masks))
    assert result.kl > max(random_kls)
    assert result.settings["target_percent"] == 5.0 and result.settings["num_samples"] == 6


def test_reverse_search_stops_early_on_stagnation():
    model = build_tiny_model("llama")
    config = ReverseGoldenConfig(
        target_percent=5.0, num_samples=4, rounds=30, patience=2, strategy="chaos"
    )
    result = reverse_golden_masks(model, config, examples(12), show_progress=False)
    assert len(result.history) < 30
    last = result.history[-3:]
    assert all(h["kl"] <= last[0]["best_kl"] for h in last[1:])


def test_reverse_bad_input():
    model = build_tiny_model("llama")
    with pytest.raises(ValueError, match="valid strategies"):
        ReverseGoldenConfig(strategy="random_walk")
    with pytest.raises(ValueError, match="held-out"):
        reverse_golden_masks(model, ReverseGoldenConfig(num_samples=4), examples(4))
    with pytest.raises(ValueError, match=r"target_percent must be in \(0, 100\]"):
        ReverseGoldenConfig(target_percent=0.0)
    with pytest.raises(ValueError, match="scope"):
        ReverseGoldenConfig(scope="head")


def run(strategy: str, rounds: int = 12, kl_fn=None, seed: int = 0, **knobs):
    state = initial_state(2.0, expansion=4.0, seed=seed, **knobs)
    step = FLUCTUATION_STRATEGIES[resolve_strategy(strategy)]
    percents, last, best = [], None, None
    for r in range(rounds):
        percent, state = step(state, r, last, best)
        percents.append(percent)
        last = kl_fn(percent) if kl_fn else 1.0
        best = last if best is None else max(best, last)
    return percents, state


@pytest.mark.parametrize("strategy", sorted(FLUCTUATION_STRATEGIES))
def test_strategies_are_bounded_and_deterministic(strategy):
    percents, state = run(strategy, 40, kl_fn=lambda p: -abs(p - 5.0))
    assert all(state.low <= p <= state.high for p in percents)
    assert (state.low, state.high) == (2.0, 8.0)
    assert run(strategy, 40, kl_fn=lambda p: -abs(p - 5.0))[0] == percents


def test_sinusoidal_oscillates_and_narrows_after_misses():
    percents, state = run("adaptive_sinusoidal", 16, kl_fn=lambda p: -p * 0 - len(str(p)))
    offsets = [p - state.center for p in percents]
    assert any(a > 0 > b or a < 0 < b for a, b in zip(offsets, offsets[1:], strict=False))
    always_worse = iter(range(100, 0, -1))
    percents, _ = run("adaptive_sinusoidal", 16, kl_fn=lambda p: next(always_worse))
    spread = [abs(p - state.center) for p in percents]
    assert max(spread[-4:]) < max(spread[:4])


def test_momentum_keeps_the_improving_direction():
    percents, _ = run("momentum", 6, kl_fn=lambda p: p)  # KL grows with p: keep going up
    assert all(b >= a for a, b in zip(percents, percents[1:], strict=False))
    percents, state = run("momentum", 10, kl_fn=lambda p: -p)  # reverses toward low p
    assert min(percents) < state.center


def test_exploration_decay_settles():
    percents, state = run("exploration_decay", 30)
    early = max(abs(p - state.center) for p in percents[:5])
    late = max(abs(p - state.center) for p in percents[-5:])
    assert late < 0.1 * state.half_width < early


def test_harmonic_oscillator_swings_back_with_decaying_amplitude():
    percents, state = run("harmonic_oscillator", 30)
    assert percents[0] == state.high
    offsets = [p - state.center for p in percents]
    assert min(offsets) < 0  # crossed the centre
    assert max(abs(o) for o in offsets[-5:]) < 0.3 * state.half_width


def test_chaos_is_aperiodic_but_seeded():
    a, _ = run("chaos", 25, seed=0)
    b, _ = run("chaos", 25, seed=1)
    assert len({round(p, 9) for p in a}) > 20  # no short cycle
    assert a != b


def test_strategy_names_are_the_specifications_and_short_spellings_resolve():
    assert sorted(FLUCTUATION_STRATEGIES) == sorted(
        [
            "adaptive_sinusoidal",
            "momentum_based",
            "exploration_decay",
            "harmonic_oscillator",
            "chaos_driven",
        ]
    )
    assert ReverseGoldenConfig(strategy="momentum").strategy == "momentum_based"
    assert ReverseGoldenConfig(strategy="chaos").strategy == "chaos_driven"
    with pytest.raises(ValueError, match="unknown strategy 'sine'.*also accepted"):
        ReverseGoldenConfig(strategy="sine")


@pytest.mark.parametrize("strategy", sorted(FLUCTUATION_STRATEGIES))
def test_fluctuation_amplitude_bounds_every_strategy(strategy):
    full, state = run(strategy, 30, kl_fn=lambda p: -abs(p - 5.0))
    half, _ = run(strategy, 30, kl_fn=lambda p: -abs(p - 5.0), amplitude=0.25)
    assert all(abs(p - state.center) <= 0.25 * state.half_width + 1e-9 for p in half)
    assert max(abs(p - state.center) for p in full) > 0.25 * state.half_width


def test_fluctuation_frequency_sets_the_period():
    constant = dict(kl_fn=lambda p: 1.0)  # never better, never worse than the best
    slow, state = run("adaptive_sinusoidal", 8, frequency=0.125, **constant)
    fast, _ = run("adaptive_sinusoidal", 8, frequency=0.5, **constant)
    signs = lambda ps: [p > state.center for p in ps]  # noqa: E731
    crossings = lambda ps: sum(a != b for a, b in zip(signs(ps), signs(ps)[1:], strict=False))  # noqa: E731
    assert crossings(fast) > crossings(slow)
    stiff, _ = run("harmonic_oscillator", 6, frequency=0.5)
    soft, _ = run("harmonic_oscillator", 6, frequency=0.1)
    assert min(stiff[:3]) < state.center < min(soft[:3])  # the stiffer spring crosses first
    for bad in ({"fluctuation_amplitude": 0.0}, {"fluctuation_amplitude": 1.5}):
        with pytest.raises(ValueError, match="fluctuation_amplitude must be in"):
            ReverseGoldenConfig(**bad)
    with pytest.raises(ValueError, match="fluctuation_frequency must be > 0"):
        ReverseGoldenConfig(fluctuation_frequency=-1)


def test_chunked_scoring_and_batched_kl_give_the_same_masks():
    model = build_tiny_model("llama")
    data = examples(10)
    plain = golden_masks(model, GoldenConfig(top_k_percent=30, num_samples=4), data, None, False)
    chunked = golden_masks(
        model, GoldenConfig(top_k_percent=30, num_samples=4, chunk_size=4), data, None, False
    )
    assert chunked.masks == plain.masks
    held_out = [{"input_ids": w[None, : 6 + i]} for i, w in enumerate(make_token_windows(3, 12))]
    masks = plain.masks
    one = KLProbe(model, held_out, batch_size=1).kl_with_zeroed(masks)
    three = KLProbe(model, held_out, batch_size=3).kl_with_zeroed(masks)  # padded batch
    assert one > 0 and three == pytest.approx(one, rel=1e-4)
    config = dict(target_percent=5.0, num_samples=4, eval_samples=3, rounds=3)
    a = reverse_golden_masks(model, ReverseGoldenConfig(**config), data, None, None, False)
    b = reverse_golden_masks(
        model,
        ReverseGoldenConfig(**config, chunk_size=5, batch_size=2),
        data,
        None,
        None,
        False,
    )
    assert a.masks == b.masks and b.kl == pytest.approx(a.kl, rel=1e-4)
    with pytest.raises(ValueError, match="chunk_size applies to the gradient metrics"):
        GoldenConfig(metric="hutchinson", chunk_size=8)
    with pytest.raises(ValueError, match="batch_size"):
        ReverseGoldenConfig(batch_size=0)
