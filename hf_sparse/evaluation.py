"""Evaluation: perplexity (benchmark protocol v1), KL between two models, sparsity report."""

from __future__ import annotations

import contextlib
import json
import math
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from .masks import ParameterMasks
from .models import iter_linears, weight_matrix


@dataclass
class PerplexityResult:
    perplexity: float
    mean_nll: float
    predicted_tokens: int
    windows: int
    seconds: float

    def to_dict(self) -> dict:
        return asdict(self)


@torch.no_grad()
def perplexity(
    model: nn.Module, windows: torch.Tensor, batch_size: int = 4, show_progress: bool = True
) -> PerplexityResult:
    """Perplexity over ``[n, L]`` token windows: NLL summed over every predicted token
    (``L - 1`` per window, each window scored on its own) divided by their count.
    """
    if windows.ndim != 2 or windows.shape[1] < 2:
        raise ValueError(f"windows must be [n, L>=2] token ids, got {tuple(windows.shape)}")
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    start = time.perf_counter()
    total_nll = torch.zeros((), dtype=torch.float64)
    count = 0
    try:
        batches = windows.split(batch_size)
        for batch in tqdm(batches, desc="perplexity", disable=not show_progress):
            batch = batch.to(device)
            logits = model(input_ids=batch, use_cache=False).logits[:, :-1].float()
            targets = batch[:, 1:]
            nll = F.cross_entropy(
                logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="sum"
            )
            total_nll += nll.double().cpu()
            count += targets.numel()
    finally:
        model.train(was_training)
    mean = float(total_nll) / count
    return PerplexityResult(
        math.exp(mean), mean, count, windows.shape[0], time.perf_counter() - start
    )


@torch.no_grad()
def kl_divergence(
    reference: nn.Module, other: nn.Module, windows: torch.Tensor, batch_size: int = 4
) -> float:
    """Mean per-token KL(reference || other) of next-token distributions on ``windows``."""
    total, count = 0.0, 0
    device_ref = next(reference.parameters()).device
    device_other = next(other.parameters()).device
    for batch in windows.split(batch_size):
        log_p = F.log_softmax(reference(input_ids=batch.to(device_ref)).logits.float(), -1)
        log_q = F.log_softmax(other(input_ids=batch.to(device_other)).logits.float(), -1)
        kl = (log_p.exp() * (log_p - log_q.to(log_p.device))).sum(-1)
        total += float(kl.sum())
        count += kl.numel()
    return total / count


@dataclass
class LayerSparsity:
    name: str
    shape: tuple[int, ...]
    zeros: int
    total: int

    @property
    def sparsity(self) -> float:
        return self.zeros / self.total if self.total else 0.0


def sparsity_report(model: nn.Module, names: list[str] | None = None) -> list[LayerSparsity]:
    """Zero count of each linear weight (those in ``names``, or every linear layer; stacked MoE
    experts one row per expert, ``...experts.down_proj.3``)."""
    wanted = set(names) if names is not None else None
    report = []
    for name, module in iter_linears(model):
        if wanted is not None and name not in wanted:
            continue
        weight = weight_matrix(module)
        report.append(
            LayerSparsity(name, tuple(weight.shape), int((weight == 0).sum()), weight.numel())
        )
    return report


def overall_sparsity(report: list[LayerSparsity]) -> float:
    total = sum(r.total for r in report)
    return sum(r.zeros for r in report) / total if total else 0.0


def format_sparsity_report(report: list[LayerSparsity]) -> str:
    width = max((len(r.name) for r in report), default=10)
    lines = [f"{'layer':<{width}}  {'shape':>12}  sparsity"]
    lines += [
        f"{r.name:<{width}}  {'x'.join(map(str, r.shape)):>12}  {r.sparsity:8.2%}" for r in report
    ]
    lines.append(f"{'overall':<{width}}  {'':>12}  {overall_sparsity(report):8.2%}")
    return "\n".join(lines)


@contextlib.contextmanager
def masked_weights_zeroed(model: nn.Module, masks) -> Iterator[None]:
    """Inside the block, the masked (True) entries of ``masks`` are zero; restored exactly after."""
    masks = masks if isinstance(masks, ParameterMasks) else ParameterMasks(masks)
    masks.check_against(model)  # names and shapes, before any weight changes
    params = dict(model.named_parameters())
    saved = {}
    try:
        with torch.no_grad():
            for name, mask in masks.items():
                param = params[name]
                mask = mask.to(param.device)
                saved[name] = (mask, param[mask].clone())
                param.masked_fill_(mask, 0)
        yield
    finally:
        with torch.no_grad():
            for name, (mask, values) in saved.items():
                params[name][mask] = values


