"""Critical-weight analysis built on ``hf_sparse.importance``: perturbations of top-k sets with
random and bottom-k controls, stability (Jaccard, Spearman) across seeds / inputs /
checkpoints, and per-component / per-depth breakdowns.

The study (``study.run_study``, ``hf-sparse analyze``) runs every part and writes one folder
with JSON files, plots, ``report.html`` and a manifest; ``report.verify_study`` checks such a
folder against itself (digests, every figure redrawn from the JSON, every key number).
Also: clustering of sensitivity profiles (``clustering``), lm-eval on local LAMBADA /
HellaSwag (``downstream``) and ``hf_sparse.callbacks.SensitivityCallback``.
"""

from .breakdown import COMPONENTS, breakdown, component_of, layer_of
from .config import AnalysisConfig, PerturbationSpec, SensitivityConfig
from .controls import RANKING_MODES, random_entries, resolve_count, top_k_entries
from .effects import Effect, EffectProbe
from .perturb import PERTURBATIONS, check_perturbation, perturbed, register_perturbation
from .pipeline import AnalysisRecipe, analysis_recipe_from_dict, run_analysis_recipe
from .report import verify_study
from .stability import jaccard_matrix, spearman, spearman_matrix
from .study import run_study

__all__ = [
    "COMPONENTS",
    "AnalysisConfig",
    "AnalysisRecipe",
    "PerturbationSpec",
    "SensitivityConfig",
    "analysis_recipe_from_dict",
    "run_analysis_recipe",
    "run_study",
    "verify_study",
    "PERTURBATIONS",
    "RANKING_MODES",
    "Effect",
    "EffectProbe",
    "breakdown",
    "check_perturbation",
    "component_of",
    "jaccard_matrix",
    "layer_of",
    "perturbed",
    "random_entries",
    "register_perturbation",
    "resolve_count",
    "spearman",
    "spearman_matrix",
    "top_k_entries",
]
