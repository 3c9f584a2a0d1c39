"""Importance metrics: one score per parameter entry, registered by name.

Each metric is ``fn(model, samples, params, show_progress, **options) -> {name: float32 scores}``
with scores in the parameter's stored shape. Gradient metrics run one sample at a time and add
into float32 buffers, so per-sample gradients of the whole model never coexist; the sums (and
the activation statistics of ``wanda`` / ``obs``) are all-reduced over ranks when
``torch.distributed`` is initialised, unless inside ``per_rank_scores()``.

- ``magnitude``: ``|w|``.
- ``gradient``: ``|g|`` of the mean loss over samples (sum of per-sample gradients / n).
  Inside ``loss_chunks(n)`` the three gradient metrics compute each sample's loss gradient
  over ``n``-token chunks (``hf_sparse.importance.chunked``): same result, bounded memory.
- ``grad_x_weight``: ``|g * w|`` (first-order Taylor estimate of the loss change on removal).
- ``fisher``: ``mean_s g_s^2``, the empirical Fisher diagonal.
- ``hutchinson``: ``|E_z[z * Hz]|`` with Rademacher ``z``, the Hessian diagonal estimate of
  Hutchinson (1990) / Bekas et al. (2007), ``probes`` per sample, by double backward.
- ``wanda``: ``|W_ij| * ||X_j||`` (Sun et al., "A Simple and Effective Pruning Approach for
  LLMs", 2023), linear layers only.
- ``obs``: ``w_ij^2 / [H^-1]_jj`` with ``H = X^T X / n`` damped (Hassibi & Stork, "Optimal
  Brain Surgeon", 1993; the SparseGPT saliency), linear layers only.

Stacked MoE expert weights ``[E, out, in]`` are scored one expert at a time by ``wanda`` and
``obs``, each from the tokens routed to it; an expert no token reached scores 0 everywhere (its
weights changed no output on these samples), with a warning.
"""

from __future__ import annotations

import contextlib
import contextvars
import inspect
import logging
import zlib
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.nn.attention
from torch import nn
from tqdm.auto import tqdm

from ..calibration import StatsCollector, all_reduce_stats
from ..linalg import damped_inverse_cholesky
from ..models import ExpertLinear, expert_linears, experts_layout, is_linear, weight_matrix
from .chunked import chunked_loss_gradients, current_chunk_size
from .core import wanda_scores
from .distributed import all_reduce_, sum_across_ranks
from .samples import as_samples, check_samples
from .selection import select_parameters

logger = logging.getLogger(__name__)

Scores = dict[str, torch.Tensor]
Metric = Callable[..., Scores]
IMPORTANCE_METRICS: dict[str, Metric] = {}
_REDUCE_ACROSS_RANKS = contextvars.ContextVar("reduce_across_ranks", default=True)


def register_metric(name: str) -> Callable[[Metric], Metric]:
    def decorate(fn: Metric) -> Metric:
        IMPORTANCE_METRICS[name] = fn
        return fn

    return decorate


@contextlib.contextmanager
def per_rank_scores() -> Iterator[None]:
    """Inside, metrics score this rank's samples only (no all-reduce): for callers that score
    one sample at a time and combine the per-sample results across ranks themselves (golden
    masks, the reverse search), so ranks need not hold the same number of samples.
    """
    token = _REDUCE_ACROSS_RANKS.set(False)
    try:
        yield
    finally:
        _REDUCE_ACROSS_RANKS.reset(token)


@contextlib.contextmanager
def _grad_only_for(model: nn.Module, params: dict[str, nn.Parameter]) -> Iterator[None]:
    """Gradients for ``params`` only, eval mode; flags, mode and ``.grad`` restored after."""
    flags = {p: p.requires_grad for p in model.parameters()}
    grads = {p: p.grad for p in model.parameters()}
    was_training = model.training
    try:
        for p in model.parameters():
            p.requires_grad_(False)
            p.grad = None
        for p in params.values():
            p.requires_grad_(True)
        model.eval()
        yield
    finally:
        for p, flag in flags.items():
            p.requires_grad_(flag)
            p.grad = grads[p]
        model.train(was_training)


def _loss(model: nn.Module, sample: dict[str, torch.Tensor]) -> torch.Tensor:
    device = next(model.parameters()).device
    out = model(
        input_ids=sample["input_ids"].to(device),
        labels=sample["labels"].to(device),
        use_cache=False,
    )
    return out.loss.float()


def _all_reduce(buffers: Scores, count: int) -> int:
    """Sum ``buffers`` and ``count`` over ranks (unless inside ``per_rank_scores``)."""
    if not _REDUCE_ACROSS_RANKS.get():
        return count
    device = next(iter(buffers.values())).device
    all_reduce_(buffers, torch.distributed.ReduceOp.SUM, device)
    return int(sum_across_ranks(count, device))


def _zeros(params: dict[str, nn.Parameter]) -> Scores:
    return {
        n: torch.zeros(p.shape, dtype=torch.float32, device=p.device) for n, p in params.items()
    }


