"""Toy models with known ground truth, trained locally in seconds (no downloads).

* TMS, the toy model of superposition (Elhage et al., "Toy Models of Superposition", 2022):
  ``y = ReLU(W^T (I...) W x + b)`` with ``W: [n_hidden, n_features]`` tied. Ground truth: one
  mechanism per feature, ``W[:, i] e_i^T`` in ``linear1`` (and its transpose in ``linear2``).
* Residual MLP (SPD paper, Bushnaq et al. 2025, after Braun et al., "Interpretability in
  Parameter Space", 2025): a fixed random unit-norm embedding ``W_E``, ``n_layers`` residual
  MLP blocks, unembedding ``W_E^T``, trained so that ``y_i = x_i + ReLU(x_i)`` for 100 sparse
  features with fewer neurons than features. Ground truth: one ``mlp_in`` mechanism per feature.

Inputs are sparse: each feature is active with probability ``feature_probability`` and then
uniform in ``[0, 1]`` (TMS) or ``[-1, 1]`` (residual MLP).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..config_utils import help_field


def _check_positive(where: str, **values: object) -> None:
    for name, value in values.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{where}.{name} must be a positive integer, got {value!r}")


def _check_probability(where: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value <= 1:
        raise ValueError(f"{where}.feature_probability must be in (0, 1], got {value!r}")


@dataclass
class TMSConfig:
    """Toy model of superposition: ``n_features`` sparse features through ``n_hidden`` dims."""

    n_features: int = help_field("Number of input (and output) features.", 5)
    n_hidden: int = help_field("Width of the bottleneck (< n_features for superposition).", 2)
    n_hidden_layers: int = help_field(
        "Fixed identity layers between linear1 and linear2 (0 or more; SPD's '-id' variants).", 0
    )
    feature_probability: float = help_field("Probability that a feature is active.", 0.05)
    bias_init_zero: bool = help_field(
        "Start the output bias at 0 (the named TMS experiments do: from PyTorch's random bias "
        "a feature's ReLU can be off before its direction is learned, and it stays unlearned).",
        False,
    )

    def __post_init__(self) -> None:
        _check_positive("toy", n_features=self.n_features, n_hidden=self.n_hidden)
        if isinstance(self.n_hidden_layers, bool) or not isinstance(self.n_hidden_layers, int):
            raise ValueError(
                f"toy.n_hidden_layers must be an integer >= 0, got {self.n_hidden_layers!r}"
            )
        if self.n_hidden_layers < 0:
            raise ValueError(f"toy.n_hidden_layers must be >= 0, got {self.n_hidden_layers}")
        if self.n_hidden > self.n_features:
            raise ValueError(
                f"toy.n_hidden ({self.n_hidden}) > toy.n_features ({self.n_features}): TMS needs "
                "fewer hidden dimensions than features to show superposition"
            )
        _check_probability("toy", self.feature_probability)


@dataclass
class ResidMLPConfig:
    """Residual MLP toy model: features embedded in a wide residual stream, few neurons."""

    n_features: int = help_field("Number of input features (the paper: 100).", 100)
    d_embed: int = help_field("Residual width (the paper: 1000).", 1000)
    d_mlp: int = help_field("Neurons per MLP (the paper: 50 for 1 layer, 25 for 2).", 50)
    n_layers: int = help_field("Residual MLP blocks (1 to 3 in the paper).", 1)
    feature_probability: float = help_field("Probability that a feature is active.", 0.01)

    def __post_init__(self) -> None:
        _check_positive(
            "toy",
            n_features=self.n_features,
            d_embed=self.d_embed,
            d_mlp=self.d_mlp,
            n_layers=self.n_layers,
        )
        _check_probability("toy", self.feature_probability)


class TMSModel(nn.Module):
    """``ReLU(linear2(hidden_layers(linear1(x))))`` with ``linear2.weight = linear1.weight^T``."""

    def __init__(self, config: TMSConfig) -> None:
        super().__init__()
        self.config = config
        self.linear1 = nn.Linear(config.n_features, config.n_hidden, bias=False)
        self.linear2 = nn.Linear(config.n_hidden, config.n_features, bias=True)
        if config.bias_init_zero:
            nn.init.zeros_(self.linear2.bias)
        self.hidden_layers = nn.ModuleList(
            nn.Linear(config.n_hidden, config.n_hidden, bias=False)
            for _ in range(config.n_hidden_layers)
        )
        for layer in self.hidden_layers:
            nn.init.eye_(layer.weight)
            layer.weight.requires_grad_(False)  # a fixed identity, as in the SPD paper
        self.tie_weights_()

    def tie_weights_(self) -> None:
        """Make ``linear2.weight`` the transpose of ``linear1.weight`` (after training too)."""
        self.linear2.weight.data = self.linear1.weight.data.t().clone()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = self.linear1(x)
        for layer in self.hidden_layers:
            hidden = layer(hidden)
        return F.relu(self.linear2(hidden))

    def feature_directions(self) -> torch.Tensor:
        """Ground truth of ``linear1``: column ``i`` of ``W`` is feature ``i``'s direction."""
        return self.linear1.weight.detach()


