"""What the user sets for SPD: the PEFT method (``SPDConfig``) and the training losses
(``SPDLossConfig``).

"Stochastic Parameter Decomposition" (Bushnaq, Braun, Sharkey et al., 2025).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..config_utils import help_field
from ..integrity import IntegrityCheckedConfig
from ..peft_registry import add_peft_type
from .core import RECON_LOSSES, check_pnorm

PEFT_TYPE_NAME = "SPD"
SPD = add_peft_type(PEFT_TYPE_NAME)


def _check_int(field: str, value: object, minimum: int, fix: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{field} must be an integer >= {minimum}, got {value!r}; {fix}")


def _check_number(field: str, value: object, minimum: float = 0.0, strict: bool = False) -> None:
    bad = isinstance(value, bool) or not isinstance(value, int | float)
    if not bad:
        bad = not math.isfinite(value) or value < minimum or (strict and value == minimum)
    if bad:
        bound = f"> {minimum}" if strict else f">= {minimum}"
        raise ValueError(f"{field} must be a finite number {bound}, got {value!r}")


def _check_tied_modules(tied: object) -> None:
    if tied is None:
        return
    ok = isinstance(tied, dict) and all(
        isinstance(k, str) and isinstance(v, str) and k and v for k, v in tied.items()
    )
    if not ok:
        raise ValueError(
            f"tied_modules must map module names to module names, e.g. "
            f"{{'linear2': 'linear1'}}, got {tied!r}"
        )
    both = sorted(set(tied) & set(tied.values()))
    if both:
        raise ValueError(
            f"tied_modules: {both} are both tied and a source; tie every layer to an untied one"
        )


@dataclass
class SPDConfig(IntegrityCheckedConfig):
    """Decompose each target linear into ``C`` rank-one subcomponents with causal-importance
    gates (SPD, Bushnaq et al. 2025).

    Each target ``W: [d_out, d_in]`` gets ``spd_U: [d_out, C]``, ``spd_V: [C, d_in]`` and one
    tiny gate MLP per subcomponent (``spd_gate_*``). The base weight stays as ``base_layer`` and
    is not saved; the adapter file holds the components and gates only.

    Loading: ``import hf_sparse.spd`` (or ``import hf_sparse`` once it imports it) before
    ``PeftModel.from_pretrained``; without it peft fails with ``KeyError: 'SPD'``.

    Example::

        config = SPDConfig(C=20, target_modules=["linear1", "linear2"])
        model = get_spd_model(toy_model, config)

    YAML (recipe ``spd:`` block)::

        spd: {C: 20, target_modules: [linear1, linear2], tied_modules: {linear2: linear1}}
    """

    C: int = help_field(
        "Number of rank-one subcomponents per target matrix (>= 1). Use more than the number "
        "of mechanisms you expect: unused ones die (causal importance 0 everywhere).",
        20,
    )
    target_modules: list[str] | str | None = help_field(
        "Linear layers to decompose, with peft's usual meaning: names or name suffixes "
        "(['linear1', 'linear2']), a regex string, or 'all-linear'. nn.Linear and GPT-2's Conv1D "
        "only.",
        None,
    )
    exclude_modules: list[str] | str | None = help_field(
        "Modules never to decompose (same syntax as target_modules).", None
    )
    gate_hidden: int = help_field(
        "Hidden width of each subcomponent's causal-importance MLP (the paper uses 16).", 16
    )
    use_delta_component: bool = help_field(
        "Add the residual W - UV as an extra component with a random mask during stochastic "
        "reconstruction, so the decomposition need not be exactly faithful while it trains.",
        True,
    )
    tied_modules: dict[str, str] | None = help_field(
        "Decomposed layers that reuse another's components transposed, {tied: source} (module "
        "names or name suffixes, both in target_modules): for targets whose weights are tied "
        "transposes, e.g. TMS's {'linear2': 'linear1'}, one set of components then decomposes "
        "both (the reference implementation ties TMS this way). Each keeps its own gates.",
        None,
    )
    leak: float = help_field(
        "Gradient slope on the leaky side of the hard sigmoids (> 0; the paper's 0.01).", 0.01
    )
    modules_to_save: list[str] | None = help_field(
        "Modules apart from the decomposed ones to train fully and save (rarely needed).", None
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = SPD
        if isinstance(self.target_modules, list):
            self.target_modules = set(self.target_modules)
        if isinstance(self.exclude_modules, list):
            self.exclude_modules = set(self.exclude_modules)
        _check_int("C", self.C, 1, "give each target matrix at least one subcomponent")
        _check_int("gate_hidden", self.gate_hidden, 1, "the paper uses 16")
        _check_number("leak", self.leak, 0.0, strict=True)
        _check_tied_modules(self.tied_modules)
        if self.target_modules is None:
            raise ValueError(
                "SPDConfig.target_modules is required: name the linear layers to decompose, "
                "e.g. ['linear1', 'linear2'] or ['model.layers.0.mlp.up_proj']"
            )


@dataclass
class SPDLossConfig:
    """The SPD objective (Bushnaq et al. 2025, eq. 7): faithfulness + stochastic reconstruction
    + layerwise stochastic reconstruction + importance minimality, and its warm-up.

    YAML (recipe ``loss:`` block)::

        loss: {importance_minimality_coeff: 3.0e-3, pnorm: 1.0, output_loss: mse}
    """

    output_loss: str = help_field(
        "Reconstruction loss between masked and target outputs: 'mse' (toy models) or 'kl' "
        "(language models, KL(target || masked) per token).",
        "mse",
    )
    faithfulness_coeff: float = help_field(
        "Weight of ||W - UV||^2 (mean over entries). 0 is fine with use_delta_component.", 0.0
    )
    stochastic_recon_coeff: float = help_field(
        "Weight of the reconstruction loss with every target layer masked at once.", 1.0
    )
    stochastic_recon_layerwise_coeff: float = help_field(
        "Weight of the reconstruction loss with one masked layer at a time (averaged).", 1.0
    )
    importance_minimality_coeff: float = help_field(
        "Weight of sum_c g_c^p at the start of training.", 3e-3
    )
    importance_minimality_final_coeff: float | None = help_field(
        "Weight of sum_c g_c^p at end_frac of training (None = constant).", None
    )
    importance_minimality_start_frac: float = help_field(
        "Fraction of training before the importance weight starts moving to its final value.",
        0.0,
    )
    importance_minimality_end_frac: float = help_field(
        "Fraction of training at which the importance weight reaches its final value.", 1.0
    )
    pnorm: float = help_field("Exponent p of the importance penalty g^p (> 0).", 1.0)
    n_mask_samples: int = help_field("Stochastic masks drawn per batch (>= 1).", 1)
    faithfulness_warmup_steps: int = help_field(
        "Steps of faithfulness-only training (UV -> W) before the SPD loss (0 = none).", 200
    )
    faithfulness_warmup_lr: float = help_field("Learning rate of the faithfulness warm-up.", 0.01)
    faithfulness_warmup_weight_decay: float = help_field(
        "AdamW weight decay of the faithfulness warm-up.", 0.1
    )
    ci_alive_threshold: float = help_field(
        "Causal importance above which a component counts as active (metrics, logs).", 0.1
    )

    def __post_init__(self) -> None:
        if self.output_loss not in RECON_LOSSES:
            raise ValueError(
                f"loss.output_loss must be one of {sorted(RECON_LOSSES)}, got {self.output_loss!r}"
            )
        for name in (
            "faithfulness_coeff",
            "stochastic_recon_coeff",
            "stochastic_recon_layerwise_coeff",
            "importance_minimality_coeff",
            "faithfulness_warmup_lr",
            "faithfulness_warmup_weight_decay",
        ):
            _check_number(f"loss.{name}", getattr(self, name))
        if self.importance_minimality_final_coeff is not None:
            _check_number(
                "loss.importance_minimality_final_coeff", self.importance_minimality_final_coeff
            )
        for name in ("importance_minimality_start_frac", "importance_minimality_end_frac"):
            value = getattr(self, name)
            _check_number(f"loss.{name}", value)
            if value > 1:
                raise ValueError(f"loss.{name} must be in [0, 1], got {value!r}")
        check_pnorm(self.pnorm)
        _check_int("loss.n_mask_samples", self.n_mask_samples, 1, "draw at least one mask")
        _check_int("loss.faithfulness_warmup_steps", self.faithfulness_warmup_steps, 0, "0 = off")
        _check_number("loss.ci_alive_threshold", self.ci_alive_threshold)
        if self.stochastic_recon_coeff == 0 and self.stochastic_recon_layerwise_coeff == 0:
            raise ValueError(
                "loss.stochastic_recon_coeff and loss.stochastic_recon_layerwise_coeff are both "
                "0: nothing would tie the components to the target's behaviour; set one > 0"
            )

    def importance_coeff(self, step: int, total_steps: int) -> float:
        """The importance-minimality weight at ``step`` of ``total_steps`` (the schedule)."""
        from .core import importance_coeff_at

        final = self.importance_minimality_final_coeff
        return importance_coeff_at(
            step,
            total_steps,
            self.importance_minimality_coeff,
            self.importance_minimality_coeff if final is None else final,
            self.importance_minimality_start_frac,
            self.importance_minimality_end_frac,
        )