def _per_sample_gradients(model, samples, params, show_progress, desc):
    """Yield each sample's gradients ``{name: float32 grad}`` (one sample alive at a time)."""
    with _grad_only_for(model, params):
        for sample in tqdm(samples, desc=desc, disable=not show_progress):
            tensors = list(params.values())
            chunk = current_chunk_size()
            if chunk is None:
                grads = torch.autograd.grad(_loss(model, sample), tensors, allow_unused=True)
            else:
                grads = chunked_loss_gradients(model, sample, tensors, chunk)
            yield {
                n: torch.zeros_like(p, dtype=torch.float32) if g is None else g.float()
                for (n, p), g in zip(params.items(), grads, strict=True)
            }


def _mean_gradient(model, samples, params, show_progress) -> Scores:
    total = _zeros(params)
    for grads in _per_sample_gradients(model, samples, params, show_progress, "gradient"):
        for name, grad in grads.items():
            total[name] += grad
    count = _all_reduce(total, len(samples))
    return {n: t / count for n, t in total.items()}


@register_metric("magnitude")
def magnitude(model, samples, params, show_progress=True) -> Scores:
    return {n: p.detach().abs().float() for n, p in params.items()}


@register_metric("gradient")
def gradient(model, samples, params, show_progress=True) -> Scores:
    return {n: g.abs() for n, g in _mean_gradient(model, samples, params, show_progress).items()}


@register_metric("grad_x_weight")
def grad_x_weight(model, samples, params, show_progress=True) -> Scores:
    mean = _mean_gradient(model, samples, params, show_progress)
    return {n: (g * params[n].detach().float()).abs() for n, g in mean.items()}


@register_metric("fisher")
def fisher(model, samples, params, show_progress=True) -> Scores:
    total = _zeros(params)
    for grads in _per_sample_gradients(model, samples, params, show_progress, "fisher"):
        for name, grad in grads.items():
            total[name] += grad.square()
    count = _all_reduce(total, len(samples))
    return {n: t / count for n, t in total.items()}


@register_metric("hutchinson")
def hutchinson(model, samples, params, show_progress=True, probes: int = 4, seed: int = 0):
    if not isinstance(probes, int) or probes < 1:
        raise ValueError(f"probes must be a positive integer, got {probes!r}")
    total = _zeros(params)
    tensors = list(params.values())
    # Fused SDPA kernels have no double backward; the math kernel does (same results).
    math_attention = torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.MATH)
    with _grad_only_for(model, params), math_attention:
        for sample in tqdm(samples, desc="hutchinson", disable=not show_progress):
            # Probes seeded by the sample's tokens: the same sample gets the same probes on
            # whichever rank (and in whichever order) it is processed.
            tokens = sample["input_ids"].reshape(-1).cpu().numpy().tobytes()
            generator = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(tokens))
            grads = torch.autograd.grad(_loss(model, sample), tensors, create_graph=True)
            for probe in range(probes):
                z = [
                    (torch.randint(0, 2, p.shape, generator=generator) * 2 - 1).to(p)
                    for p in tensors
                ]
                hz = torch.autograd.grad(grads, tensors, z, retain_graph=probe < probes - 1)
                for name, zi, hzi in zip(params, z, hz, strict=True):
                    total[name] += zi.float() * hzi.float()
            del grads
    count = _all_reduce(total, len(samples) * probes)
    return {n: (t / count).abs() for n, t in total.items()}


Owner = nn.Module | dict[str, ExpertLinear]  # a linear layer, or the views of stacked experts


def _linear_owners(model: nn.Module, params: dict[str, nn.Parameter], metric: str):
    """``{parameter name: its linear layer}``; a stacked expert parameter maps to its per-expert
    views ``{"<parameter>.<e>": ExpertLinear}``."""
    modules = dict(model.named_modules())
    owners: dict[str, Owner] = {}
    for name in params:
        owner_name, _, leaf = name.rpartition(".")
        owner = modules.get(owner_name)
        if owner is not None and leaf in (experts_layout(owner) or ()):
            views = expert_linears(owner_name, owner)
            owners[name] = {n: v for n, v in views.items() if v.param == leaf}
            continue
        if leaf != "weight" or owner is None or not is_linear(owner):
            raise ValueError(
                f"metric {metric!r} scores linear-layer weights only (it needs their inputs); "
                f"{name!r} is not one. Choose params= among linear layers (e.g. roles q, up)."
            )
        owners[name] = owner
    return owners


def _flat(owners: dict[str, Owner]) -> dict[str, nn.Module]:
    flat: dict[str, nn.Module] = {}
    for name, owner in owners.items():
        flat.update(owner if isinstance(owner, dict) else {name: owner})
    return flat


