"""Stochastic Parameter Decomposition (SPD) as a PEFT method (``SPD``) and a Trainer.

"Stochastic Parameter Decomposition" (Bushnaq, Braun, Sharkey et al., 2025): each target
weight becomes ``C`` rank-one subcomponents with learned causal-importance gates, trained so
that randomly ablating unimportant subcomponents leaves the output unchanged.

Importing this package registers ``SPD`` with peft, so ``PeftModel.from_pretrained`` can load a
saved decomposition.
"""

from ..peft_registry import register_tuner
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
from .pipeline import SPDRecipe, experiment_from_dict, run_spd_recipe, spd_recipe_from_dict
from .toy_run import run_toy_experiment
from .trainer import SPDTrainer

register_tuner(SPD, SPDConfig, SPDModel)

__all__ = [
    "EXPERIMENTS",
    "SPD",
    "Linear",
    "SPDConfig",
    "SPDLayer",
    "SPDLossConfig",
    "SPDModel",
    "SPDRecipe",
    "SPDTrainer",
    "clear_spd_ablation",
    "experiment_from_dict",
    "get_experiment",
    "get_spd_model",
    "run_spd_recipe",
    "run_toy_experiment",
    "set_spd_ablation",
    "spd_layers",
    "spd_loss",
    "spd_recipe_from_dict",
    "spd_runtime",
]
