"""The exact Hessian diagonal of the loss, for targets small enough: ``hessian_diag``.

``d^2 L / d w_i^2`` for every scored entry ``i``, from Hessian-vector products with one-hot
vectors (``H e_i``, whose ``i``-th entry is the diagonal element), ``chunk`` of them per
batched double backward (``torch.autograd.grad(..., is_grads_batched=True)``). The cost is one
Hessian-vector product per entry and sample, so the metric refuses targets above
``max_entries``; it is the reference that Hutchinson's estimate (``hutchinson``) approximates
with a few random probes. Scores are ``|mean over samples of the diagonal|``, like
``hutchinson``'s.
"""

from __future__ import annotations

import torch
import torch.nn.attention
from tqdm.auto import tqdm

from .metrics import _all_reduce, _grad_only_for, _loss, _zeros, register_metric


def _one_hot_batch(shapes, offsets, positions: torch.Tensor, like) -> list[torch.Tensor]:
    """Per tensor a ``[len(positions), *shape]`` batch: row ``b`` is one-hot at ``positions[b]``
    (a flat index over all tensors together) when it falls in that tensor, else zero."""
    batch = []
    for (start, shape), tensor in zip(zip(offsets, shapes, strict=True), like, strict=True):
        numel = int(torch.Size(shape).numel())
        out = torch.zeros(len(positions), numel, dtype=tensor.dtype, device=tensor.device)
        inside = (positions >= start) & (positions < start + numel)
        rows = inside.nonzero().squeeze(1)
        out[rows, (positions[rows] - start)] = 1.0
        batch.append(out.reshape(len(positions), *shape))
    return batch


@register_metric("hessian_diag")
def hessian_diag(model, samples, params, show_progress=True, chunk: int = 64, max_entries=50_000):
    for name, value in (("chunk", chunk), ("max_entries", max_entries)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    total_entries = sum(p.numel() for p in params.values())
    if total_entries > max_entries:
        raise ValueError(
            f"hessian_diag needs one Hessian-vector product per entry: the {len(params)} "
            f"selected tensors hold {total_entries:,} entries, above max_entries={max_entries:,}; "
            "select fewer parameters (params=...), raise max_entries, or use 'hutchinson'"
        )
    totals = _zeros(params)
    tensors = list(params.values())
    shapes = [p.shape for p in tensors]
    offsets, start = [], 0
    for p in tensors:
        offsets.append(start)
        start += p.numel()
    math_attention = torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.MATH)
    with _grad_only_for(model, params), math_attention:
        for sample in tqdm(samples, desc="hessian diagonal", disable=not show_progress):
            grads = torch.autograd.grad(_loss(model, sample), tensors, create_graph=True)
            diagonal = torch.zeros(total_entries, dtype=torch.float64)
            for first in range(0, total_entries, chunk):
                positions = torch.arange(first, min(first + chunk, total_entries))
                probes = _one_hot_batch(shapes, offsets, positions, tensors)
                products = torch.autograd.grad(
                    grads, tensors, probes, retain_graph=True, is_grads_batched=True
                )
                flat = torch.cat([h.reshape(len(positions), -1) for h in products], dim=1)
                diagonal[positions] = flat[torch.arange(len(positions)), positions].double().cpu()
            del grads
            for (name, p), offset in zip(params.items(), offsets, strict=True):
                part = diagonal[offset : offset + p.numel()].reshape(p.shape)
                totals[name] += part.to(totals[name].device, torch.float32)
    count = _all_reduce(totals, len(samples))
    return {n: (t / count).abs() for n, t in totals.items()}