def _input_stats(model, samples, owners, need_xtx: bool, show_progress: bool):
    collector = StatsCollector(_flat(owners), need_xtx=need_xtx, need_sq_norms=not need_xtx)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), collector:
            for sample in tqdm(samples, desc="activations", disable=not show_progress):
                model(input_ids=sample["input_ids"].to(device), use_cache=False)
    finally:
        model.train(was_training)
    collector.fill_missing()  # before the all-reduce: every rank reduces the same tensors
    if _REDUCE_ACROSS_RANKS.get():
        all_reduce_stats(collector.stats)
    unseen = [n for n, item in collector.stats.items() if item.tokens == 0]
    if unseen:
        logger.warning(
            "no input reached %d layer(s), e.g. %s: they score 0", len(unseen), unseen[:3]
        )
    return collector.stats


def _stored_layout(scores: torch.Tensor, module: nn.Module) -> torch.Tensor:
    """Scores computed on ``[out, in]`` back into the layout of ``module.weight``.

    ``weight_matrix`` hands back the parameter itself unless the layer stores the transpose
    (GPT-2 ``Conv1D``); comparing shapes instead would miss square ``Conv1D`` weights.
    """
    return scores if weight_matrix(module) is module.weight else scores.t().contiguous()


def _per_matrix(owners: dict[str, Owner], score: Callable[[str, nn.Module], torch.Tensor]):
    """``score(name, linear)`` on ``[out, in]`` for every owner, back in the stored layout
    (stacked experts: ``[E, out, in]``, or ``[E, in, out]`` when stored transposed)."""
    scores: Scores = {}
    for name, owner in owners.items():
        if not isinstance(owner, dict):
            scores[name] = _stored_layout(score(name, owner), owner)
            continue
        stacked = torch.stack([score(n, view) for n, view in owner.items()])
        transposed = next(iter(owner.values())).experts.is_transposed
        scores[name] = stacked.transpose(1, 2).contiguous() if transposed else stacked
    return scores


@register_metric("wanda")
def wanda(model, samples, params, show_progress=True) -> Scores:
    owners = _linear_owners(model, params, "wanda")
    stats = _input_stats(model, samples, owners, need_xtx=False, show_progress=show_progress)
    return _per_matrix(owners, lambda n, m: wanda_scores(weight_matrix(m), stats[n].sq_norms))


@register_metric("obs")
def obs(model, samples, params, show_progress=True, damp: float = 0.01) -> Scores:
    if isinstance(damp, bool) or not isinstance(damp, int | float) or not damp > 0:
        raise ValueError(f"damp must be a positive number (0.01 = 1% of mean diag H), got {damp!r}")
    owners = _linear_owners(model, params, "obs")
    stats = _input_stats(model, samples, owners, need_xtx=True, show_progress=show_progress)
    inverse_diag: dict[int, torch.Tensor] = {}

    def saliency(name: str, module: nn.Module) -> torch.Tensor:
        item = stats[name]
        weight = weight_matrix(module).detach().float()
        if item.tokens == 0:
            return torch.zeros_like(weight)
        if id(item) not in inverse_diag:  # q/k/v (gate/up) share one input and one inverse
            # float64: activation outliers make H ill-conditioned for a float32 inverse.
            upper = damped_inverse_cholesky(item.hessian.double(), damp)
            diagonal = upper.square().sum(0)  # diag(U^T U) = diag(H^-1)
            inverse_diag[id(item)] = diagonal.float()
        return weight.square() / inverse_diag[id(item)].unsqueeze(0)

    return _per_matrix(owners, saliency)


def check_metric_options(metric: str, options: dict[str, Any]) -> None:
    """Unknown metric or option names -> ValueError listing the valid ones (before work)."""
    if metric not in IMPORTANCE_METRICS:
        raise ValueError(f"unknown metric {metric!r}; valid metrics: {sorted(IMPORTANCE_METRICS)}")
    fixed = {"model", "samples", "params", "show_progress"}
    accepted = set(inspect.signature(IMPORTANCE_METRICS[metric]).parameters) - fixed
    unknown = sorted(set(options) - accepted)
    if unknown:
        raise ValueError(
            f"unknown option(s) {unknown} for metric {metric!r}; it accepts {sorted(accepted)}"
        )


def compute_importance(
    model: nn.Module,
    batches: Any,
    metric: str = "gradient",
    params: list[str] | str | None = None,
    show_progress: bool = True,
    blocks: str | None = None,
    **options: Any,
) -> Scores:
    """Per-parameter float32 scores of ``metric`` on ``batches`` (see the module docstring).

    ``batches``: a ``[n, L]`` token tensor (labels = inputs) or an iterable of dicts with
    ``input_ids`` and optional ``labels`` (-100 = no loss) / ``attention_mask``. ``params``:
    see ``select_parameters`` (default: the weights of every decoder-block linear).
    ``blocks``: the dotted path or ``re:`` pattern of the decoder-block ModuleList (None =
    found from the model's ``_no_split_modules``).
    """
    check_metric_options(metric, options)
    fn = IMPORTANCE_METRICS[metric]
    samples = as_samples(batches) if metric != "magnitude" or batches is not None else []
    check_samples(samples, model)
    selected = select_parameters(model, params, blocks)
    logger.info("scoring %d tensors with %s on %d samples", len(selected), metric, len(samples))
    scores = fn(model, samples, selected, show_progress, **options)
    return {n: s.detach().float() for n, s in scores.items()}
