"""Fluctuation strategies of the reverse golden search: how the searched percentage moves.

Each strategy is a pure function ``(state, round, last_kl, best_kl) -> (percent, state)`` over
a ``FluctuationState`` (the target percentage, the band of proposals, the strategy's
own variables and a seed), registered in ``FLUCTUATION_STRATEGIES``. Every proposal lies in
the band ``[low, high]`` (default ``[target, 4 * target]``, capped at 100): the per-sample
top-k percentage whose intersection over samples seeds the candidate mask. Small values give
a strict (small) intersection, large values a loose one; the strategies differ in how they
move through the band.

Names are the specification's (``adaptive_sinusoidal``, ``momentum_based``,
``exploration_decay``, ``harmonic_oscillator``, ``chaos_driven``); ``momentum`` and ``chaos``
stay accepted spellings (``resolve_strategy``). Two knobs shape every strategy:
``fluctuation_amplitude`` (the fraction of the band's half-width the proposals may move, in
(0, 1]) and ``fluctuation_frequency`` (cycles per round of the periodic strategies:
``adaptive_sinusoidal``'s sine and ``harmonic_oscillator``'s spring; 0.25 = a quarter turn a
round).
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

Strategy = Callable[["FluctuationState", int, float | None, float | None], tuple[float, Any]]
FLUCTUATION_STRATEGIES: dict[str, Strategy] = {}
STRATEGY_ALIASES = {"momentum": "momentum_based", "chaos": "chaos_driven"}
DEFAULT_FREQUENCY = 0.25  # a quarter turn per round


def resolve_strategy(name: str) -> str:
    """The registered name of ``name`` (short spellings accepted); ValueError if unknown."""
    resolved = STRATEGY_ALIASES.get(name, name)
    if resolved not in FLUCTUATION_STRATEGIES:
        raise ValueError(
            f"unknown strategy {name!r}; valid strategies: {sorted(FLUCTUATION_STRATEGIES)} "
            f"(also accepted: {sorted(STRATEGY_ALIASES)})"
        )
    return resolved


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
    max_amplitude: float = 1.0  # fluctuation_amplitude: fraction of the half-width used
    frequency: float = DEFAULT_FREQUENCY  # fluctuation_frequency: cycles per round
    extra: dict = field(default_factory=dict)

    @property
    def center(self) -> float:
        return (self.low + self.high) / 2

    @property
    def half_width(self) -> float:
        return (self.high - self.low) / 2

    def clip(self, percent: float) -> float:
        return min(max(percent, self.low), self.high)


def initial_state(
    target: float,
    expansion: float = 4.0,
    seed: int = 0,
    amplitude: float = 1.0,
    frequency: float = DEFAULT_FREQUENCY,
) -> FluctuationState:
    """Band ``[target, min(100, expansion * target)]``; the first proposal is its centre.
    ``amplitude`` and ``frequency``: the ``fluctuation_amplitude`` / ``_frequency`` knobs."""
    check_fluctuation(amplitude, frequency)
    if not 0 < target <= 100:
        raise ValueError(f"target must be in (0, 100], got {target}")
    if not expansion >= 1:
        raise ValueError(
            f"expansion must be >= 1 (band [target, expansion * target]), got {expansion}"
        )
    chaos = random.Random(seed).uniform(0.1, 0.9)
    high = min(100.0, target * expansion)
    return FluctuationState(
        target=target,
        low=target,
        high=high,
        percent=(target + high) / 2,
        seed=seed,
        chaos=chaos,
        amplitude=amplitude,
        max_amplitude=amplitude,
        frequency=frequency,
    )


def check_fluctuation(amplitude: float, frequency: float) -> None:
    if isinstance(amplitude, bool) or not isinstance(amplitude, int | float):
        raise ValueError(f"fluctuation_amplitude must be a number in (0, 1], got {amplitude!r}")
    if not 0 < amplitude <= 1:
        raise ValueError(
            f"fluctuation_amplitude must be in (0, 1] (a fraction of the band), got {amplitude}"
        )
    if isinstance(frequency, bool) or not isinstance(frequency, int | float):
        raise ValueError(f"fluctuation_frequency must be a number > 0, got {frequency!r}")
    if not (math.isfinite(frequency) and frequency > 0):
        raise ValueError(
            f"fluctuation_frequency must be > 0 (cycles per round, e.g. 0.25), got {frequency}"
        )


def _improved(last_kl: float | None, best_kl: float | None) -> bool:
    return last_kl is not None and best_kl is not None and last_kl >= best_kl


@register_strategy("adaptive_sinusoidal")
def adaptive_sinusoidal(state, round_index, last_kl, best_kl):
    """A sine around the target; the amplitude widens after a gain and shrinks after a miss."""
    amplitude = state.amplitude
    if last_kl is not None:
        gained = _improved(last_kl, best_kl)
        amplitude = min(state.max_amplitude, amplitude * 1.2) if gained else amplitude * 0.7
    angle = 2 * math.pi * state.frequency * round_index + 0.5
    offset = state.half_width * amplitude * math.sin(angle)
    percent = state.clip(state.center + offset)
    return percent, replace(state, percent=percent, amplitude=amplitude)


@register_strategy("momentum_based")
def momentum_based(state, round_index, last_kl, best_kl, beta: float = 0.6):
    """Keep moving in the direction that raised the KL last round; reverse (and halve the
    speed) when the last move lowered it."""
    step = state.half_width * 0.5 * state.max_amplitude
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
    amplitude = state.max_amplitude * decay**round_index
    percent = state.clip(state.center + state.half_width * rng.uniform(-amplitude, amplitude))
    return percent, replace(state, percent=percent, amplitude=amplitude)


@register_strategy("harmonic_oscillator")
def harmonic_oscillator(state, round_index, last_kl, best_kl, stiffness=0.8, damping=0.25):
    """A damped spring pulled toward the band's centre, released from its upper edge (or
    ``fluctuation_amplitude`` of the way there); the stiffness grows with the square of
    ``fluctuation_frequency`` (0.8 at the default 0.25)."""
    stiffness = stiffness * (state.frequency / DEFAULT_FREQUENCY) ** 2
    position = (state.percent if state.percent is not None else state.center) - state.center
    velocity = state.velocity
    if round_index == 0:
        position, velocity = state.half_width * state.max_amplitude, 0.0
    else:
        velocity = (1 - damping) * velocity - stiffness * position
        position = position + velocity
    percent = state.clip(state.center + position)
    return percent, replace(state, percent=percent, velocity=velocity)


@register_strategy("chaos_driven")
def chaos_driven(state, round_index, last_kl, best_kl, r: float = 3.9):
    """The logistic map x <- r x (1 - x) (chaotic for r near 3.9) mapped onto the band (its
    central ``fluctuation_amplitude`` share)."""
    x = r * state.chaos * (1 - state.chaos)
    x = min(max(x, 1e-9), 1 - 1e-9)
    offset = (2 * x - 1) * state.half_width * state.max_amplitude
    percent = state.clip(state.center + offset)
    return percent, replace(state, percent=percent, chaos=x)
