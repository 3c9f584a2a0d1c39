"""Which layers share which basis, at which rank; calibration statistics; the factorisation.

The plan is a pure function of the config and the base model's shapes, and is written into the
config (``layer_groups``, ``group_ranks``, ``target_modules``) so that a saved adapter rebuilds
the same structure on load without calibration data.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from ..calibration import InputStats, StatsCollector, all_reduce_stats
from ..models import (
    ExpertLinear,
    find_decoder_blocks,
    linear_role,
    model_type,
    target_linears,
    weight_matrix,
)
from .config import DEFAULT_SHARED_ROLES, DEFAULT_TARGET_ROLES, BasisSharingConfig
from .core import (
    SharedFactors,
    compression_rank,
    max_rank,
    refit_coefficients,
    shared_basis_svd,
    whitening_factor,
)

logger = logging.getLogger(__name__)

PEFT_PREFIX = "base_model.model."


@dataclass
class Group:
    """One basis: the layers (module names) that share it and its rank."""

    key: str
    role: str
    members: list[str]
    rank: int
    d_in: int
    d_out: int

    @property
    def dense_params(self) -> int:
        return len(self.members) * self.d_in * self.d_out

    @property
    def compressed_params(self) -> int:
        return self.rank * (self.d_in + len(self.members) * self.d_out)


def _strip(name: str) -> str:
    return name.removeprefix(PEFT_PREFIX).replace(".base_layer", "")


def _dense_linears(
    model: nn.Module, blocks: str | None, warn: bool = False
) -> list[dict[str, nn.Module]]:
    """Per decoder block: its ``nn.Linear`` / ``Conv1D`` layers (routers excluded).

    Stacked MoE experts are not layers PEFT can replace: they stay dense, with a warning when
    planning (the parameter counts of the plan show what was compressed).
    """
    per_block, experts = [], set()
    for linears in target_linears(model, targets=None, ignore=("lm_head",), blocks=blocks).values():
        dense = {}
        for name, module in linears.items():
            if isinstance(module, ExpertLinear):
                experts.add(name.rsplit(".", 2)[0])
            else:
                dense[name] = module
        per_block.append(dense)
    if experts and warn:
        logger.warning(
            "basis sharing compresses nn.Linear layers only: the stacked MoE experts %s stay "
            "dense (routers too)",
            sorted(experts)[:4],
        )
    return per_block


def _linears_by_role(model: nn.Module, blocks: str | None) -> list[dict[str, str]]:
    """Per decoder block: ``{role: module name}`` of its linear layers."""
    per_block = []
    for linears in _dense_linears(model, blocks, warn=True):
        roles: dict[str, str] = {}
        for name in linears:
            role = linear_role(name)
            if role is not None:
                roles.setdefault(role, _strip(name))
        per_block.append(roles)
    return per_block


def make_plan(model: nn.Module, config: BasisSharingConfig) -> dict[str, Group]:
    """Groups and ranks for ``model`` under ``config``; every check runs before any work.

    Writes the plan into ``config`` (``layer_groups``, ``group_ranks``, ``target_modules``).
    A config that already holds a plan (a saved adapter) is replayed, not re-planned.
    """
    if config.is_planned:
        return plan_from_config(model, config)
    per_block = _linears_by_role(model, config.blocks)
    n_blocks = len(per_block)
    present = sorted({r for roles in per_block for r in roles})
    arch = model_type(model)
    if config.target_roles is not None:
        missing = [r for r in config.target_roles if r not in present]
        if missing:
            raise ValueError(
                f"target_roles has {missing}, which this {arch} model lacks; its roles: {present}"
            )
        targets = list(config.target_roles)
    else:
        targets = [r for r in DEFAULT_TARGET_ROLES if r in present]
    if config.shared_roles is not None:
        missing = [r for r in config.shared_roles if r not in targets]
        if missing:
            raise ValueError(
                f"shared_roles has {missing}, which are not compressed here (targeted roles of "
                f"this {arch} model: {targets}); drop them or add them to target_roles"
            )
        shared = set(config.shared_roles)
    else:
        shared = {r for r in DEFAULT_SHARED_ROLES if r in targets}
    unused = [r for r in (config.role_ratios or {}) if r not in targets]
    if unused:
        raise ValueError(
            f"role_ratios has {unused}, which are not compressed here (targeted roles of this "
            f"{arch} model: {targets}); drop them or add them to target_roles"
        )
    if config.group_size > n_blocks and shared:
        raise ValueError(
            f"group_size={config.group_size} is larger than the number of layers ({n_blocks}) "
            f"of this {arch} model; use group_size <= {n_blocks}"
        )
    private = set(config.private_blocks or [])
    outside = sorted(i for i in private if i >= n_blocks)
    if outside:
        raise ValueError(
            f"private_blocks has {outside}, but this {arch} model has {n_blocks} blocks "
            f"(indices 0..{n_blocks - 1})"
        )
    modules = dict(model.named_modules())
    groups: dict[str, Group] = {}
    for role in targets:
        size = config.group_size if role in shared else 1
        for chunk in block_groups(n_blocks, size, private):
            indices = [i for i in chunk if role in per_block[i]]
            if not indices:
                continue
            names = [per_block[i][role] for i in indices]
            shapes = {tuple(weight_matrix(_module(modules, n)).shape) for n in names}
            if len(shapes) != 1:
                raise ValueError(f"layers {names} of role {role!r} differ in shape: {shapes}")
            ((d_out, d_in),) = shapes
            alone = size == 1 or (len(chunk) == 1 and chunk[0] in private)
            key = f"{role}_{indices[0]}" + ("" if alone else f"_{indices[-1]}")
            rank = compression_rank(d_in, d_out, len(names), config.ratio_of(role))
            _check_rank(key, rank, d_in, d_out, len(names), config.ratio_of(role))
            groups[key] = Group(key, role, names, rank, d_in, d_out)
    config.layer_groups = {m: g.key for g in groups.values() for m in g.members}
    config.group_ranks = {g.key: g.rank for g in groups.values()}
    config.target_modules = set(config.layer_groups)
    return groups


def block_groups(n_blocks: int, size: int, private: set[int] | frozenset = frozenset()):
    """Block indices per basis: runs of ``size`` blocks in order, skipping the ``private``
    ones, which stand alone (the last run is shorter when the count is not a multiple)."""
    rest = [i for i in range(n_blocks) if i not in private]
    runs = [rest[start : start + size] for start in range(0, len(rest), size)]
    return sorted(runs + [[i] for i in private if i < n_blocks])


def _module(modules: Mapping[str, nn.Module], name: str) -> nn.Module:
    for candidate in (name, PEFT_PREFIX + name):
        module = modules.get(candidate)
        if module is not None:
            return module.get_base_layer() if hasattr(module, "get_base_layer") else module
    raise ValueError(f"the model has no module {name!r}; was the adapter made for another model?")


def _shape(modules: Mapping[str, nn.Module], name: str) -> tuple[int, int]:
    """``(d_out, d_in)`` of a layer, also once a compressed layer dropped its dense weight."""
    for candidate in (name, PEFT_PREFIX + name):
        module = modules.get(candidate)
        if module is not None and hasattr(module, "basis_sharing_key"):
            return module.out_features, module.in_features
    out_f, in_f = weight_matrix(_module(modules, name)).shape
    return int(out_f), int(in_f)


def _check_rank(key: str, rank: int, d_in: int, d_out: int, n: int, ratio: float) -> None:
    limit = max_rank(d_in, d_out, n)
    if rank > limit:
        raise ValueError(
            f"rank {rank} of basis {key} ({n} x [{d_out}, {d_in}], ratio {ratio}) is above "
            f"min(d_in, n*d_out) = {limit}: the factorisation would store more than the dense "
            f"weights; lower group_ranks[{key!r}] or raise the ratio (role_ratios)"
        )
    if rank < 1:
        raise ValueError(
            f"ratio {ratio} leaves rank 0 for {key} ({n} x [{d_out}, {d_in}]); lower the ratio"
        )


def plan_from_config(model: nn.Module, config: BasisSharingConfig) -> dict[str, Group]:
    """Rebuild the groups of a saved config from the base model's shapes."""
    modules = dict(model.named_modules())
    members: dict[str, list[str]] = {}
    for name, key in config.layer_groups.items():
        members.setdefault(key, []).append(name)
    groups = {}
    for key, names in members.items():
        if key not in config.group_ranks:
            raise ValueError(f"saved config has no rank for basis {key!r} (group_ranks)")
        d_out, d_in = _shape(modules, names[0])
        role = linear_role(names[0]) or key.split("_")[0]
        rank = int(config.group_ranks[key])
        _check_rank(key, rank, d_in, d_out, len(names), config.ratio_of(role))
        groups[key] = Group(key, role, names, rank, d_in, d_out)
    return groups


