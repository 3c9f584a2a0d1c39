"""How well a decomposition matches the ground truth, and how sparse its importances are.

Metrics of the SPD paper (Bushnaq et al., 2025) and its predecessor APD (Braun et al.,
"Interpretability in Parameter Space", 2025):

* MMCS, mean max cosine similarity: for each ground-truth feature ``i`` (a column ``W[:, i]``
  of the target), the best cosine between ``W[:, i]`` and column ``i`` of a subcomponent's
  matrix ``U[:, c] V[c, i]``, averaged over features. 1 = every feature has a component
  pointing exactly its way.
* ML2R, mean L2 ratio: ``||U[:, c*] V[c*, i]|| / ||W[:, i]||`` for that best component ``c*``.
  1 = the component carries the feature's whole weight.
* alive components (causal importance above a threshold on some input), CI L0 (components
  active per input), and the identity-CI error on one-hot inputs.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch


@dataclass
class DirectionMatch:
    mmcs: float
    ml2r: float
    best_component: list[int]  # per ground-truth feature
    cosines: list[float]


def mmcs_ml2r(target: torch.Tensor, U: torch.Tensor, V: torch.Tensor) -> DirectionMatch:
    """Match the columns of ``target`` (``[d_out, n_features]``) with the same columns of the
    rank-one matrices ``U[:, c] V[c, :]`` (``U: [d_out, C]``, ``V: [C, n_features]``).

    For a layer whose features are its outputs (rows), pass ``target.T, V.T, U.T``.
    """
    target, U, V = target.detach().float(), U.detach().float(), V.detach().float()
    if U.shape[0] != target.shape[0] or V.shape[1] != target.shape[1]:
        raise ValueError(
            f"shapes do not fit: target {tuple(target.shape)}, U {tuple(U.shape)}, "
            f"V {tuple(V.shape)}"
        )
    # column i of component c: U[:, c] * V[c, i]; its norm |U[:, c]| |V[c, i]|
    u_norm = U.norm(dim=0)  # [C]
    t_norm = target.norm(dim=0).clamp_min(1e-12)  # [n]
    dots = (target.t() @ U) * V.t()  # [n, C]: W[:, i] . U[:, c] * V[c, i]
    col_norms = (u_norm[None, :] * V.t().abs()).clamp_min(1e-12)  # [n, C]
    cos = dots / (t_norm[:, None] * col_norms)
    best_cos, best = cos.max(dim=1)
    ratio = col_norms.gather(1, best[:, None]).squeeze(1) / t_norm
    return DirectionMatch(
        mmcs=float(best_cos.mean()),
        ml2r=float(ratio.mean()),
        best_component=[int(c) for c in best],
        cosines=[float(c) for c in best_cos],
    )


def alive_components(ci: torch.Tensor, threshold: float = 0.1) -> torch.Tensor:
    """Bool ``[C]``: components whose importance exceeds ``threshold`` on some input of ``ci``
    (``[..., C]``)."""
    return (ci.reshape(-1, ci.shape[-1]) > threshold).any(dim=0)


def ci_l0(ci: torch.Tensor, threshold: float = 0.1) -> float:
    """Mean number of components with importance above ``threshold`` per input (token)."""
    return float((ci > threshold).float().sum(-1).mean())


@dataclass
class IdentityCIReport:
    """How close the one-hot importances ``[n_features, C]`` are to a permuted identity."""

    error: float  # mean |CI - permuted identity| over the n_features x C matrix, times C
    one_to_one_fraction: float  # features with exactly one active component, not shared
    active_per_feature: list[int]
    n_alive: int


def identity_ci_report(ci: torch.Tensor, threshold: float = 0.1) -> IdentityCIReport:
    """Compare importances on one-hot inputs (row ``i`` = feature ``i`` alone) with the ideal:
    each feature switches on exactly one component, its own.

    The error matches each feature with its most important component (distinct when possible)
    and sums ``|CI - ideal|`` over the whole matrix, divided by the number of features.
    """
    ci = ci.detach().float()
    n, C = ci.shape
    active = ci > threshold
    counts = active.sum(1)
    owners = ci.argmax(1)
    ideal = torch.zeros_like(ci)
    ideal[torch.arange(n), owners] = 1.0
    error = float((ci - ideal).abs().sum() / n)
    single = counts == 1
    owner_of_single = owners[single].tolist()
    shared = {c for c in owner_of_single if owner_of_single.count(c) > 1}
    good = sum(
        1 for ok, c in zip(single.tolist(), owners.tolist(), strict=True) if ok and c not in shared
    )
    return IdentityCIReport(
        error=error,
        one_to_one_fraction=good / n,
        active_per_feature=[int(k) for k in counts],
        n_alive=int(alive_components(ci, threshold).sum()),
    )


def coactivation_clusters(
    active: torch.Tensor, min_similarity: float = 0.5, names: Iterable[str] | None = None
) -> list[list[str]]:
    """Group components that fire together: average-linkage agglomeration on the Jaccard
    similarity of their activity (``active: [tokens, K]`` bool), stopping below
    ``min_similarity``. Components that never fire are left out. Returns clusters of names
    (``"<index>"`` when ``names`` is None), largest first (ties: lowest component first).

    The cluster-to-cluster similarities live in one ``[K, K]`` fp64 matrix updated in place by
    the Lance-Williams rule for average linkage (a merged cluster's similarity to ``k`` is the
    size-weighted mean of its parts'), so each merge costs one arg-max over the matrix: a few
    thousand components (an LM decomposition's every matrix at once) take seconds, where
    re-averaging member pairs per candidate pair grew as ``K^3`` in Python."""
    active = active.reshape(-1, active.shape[-1])
    K = active.shape[1]
    labels = list(names) if names is not None else [str(i) for i in range(K)]
    if len(labels) != K:
        raise ValueError(f"{len(labels)} names for {K} components")
    fired = (active.sum(0) > 0).nonzero().flatten().tolist()
    if not fired:
        return []
    a = active[:, fired].double()
    both = a.t() @ a
    either = a.sum(0)[:, None] + a.sum(0)[None, :] - both
    sim = both / either.clamp_min(1)
    n = len(fired)
    sim.fill_diagonal_(float("-inf"))
    members: dict[int, list[int]] = {i: [i] for i in range(n)}
    while len(members) > 1:
        flat = int(sim.argmax())
        x, y = sorted(divmod(flat, n))
        if not sim[x, y] >= min_similarity:
            break
        size_x, size_y = len(members[x]), len(members[y])
        merged = (size_x * sim[x] + size_y * sim[y]) / (size_x + size_y)
        sim[x], sim[:, x] = merged, merged
        sim[y], sim[:, y] = float("-inf"), float("-inf")
        sim[x, x] = float("-inf")
        members[x] += members.pop(y)
    clusters = sorted(members.values(), key=lambda c: (-len(c), min(c)))
    return [[labels[fired[i]] for i in sorted(cluster)] for cluster in clusters]
