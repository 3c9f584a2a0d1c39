"""Memory-bounded gradients of one sample's loss: the output head and the cross-entropy run
over ``chunk_size`` positions at a time, so the ``[tokens, vocabulary]`` logits of a long
sample never exist at once (for SmolLM2 a 2,048-token sample's float32 logits take 400 MB).

The backbone runs once; each chunk's loss (summed, divided by the sample's count of labelled
tokens, as the model's mean loss) is backpropagated to the hidden states and the head, and
the hidden states' accumulated gradient is then backpropagated through the backbone once. The
result equals the gradient of the unchunked mean loss (up to float rounding).
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

CHUNKED_METRICS = ("gradient", "grad_x_weight", "fisher")  # those whose gradient is chunked
_LOSS_CHUNK = contextvars.ContextVar("loss_chunk", default=None)
# Config keys of models whose logits are more than lm_head(hidden): chunking would be wrong.
_LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling")


def check_chunk_size(chunk_size: int | None) -> None:
    if chunk_size is None:
        return
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(
            f"chunk_size must be a positive number of tokens (or None = whole samples), "
            f"got {chunk_size!r}"
        )


@contextlib.contextmanager
def loss_chunks(chunk_size: int | None) -> Iterator[None]:
    """Inside, gradient metrics (``gradient``, ``grad_x_weight``, ``fisher``) compute each
    sample's gradient over ``chunk_size``-token chunks of its loss (None: whole samples)."""
    check_chunk_size(chunk_size)
    token = _LOSS_CHUNK.set(chunk_size)
    try:
        yield
    finally:
        _LOSS_CHUNK.reset(token)


def current_chunk_size() -> int | None:
    return _LOSS_CHUNK.get()


def _head_and_backbone(model: nn.Module) -> tuple[nn.Module, nn.Module]:
    config = getattr(model, "config", None)
    transforms = [k for k in _LOGIT_TRANSFORMS if getattr(config, k, None) not in (None, 1, 1.0)]
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    backbone = getattr(model, "base_model", None)
    if transforms or head is None or backbone is None or backbone is model:
        why = f"transforms its logits ({transforms})" if transforms else "has no separate head"
        raise ValueError(
            "chunk_size needs a causal LM whose logits are lm_head(hidden states); "
            f"{type(model).__name__} {why}: set chunk_size: null"
        )
    return head, backbone


def chunked_loss_gradients(
    model: nn.Module,
    sample: dict[str, torch.Tensor],
    tensors: Sequence[torch.Tensor],
    chunk_size: int,
) -> list[torch.Tensor | None]:
    """``torch.autograd.grad(mean loss, tensors, allow_unused=True)`` computed chunk by chunk."""
    head, backbone = _head_and_backbone(model)
    device = next(model.parameters()).device
    ids = sample["input_ids"].to(device)
    labels = sample["labels"].to(device)[:, 1:]
    labelled = int((labels != -100).sum())
    if labelled == 0:
        raise ValueError("a sample has no labelled token (all labels are -100): nothing to score")
    output = backbone(input_ids=ids, use_cache=False)
    if getattr(output, "last_hidden_state", None) is None:
        raise ValueError(
            f"chunk_size needs the backbone's hidden states, but {type(backbone).__name__} "
            "returns no last_hidden_state (a wrapped model?): score the unwrapped causal LM or "
            "set chunk_size: null"
        )
    hidden = output.last_hidden_state[:, :-1]
    detached = hidden.detach().requires_grad_(True)
    hidden_grad = torch.zeros_like(detached)
    totals: list[torch.Tensor | None] = [None] * len(tensors)
    for start in range(0, detached.shape[1], chunk_size):
        part = slice(start, start + chunk_size)
        logits = head(detached[:, part]).float()
        loss = (
            F.cross_entropy(
                logits.reshape(-1, logits.shape[-1]),
                labels[:, part].reshape(-1),
                ignore_index=-100,
                reduction="sum",
            )
            / labelled
        )
        grads = torch.autograd.grad(loss, [detached, *tensors], allow_unused=True)
        hidden_grad += grads[0]
        totals = [_add(t, g) for t, g in zip(totals, grads[1:], strict=True)]
    through = torch.autograd.grad(hidden, list(tensors), hidden_grad, allow_unused=True)
    return [_add(t, g) for t, g in zip(totals, through, strict=True)]


def _add(total: torch.Tensor | None, grad: torch.Tensor | None) -> torch.Tensor | None:
    if grad is None:
        return total
    return grad if total is None else total + grad
