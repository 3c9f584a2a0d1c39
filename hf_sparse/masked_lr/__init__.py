"""Masked-learning-rate fine-tuning: a PEFT method (``MASKED_LR``) and ``MaskedAdamW``.

Both give the entries inside a boolean mask one learning-rate scale and the others another
(0 = frozen). The PEFT method stores and saves only the trained values plus the packed
masks; ``MaskedAdamW`` trains the full weights in place with per-element learning rates.

Importing this package registers ``MASKED_LR`` with peft (``import hf_sparse`` does it).
"""

from ..peft_registry import register_tuner
from .config import MASKED_LR, MaskedLRConfig
from .layer import Linear, MaskedLRLayer
from .model import MaskedLRModel, get_masked_lr_model, prepare_masks
from .optim import MaskedAdamW

register_tuner(MASKED_LR, MaskedLRConfig, MaskedLRModel)

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
