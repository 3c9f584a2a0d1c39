"""Top-k sets and their controls: the same number of random entries, and the bottom-k."""

from __future__ import annotations

from collections.abc import Mapping

import torch

from ..masks import ParameterMasks
from ..masks.ranking import flatten, top_count, unflatten

RANKING_MODES = ("global", "layer", "head")


def resolve_count(k: float | int, total: int, name: str = "k") -> int:
    """``k`` as a count: an int is a count, a float in (0, 100) a percentage of ``total``."""
    if isinstance(k, bool) or not isinstance(k, int | float):
        raise ValueError(f"{name} must be a count (int) or a percentage (float), got {k!r}")
    if isinstance(k, int):
        if not 1 <= k <= total:
            raise ValueError(
                f"{name}={k} weights, but the selected parameters hold {total:,}: choose "
                f"1 <= {name} <= {total:,}"
            )
        return k
    if not 0 < k <= 100:
        raise ValueError(f"{name} as a percentage must be in (0, 100], got {k}")
    return max(1, int(round(k / 100 * total)))


def top_k_entries(scores: Mapping[str, torch.Tensor], count: int, largest: bool = True):
    """Masks of the ``count`` highest (or lowest) scores over all tensors together."""
    flat = flatten(scores).float()
    if not largest:
        flat = -flat
    return ParameterMasks(unflatten(top_count(flat, count), scores))


def random_entries(
    shapes: Mapping[str, torch.Size], count: int, seed: int, exclude=None
) -> ParameterMasks:
    """``count`` entries drawn uniformly without replacement over all tensors (optionally not
    among the True entries of ``exclude``), as masks."""
    sizes = {name: int(torch.Size(shape).numel()) for name, shape in shapes.items()}
    total = sum(sizes.values())
    generator = torch.Generator().manual_seed(seed)
    if exclude is None:
        chosen = torch.randperm(total, generator=generator)[:count]
    else:
        allowed = ~flatten(
            {
                n: exclude[n] if n in exclude else torch.zeros(s, dtype=torch.bool)
                for n, s in shapes.items()
            }
        )
        pool = allowed.nonzero().squeeze(1)
        chosen = pool[torch.randperm(pool.numel(), generator=generator)[:count]]
    flat = torch.zeros(total, dtype=torch.bool)
    flat[chosen] = True
    like = {name: torch.empty(shape, dtype=torch.bool) for name, shape in shapes.items()}
    return ParameterMasks(unflatten(flat, like))
