"""The SPD objective on a decomposed model: one target pass, gates, masked passes, four losses.

Bushnaq, Braun, Sharkey et al., "Stochastic Parameter Decomposition" (2025), eq. 7:
``L = b_F L_faith + b_S L_stoch-recon + b_L L_stoch-recon-layerwise + b_I L_importance``.
The maths lives in ``core.py``; this module only decides which layers run in which mode.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..models import UnsupportedArchitectureError, find_decoder_blocks
from .config import SPDLossConfig
from .core import (
    faithfulness_loss,
    importance_minimality_loss,
    recon_loss,
    stochastic_mask,
)
from .layer import SPDLayer, SPDRuntime
from .model import spd_layers, spd_runtime


def model_output(model: nn.Module, inputs: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """Run ``model(**inputs)``; the logits of a transformers output, or the tensor itself."""
    out = model(**inputs)
    return out.logits if hasattr(out, "logits") else out


@dataclass
class PrefixReplay:
    """Skip the decoder blocks before the first decomposed one in the masked passes.

    They compute the same activations in every pass of a step, so the target pass records
    what the last of them returns and the masked passes replay it (exact, and on an LM whose
    decomposed layers sit late, most of the cost of a pass).
    """

    blocks: list[nn.Module]
    output: Any = None

    @contextlib.contextmanager
    def capture(self) -> Iterator[None]:
        def keep(module: nn.Module, args: Any, output: Any) -> None:
            self.output = output

        handle = self.blocks[-1].register_forward_hook(keep)
        try:
            yield
        finally:
            handle.remove()

    @contextlib.contextmanager
    def replay(self) -> Iterator[None]:
        if self.output is None:
            raise RuntimeError("PrefixReplay.replay before a captured target pass")
        output = self.output
        for block in self.blocks:
            block.forward = lambda *args, **kwargs: output  # the next block is replayed too
        try:
            yield
        finally:
            for block in self.blocks:
                block.__dict__.pop("forward", None)


def prefix_replay(model: nn.Module, blocks_path: str | None = None) -> PrefixReplay | None:
    """A replay of the blocks before the first decomposed layer, or None (toy models, an
    unknown architecture, or a decomposed layer in the first block / outside the blocks).
    ``blocks_path``: where the decoder blocks are; given, a wrong path is an error."""
    try:
        blocks = find_decoder_blocks(model, blocks_path)
    except UnsupportedArchitectureError:
        if blocks_path is not None:
            raise
        return None  # only a shortcut: every pass then runs the whole model
    first = len(blocks)
    for name, module in model.named_modules():
        if not isinstance(module, SPDLayer):
            continue
        owner = [i for i, (block, _) in enumerate(blocks) if name.startswith(block + ".")]
        first = min(first, owner[0] if owner else 0)
    if first == 0 or first == len(blocks):
        return None
    return PrefixReplay([block for _, block in blocks[:first]])


@dataclass
class TargetPass:
    """The frozen model's output and each decomposed layer's input on one batch."""

    output: torch.Tensor
    layer_inputs: dict[str, torch.Tensor]
    prefix: PrefixReplay | None = None

    def replay(self) -> contextlib.AbstractContextManager:
        return self.prefix.replay() if self.prefix is not None else contextlib.nullcontext()


def target_pass(
    model: nn.Module,
    inputs: Mapping[str, torch.Tensor],
    reuse_prefix: bool = True,
    blocks: str | None = None,
) -> TargetPass:
    """Run the frozen target, keeping each decomposed layer's input (and, for LMs, what the
    undecomposed first blocks return, so later passes can skip them; ``blocks``: the dotted
    path or ``re:`` pattern of the decoder-block ModuleList, None = found from the model)."""
    layers = spd_layers(model)
    runtimes = {name: SPDRuntime(mode="target", capture=True) for name in layers}
    prefix = prefix_replay(model, blocks) if reuse_prefix else None
    capture = prefix.capture() if prefix is not None else contextlib.nullcontext()
    with torch.no_grad(), spd_runtime(model, runtimes), capture:
        output = model_output(model, inputs)
    return TargetPass(output, {name: rt.captured for name, rt in runtimes.items()}, prefix)


def layer_importances(
    layers: Mapping[str, SPDLayer], layer_inputs: Mapping[str, torch.Tensor]
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """``(g_lower, g_upper)`` per layer name, ``[..., C]`` each."""
    lower, upper = {}, {}
    for name, layer in layers.items():
        lower[name], upper[name] = layer.causal_importance(layer_inputs[name])
    return lower, upper


@dataclass
class SPDLossResult:
    total: torch.Tensor
    terms: dict[str, float] = field(default_factory=dict)
    ci_lower: dict[str, torch.Tensor] = field(default_factory=dict)


def _masked_runtimes(
    names: list[str], ci_lower: Mapping[str, torch.Tensor], generator: torch.Generator | None
) -> dict[str, SPDRuntime]:
    runtimes = {}
    for name in names:
        ci = ci_lower[name]
        delta_mask = torch.rand(
            ci.shape[:-1], generator=generator, dtype=ci.dtype, device=ci.device
        )
        runtimes[name] = SPDRuntime(
            mode="masked", mask=stochastic_mask(ci, generator), delta_mask=delta_mask
        )
    return runtimes


def spd_loss(
    model: nn.Module,
    inputs: Mapping[str, torch.Tensor],
    config: SPDLossConfig,
    importance_coeff: float | None = None,
    generator: torch.Generator | None = None,
    blocks: str | None = None,
) -> SPDLossResult:
    """The SPD loss of ``model`` (a decomposed model) on one batch.

    ``importance_coeff`` overrides ``config.importance_minimality_coeff`` (for schedules).
    ``inputs`` are the model's keyword arguments (``{"x": ...}`` for toy models,
    ``{"input_ids": ..., "attention_mask": ...}`` for language models).
    """
    layers = spd_layers(model)
    if not layers:
        raise ValueError("the model has no SPD layers; wrap it with get_spd_model first")
    names = list(layers)
    target = target_pass(model, inputs, blocks=blocks)
    ci_lower, ci_upper = layer_importances(layers, target.layer_inputs)
    attention = inputs.get("attention_mask") if config.output_loss == "kl" else None

    def recon(runtimes: dict[str, SPDRuntime]) -> torch.Tensor:
        with spd_runtime(model, runtimes), target.replay():
            output = model_output(model, inputs)
        return recon_loss(config.output_loss, output, target.output, attention)

    coeff = config.importance_minimality_coeff if importance_coeff is None else importance_coeff
    terms: dict[str, torch.Tensor] = {}
    total = torch.zeros((), device=target.output.device)
    if config.faithfulness_coeff > 0:
        comps = [layer.components() for layer in layers.values()]
        terms["faithfulness"] = faithfulness_loss(
            [layer.target_weight() for layer in layers.values()],
            [u for u, _ in comps],
            [v for _, v in comps],
        )
        total = total + config.faithfulness_coeff * terms["faithfulness"]
    n = config.n_mask_samples
    if config.stochastic_recon_coeff > 0:
        value = sum(recon(_masked_runtimes(names, ci_lower, generator)) for _ in range(n)) / n
        terms["stochastic_recon"] = value
        total = total + config.stochastic_recon_coeff * value
    if config.stochastic_recon_layerwise_coeff > 0:
        value = 0.0
        for _ in range(n):
            for name in names:
                value = value + recon(_masked_runtimes([name], ci_lower, generator))
        value = value / (n * len(names))
        terms["stochastic_recon_layerwise"] = value
        total = total + config.stochastic_recon_layerwise_coeff * value
    terms["importance_minimality"] = importance_minimality_loss(
        list(ci_upper.values()), config.pnorm
    )
    total = total + coeff * terms["importance_minimality"]
    floats = {key: float(value.detach()) for key, value in terms.items()}
    floats["importance_minimality_coeff"] = float(coeff)
    with torch.no_grad():
        for name, ci in ci_lower.items():
            l0 = (ci > config.ci_alive_threshold).float().sum(-1).mean()
            floats[f"ci_l0/{name}"] = float(l0)
    return SPDLossResult(total, floats, {k: v.detach() for k, v in ci_lower.items()})


def faithfulness_warmup_(
    model: nn.Module, steps: int, lr: float = 0.01, weight_decay: float = 0.1
) -> float:
    """Train ``U, V`` alone so that ``UV`` approaches ``W`` (SPD's warm-up); returns the last
    faithfulness loss. Gates are untouched."""
    layers = spd_layers(model)
    if steps <= 0 or not layers:
        return float("nan")
    params = [p for layer in layers.values() for p in layer.component_parameters()]
    weights = [layer.target_weight().detach() for layer in layers.values()]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    loss = torch.tensor(float("nan"))
    for _ in range(steps):
        comps = [layer.components() for layer in layers.values()]  # tied ones: fresh views
        loss = faithfulness_loss(weights, [u for u, _ in comps], [v for _, v in comps])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return float(loss.detach())