@torch.no_grad()
def collect_input_stats(
    model: nn.Module,
    calibration: torch.Tensor,
    names: list[str] | None = None,
    batch_size: int = 8,
    dtype: torch.dtype = torch.float32,
    blocks: str | None = None,
    show_progress: bool = True,
) -> dict[str, InputStats]:
    """``X^T X`` at the input of each linear of the dense model, in one pass over the data.

    One pass (not block-by-block): Basis Sharing whitens with the statistics of the original
    model. ``names`` = module names (default: every decoder linear); keys are those names.
    """
    if not isinstance(calibration, torch.Tensor) or calibration.ndim != 2:
        raise ValueError(
            "calibration must be a [n_windows, seq_len] tensor of token ids, got "
            f"{getattr(calibration, 'shape', type(calibration).__name__)}"
        )
    if calibration.shape[0] == 0:
        raise ValueError("calibration has no windows; pass at least one window of token ids")
    linears = {_strip(n): m for block in _dense_linears(model, blocks) for n, m in block.items()}
    if names is not None:
        missing = [n for n in names if n not in linears]
        if missing:
            raise ValueError(f"no linear layer named {missing[:5]} in the decoder blocks")
        linears = {n: linears[n] for n in names}
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        with StatsCollector(linears, need_xtx=True, need_sq_norms=False, dtype=dtype) as stats:
            batches = calibration.split(batch_size)
            for batch in tqdm(batches, desc="basis sharing: X^T X", disable=not show_progress):
                model(input_ids=batch.to(device), use_cache=False)
    finally:
        model.train(was_training)
    all_reduce_stats(stats.stats)
    return stats.stats