@torch.no_grad()
def compare_generations_with_mask(
    model: nn.Module, tokenizer, prompts: list[str], masks, max_new_tokens: int = 32
) -> list[dict[str, str]]:
    """Greedy continuations of each prompt with the model as is and with the masked weights
    zeroed, side by side: ``[{"prompt", "original", "masked"}]``. Weights are restored after.
    """
    if not prompts:
        raise ValueError("prompts is empty: give at least one prompt to generate from")
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()

    def generate() -> list[str]:
        texts = []
        for prompt in prompts:
            ids = tokenizer(prompt, return_tensors="pt").input_ids.to(device)
            out = model.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id,
            )
            texts.append(tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True))
        return texts

    try:
        original = generate()
        with masked_weights_zeroed(model, masks):
            masked = generate()
    finally:
        model.train(was_training)
    return [
        {"prompt": p, "original": o, "masked": m}
        for p, o, m in zip(prompts, original, masked, strict=True)
    ]


@dataclass
class EvalSettings:
    """What ``evaluate_output`` measures (the ``hf-sparse eval`` flags)."""

    dataset: str = "wikitext2"  # perplexity text: a named set or a local file
    sequence_length: int = 512  # tokens per window (protocol v1)
    num_windows: int | None = 32  # the first N non-overlapping windows (None: all)
    batch_size: int = 4  # windows per forward pass
    tasks: tuple[str, ...] = ()  # lm-eval tasks on the local task files (lambada, hellaswag)
    limit: int | None = 500  # examples per lm-eval task (None: all)
    layers: bool = False  # also report each linear layer's sparsity (models, not adapters)

    def check(self) -> None:
        from .data import check_batch_size, check_data_source

        check_batch_size(self.batch_size, "--batch-size")
        check_batch_size(self.sequence_length, "--sequence-length")
        if self.num_windows is not None:
            check_batch_size(self.num_windows, "--num-windows")
        if self.limit is not None:
            check_batch_size(self.limit, "--limit")
        check_data_source(self.dataset)
        if self.tasks:
            from .analysis.downstream import resolve_task_file

            for task in self.tasks:
                resolve_task_file(task)


def evaluate_output(
    path: str, settings: EvalSettings | None = None, base: str | None = None
) -> dict:
    """Perplexity (and lm-eval tasks) of any output kind, loaded with ``load_output``: an
    adapter folder is evaluated with its adapter applied. Inputs are checked (flags, data, the
    sequence length against the model's positions) before any weight is loaded."""
    from .data import check_sequence_length, evaluation_windows
    from .loading import inspect_output, known_provenance
    from .real_model import MARKER

    settings = settings or EvalSettings()
    settings.check()
    plan = inspect_output(path, base)
    check_sequence_length(plan.config, settings.sequence_length, "--sequence-length")
    model, tokenizer = plan.load()
    windows = evaluation_windows(
        tokenizer, settings.dataset, settings.sequence_length, settings.num_windows
    )
    summary: dict = {"model": str(path), "kind": plan.kind}
    if plan.path != str(path):
        summary["loaded_from"] = plan.path  # a known name or offline Hub id: the local copy
    if plan.base is not None:
        summary["base"] = plan.base_name or plan.base
        summary["base_loaded_from"] = plan.base
        summary["peft_type"] = plan.extra.get("peft_type")
    weights = Path(plan.base or plan.path)
    if (weights / MARKER).is_file():  # our converted copy of a known model, not the Hub's
        known = json.loads((weights / MARKER).read_text()).get("name")
        summary["provenance"] = known_provenance(known) or f"converted copy at {weights}"
    summary.update(perplexity(model, windows, settings.batch_size).to_dict())
    if plan.kind != "adapter":  # an adapter's layers are not plain linears
        report = sparsity_report(model)
        summary["linear_sparsity"] = overall_sparsity(report)
        if settings.layers:
            summary["layers"] = [asdict(r) for r in report]
    if settings.tasks:
        import sys

        from .analysis.downstream import downstream_eval

        with contextlib.redirect_stdout(sys.stderr):  # lm-eval prints progress on stdout
            summary["tasks"] = downstream_eval(
                model, tokenizer, settings.tasks, settings.limit, batch_size=settings.batch_size
            )
    return summary