class _TiedTMS(nn.Module):
    """Training view of TMS with truly shared weights (``W`` used twice)."""

    def __init__(self, model: TMSModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m = self.model
        hidden = x @ m.linear1.weight.t()
        for layer in m.hidden_layers:
            hidden = layer(hidden)
        return F.relu(hidden @ m.linear1.weight + m.linear2.bias)


class MLPBlock(nn.Module):
    def __init__(self, d_embed: int, d_mlp: int) -> None:
        super().__init__()
        self.mlp_in = nn.Linear(d_embed, d_mlp, bias=False)
        self.mlp_out = nn.Linear(d_mlp, d_embed, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp_out(F.relu(self.mlp_in(x)))


class ResidMLP(nn.Module):
    """``W_E^T``-read residual stream after ``n_layers`` blocks ``r <- r + MLP(r)``."""

    def __init__(self, config: ResidMLPConfig, seed: int = 0) -> None:
        super().__init__()
        self.config = config
        generator = torch.Generator().manual_seed(seed)
        embed = torch.randn(config.n_features, config.d_embed, generator=generator)
        self.register_buffer("W_E", embed / embed.norm(dim=-1, keepdim=True))
        self.layers = nn.ModuleList(
            MLPBlock(config.d_embed, config.d_mlp) for _ in range(config.n_layers)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        residual = x @ self.W_E
        for layer in self.layers:
            residual = residual + layer(residual)
        return residual @ self.W_E.t()


def resid_mlp_labels(x: torch.Tensor) -> torch.Tensor:
    """The residual MLP's task: ``x + ReLU(x)`` per feature (label coefficients 1)."""
    return x + F.relu(x)


def sparse_features(
    batch_size: int,
    n_features: int,
    probability: float,
    value_range: tuple[float, float] = (0.0, 1.0),
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """``[batch, n_features]``: each entry active with ``probability``, then uniform in range."""
    active = torch.rand(batch_size, n_features, generator=generator) < probability
    low, high = value_range
    values = torch.rand(batch_size, n_features, generator=generator) * (high - low) + low
    return values * active


ToyConfig = TMSConfig | ResidMLPConfig


def build_toy_model(config: ToyConfig, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    if isinstance(config, TMSConfig):
        return TMSModel(config)
    if isinstance(config, ResidMLPConfig):
        return ResidMLP(config, seed=seed)
    raise TypeError(f"unknown toy config {type(config).__name__}")


def toy_batch(
    config: ToyConfig, batch_size: int, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(inputs, labels)`` of a toy task."""
    if isinstance(config, TMSConfig):
        x = sparse_features(
            batch_size, config.n_features, config.feature_probability, (0, 1), generator
        )
        return x, x
    x = sparse_features(
        batch_size, config.n_features, config.feature_probability, (-1, 1), generator
    )
    return x, resid_mlp_labels(x)


@dataclass
class ToyTrainingConfig:
    """How the target toy model is trained (before SPD sees it)."""

    steps: int = help_field("Optimizer steps.", 5000)
    batch_size: int = help_field("Examples per step.", 1024)
    lr: float = help_field("AdamW learning rate.", 5e-3)
    weight_decay: float = help_field("AdamW weight decay.", 0.0)
    cosine: bool = help_field("Cosine decay of the learning rate to 0 (else constant).", False)

    def __post_init__(self) -> None:
        _check_positive("target_training", steps=self.steps, batch_size=self.batch_size)


def train_toy_model(
    model: nn.Module, config: ToyConfig, training: ToyTrainingConfig, seed: int = 0
) -> float:
    """Train ``model`` on its toy task in place; returns the final loss (mean of 10 batches)."""
    generator = torch.Generator().manual_seed(seed)
    tied = isinstance(model, TMSModel)
    net = _TiedTMS(model) if tied else model
    params = [p for p in net.parameters() if p.requires_grad]
    if tied:
        params = [model.linear1.weight, model.linear2.bias]
    optimizer = torch.optim.AdamW(params, lr=training.lr, weight_decay=training.weight_decay)
    schedule = None
    if training.cosine:
        schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, training.steps)
    model.train()
    for _ in range(training.steps):
        x, y = toy_batch(config, training.batch_size, generator)
        loss = ((net(x) - y) ** 2).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if schedule is not None:
            schedule.step()
    if tied:
        model.tie_weights_()
    model.eval()
    model.requires_grad_(False)
    with torch.no_grad():
        losses = [
            ((model(x) - y) ** 2).mean()
            for x, y in (toy_batch(config, training.batch_size, generator) for _ in range(10))
        ]
    return float(torch.stack(losses).mean())


class ToyBatches(torch.utils.data.IterableDataset):
    """An endless stream of ``{"x": [batch, n_features]}`` toy batches (seeded), for SPDTrainer
    (whole batches: use it with ``batch_size=None``, which SPDTrainer does)."""

    def __init__(self, config: ToyConfig, batch_size: int, seed: int = 0) -> None:
        super().__init__()
        _check_positive("train", batch_size=batch_size)
        self.config = config
        self.batch_size = batch_size
        self.seed = seed

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed)
        while True:
            x, _ = toy_batch(self.config, self.batch_size, generator)
            yield {"x": x}
