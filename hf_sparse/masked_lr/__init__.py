"""Masked-learning-rate fine-tuning: a PEFT method (``MASKED_LR``) and ``MaskedAdamW``.

Both give the entries inside a boolean mask one learning-rate scale and the others another
(0 = frozen). The PEFT method stores and saves only the trained values plus the packed
masks; ``MaskedAdamW`` trains the full weights in place with per-element learning rates.

Importing this package registers ``MASKED_LR`` with peft (``import hf_sparse`` does it).
"""

from peft.mapping import (
    PEFT_TYPE_TO_CONFIG_MAPPING,
    PEFT_TYPE_TO_MIXED_MODEL_MAPPING,
    PEFT_TYPE_TO_PREFIX_MAPPING,
    PEFT_TYPE_TO_TUNER_MAPPING,
)
from peft.utils import register_peft_method

from .config import MASKED_LR, MaskedLRConfig
from .layer import Linear, MaskedLRLayer
from .model import MaskedLRModel, get_masked_lr_model, prepare_masks
from .optim import MaskedAdamW


def _register() -> None:
    """Register with peft, replacing an earlier registration (a second import or a reload
    brings new classes; peft refuses a name twice, so the old entries go first)."""
    for mapping in (
        PEFT_TYPE_TO_CONFIG_MAPPING,
        PEFT_TYPE_TO_TUNER_MAPPING,
        PEFT_TYPE_TO_MIXED_MODEL_MAPPING,
        PEFT_TYPE_TO_PREFIX_MAPPING,
    ):
        mapping.pop(MASKED_LR, None)
    register_peft_method(
        name=MASKED_LR.value.lower(),
        config_cls=MaskedLRConfig,
        model_cls=MaskedLRModel,
        prefix=MaskedLRModel.prefix,
    )


_register()

__all__ = [
    "MASKED_LR",
    "Linear",
    "MaskedAdamW",
    "MaskedLRConfig",
    "MaskedLRLayer",
    "MaskedLRModel",
    "get_masked_lr_model",
    "prepare_masks",
]
