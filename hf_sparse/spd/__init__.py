"""Stochastic Parameter Decomposition (SPD) as a PEFT method (``SPD``) and a Trainer.

"Stochastic Parameter Decomposition" (Bushnaq, Braun, Sharkey et al., 2025): each target
weight becomes ``C`` rank-one subcomponents with learned causal-importance gates, trained so
that randomly ablating unimportant subcomponents leaves the output unchanged.

Importing this package registers ``SPD`` with peft, so ``PeftModel.from_pretrained`` can load a
saved decomposition.
"""

from peft.mapping import (
    PEFT_TYPE_TO_CONFIG_MAPPING,
    PEFT_TYPE_TO_MIXED_MODEL_MAPPING,
    PEFT_TYPE_TO_PREFIX_MAPPING,
    PEFT_TYPE_TO_TUNER_MAPPING,
)
from peft.utils import register_peft_method

from .config import SPD, SPDConfig, SPDLossConfig
from .experiments import EXPERIMENTS, get_experiment
from .layer import Linear, SPDLayer
from .model import (
    SPDModel,
    clear_spd_ablation,
    get_spd_model,
    set_spd_ablation,
    spd_layers,
    spd_runtime,
)
from .objective import spd_loss
from .toy_run import run_toy_experiment
from .trainer import SPDTrainer


def _register() -> None:
    """Register with peft, replacing an earlier registration (peft refuses a name twice)."""
    for mapping in (
        PEFT_TYPE_TO_CONFIG_MAPPING,
        PEFT_TYPE_TO_TUNER_MAPPING,
        PEFT_TYPE_TO_MIXED_MODEL_MAPPING,
        PEFT_TYPE_TO_PREFIX_MAPPING,
    ):
        mapping.pop(SPD, None)
    register_peft_method(
        name=SPD.value.lower(), config_cls=SPDConfig, model_cls=SPDModel, prefix=SPDModel.prefix
    )


_register()

__all__ = [
    "EXPERIMENTS",
    "SPD",
    "Linear",
    "SPDConfig",
    "SPDLayer",
    "SPDLossConfig",
    "SPDModel",
    "SPDTrainer",
    "clear_spd_ablation",
    "get_experiment",
    "get_spd_model",
    "run_toy_experiment",
    "set_spd_ablation",
    "spd_layers",
    "spd_loss",
    "spd_runtime",
]