def check_stats(groups: Mapping[str, Group], stats: Mapping[str, InputStats] | None) -> None:
    """Every compressed layer needs statistics before whitening starts."""
    if stats is None:
        raise ValueError(
            "whitening needs calibration data: pass calibration= (token windows) or stats= "
            "(from collect_input_stats), or set whitening=False for plain SVD"
        )
    missing = [m for g in groups.values() for m in g.members if m not in stats]
    if missing:
        raise ValueError(
            f"no calibration statistics for {len(missing)} layer(s), e.g. {missing[:5]}; "
            "collect them with collect_input_stats(model, windows)"
        )


def factorize(
    model: nn.Module,
    groups: Mapping[str, Group],
    stats: Mapping[str, InputStats] | None,
    config: BasisSharingConfig,
    show_progress: bool = True,
) -> dict[str, SharedFactors]:
    """Shared basis + coefficients of every group from the dense weights of ``model`` (one
    whitened SVD per group: the long step, shown with a progress bar and logged)."""
    if config.whitening:
        check_stats(groups, stats)
    modules = dict(model.named_modules())
    factors = {}
    logger.info("basis sharing: factorizing %d groups", len(groups))
    bar = tqdm(groups.items(), desc="basis sharing: SVD", disable=not show_progress)
    for key, group in bar:
        bar.set_postfix_str(key, refresh=False)
        weights = [weight_matrix(_module(modules, m)).detach() for m in group.members]
        whitening = None
        if config.whitening:
            xtx = sum(stats[m].xtx.to(torch.float64) for m in group.members)
            whitening = whitening_factor(xtx, config.damping)
        factor = shared_basis_svd(weights, group.rank, whitening)
        if config.whitening and config.layer_refit and len(weights) > 1:
            factor.coefficients = [
                refit_coefficients(w, factor.basis, stats[m].xtx)
                for w, m in zip(weights, group.members, strict=True)
            ]
        factors[key] = factor
    return factors


def parameter_counts(groups: Mapping[str, Group]) -> dict[str, int]:
    dense = sum(g.dense_params for g in groups.values())
    compressed = sum(g.compressed_params for g in groups.values())
    return {"dense": dense, "compressed": compressed, "removed": dense - compressed}


def num_blocks(model: nn.Module, blocks: str | None = None) -> int:
    return len(find_decoder_blocks(model, blocks))
