"""Critical-weight analysis built on ``hf_sparse.importance``: perturbations of top-k sets with
random and bottom-k controls, stability (Jaccard, Spearman) across seeds / inputs /
checkpoints, and per-component / per-depth breakdowns.

So far: the building blocks, the perturbation study with controls
(``perturbation_study``), clustering of sensitivity profiles (``clustering``), lm-eval on local
LAMBADA / HellaSwag (``downstream``) and ``hf_sparse.callbacks.SensitivityCallback``. The
one-command study (``hf-sparse analyze``), plots, the HTML report and the recipe are still to
come (issue 4).
"""

from .breakdown import COMPONENTS, breakdown, component_of, layer_of
from .controls import RANKING_MODES, random_entries, resolve_count, top_k_entries
from .effects import Effect, EffectProbe
from .perturb import PERTURBATIONS, check_perturbation, perturbed, register_perturbation
from .stability import jaccard_matrix, spearman, spearman_matrix

__all__ = [
    "COMPONENTS",
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
