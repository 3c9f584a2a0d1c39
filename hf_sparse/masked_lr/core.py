"""Fluctuation strategies of the reverse golden search: how the searched percentage moves.

Each strategy is a pure function ``(state, round, last_kl, best_kl) -> (percent, state)`` over
a ``FluctuationState`` (the target percentage, the band of proposals, the strategy's
own variables and a seed), registered in ``FLUCTUATION_STRATEGIES``. Every proposal lies in
the band ``[low, high]`` (default ``[target, 4 * target]``, capped at 100): the per-sample
top-k percentage whose intersection over samples seeds the candidate mask. Small values give
a strict (small) intersection, large values a loose one; the strategies differ in how they
move through the band.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

Strategy = Callable[["FluctuationState", int, float | None, float | None], tuple[float, Any]]
FLUCTUATION_STRATEGIES: dict[str, Strategy] = {}


def register_strategy(name: str) -> Callable[[Strategy], Strategy]:
    def decorate(fn: Strategy) -> Strategy:
        FLUCTUATION_STRATEGIES[name] = fn
        return fn

    return decorate


@dataclass(frozen=True)
class FluctuationState:
    target: float  # the percentage the search must end on
    low: float  # the band of proposals
    high: float
    percent: float | None = None  # the last proposal
    velocity: float = 0.0  # momentum / oscillator velocity, in percent per round
    amplitude: float = 1.0  # current relative amplitude (decays or adapts)
    chaos: float = 0.37  # logistic-map variable in (0, 1)
    seed: int = 0
    extra: dict = field(default_factory=dict)

    @property
    def center(self) -> float:
        return (self.low + self.high) / 2

    @property
    def half_width(self) -> float:
        return (self.high - self.low) / 2

    def clip(self, percent: float) -> float:
        return min(max(percent, self.low), self.high)


def initial_state(target: float, expansion: float = 4.0, seed: int = 0) -> FluctuationState:
    """Band ``[target, min(100, expansion * target)]``; the first proposal is its centre."""
    if not 0 < target <= 100:
        raise ValueError(f"target must be in (0, 100], got {target}")
    if not expansion >= 1:
        raise ValueError(
            f"expansion must be >= 1 (band [target, expansion * target]), got {expansion}"
        )
    chaos = random.Random(seed).uniform(0.1, 0.9)
    high = min(100.0, target * expansion)
    return FluctuationState(
        target=target, low=target, high=high, percent=(target + high) / 2, seed=seed, chaos=chaos
    )


def _improved(last_kl: float | None, best_kl: float | None) -> bool:
    return last_kl is not None and best_kl is not None and last_kl >= best_kl


@register_strategy("adaptive_sinusoidal")
def adaptive_sinusoidal(state, round_index, last_kl, best_kl):
    """A sine around the target; the amplitude widens after a gain and shrinks after a miss."""
    amplitude = state.amplitude
    if last_kl is not None:
        amplitude = min(1.0, amplitude * 1.2) if _improved(last_kl, best_kl) else amplitude * 0.7
    offset = state.half_width * amplitude * math.sin(round_index * math.pi / 2 + 0.5)
    percent = state.clip(state.center + offset)
    return percent, replace(state, percent=percent, amplitude=amplitude)


@register_strategy("momentum")
def momentum(state, round_index, last_kl, best_kl, beta: float = 0.6):
    """Keep moving in the direction that raised the KL last round; reverse (and halve the
    speed) when the last move lowered it."""
    step = state.half_width * 0.5
    velocity = state.velocity or step
    previous = state.extra.get("previous_kl")
    if last_kl is not None and previous is not None and last_kl < previous:
        velocity = -velocity * 0.5
    velocity = beta * velocity + (1 - beta) * math.copysign(step, velocity)
    percent = state.clip((state.percent or state.center) + velocity)
    extra = {**state.extra, "previous_kl": last_kl}
    return percent, replace(state, percent=percent, velocity=velocity, extra=extra)


@register_strategy("exploration_decay")
def exploration_decay(state, round_index, last_kl, best_kl, decay: float = 0.75):
    """Random offsets whose amplitude decays geometrically: explore early, settle late."""
    rng = random.Random(state.seed * 1_000_003 + round_index)
    amplitude = decay**round_index
    percent = state.clip(state.center + state.half_width * rng.uniform(-amplitude, amplitude))
    return percent, replace(state, percent=percent, amplitude=amplitude)


@register_strategy("harmonic_oscillator")
def harmonic_oscillator(state, round_index, last_kl, best_kl, stiffness=0.8, damping=0.25):
    """A damped spring pulled toward the band's centre, released from its upper edge."""
    position = (state.percent if state.percent is not None else state.center) - state.center
    velocity = state.velocity
    if round_index == 0:
        position, velocity = state.half_width, 0.0
    else:
        velocity = (1 - damping) * velocity - stiffness * position
        position = position + velocity
    percent = state.clip(state.center + position)
    return percent, replace(state, percent=percent, velocity=velocity)


@register_strategy("chaos")
def chaos(state, round_index, last_kl, best_kl, r: float = 3.9):
    """The logistic map x <- r x (1 - x) (chaotic for r near 3.9) mapped onto the band."""
    x = r * state.chaos * (1 - state.chaos)
    x = min(max(x, 1e-9), 1 - 1e-9)
    percent = state.clip(state.low + x * (state.high - state.low))
    return percent, replace(state, percent=percent, chaos=x)
