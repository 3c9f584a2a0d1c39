"""What the user sets for the masked-learning-rate PEFT method (``MASKED_LR``)."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

from peft.config import PeftConfig

from ..config_utils import help_field
from ..peft_registry import add_peft_type

PEFT_TYPE_NAME = "MASKED_LR"


MASKED_LR = add_peft_type(PEFT_TYPE_NAME)


@dataclass
class MaskedLRConfig(PeftConfig):
    """A trainable delta on chosen weights, with one learning-rate scale inside a mask, another
    outside it.

    The delta is stored as ``inside_lr_scale * inside`` scattered to the mask's True entries
    (plus ``outside_lr_scale * outside`` on the others when that scale is positive), so only the
    masked values are trained and saved. Because Adam's update does not depend on the gradient's
    scale, a scale ``s`` makes those entries move by ``s * lr`` per step: an exact per-element
    learning-rate multiplier for Adam/AdamW. With plain SGD the same reparametrisation moves
    them by ``s**2 * lr``.

    Loading: ``import hf_sparse`` first. It adds ``MASKED_LR`` to peft's method registry;
    without it ``PeftModel.from_pretrained`` fails with ``KeyError: 'MASKED_LR'``. A saved
    adapter holds its masks (packed bits or int32 positions), so ``masks_file`` is not read
    when loading one.

    Example::

        config = MaskedLRConfig(masks_file="golden_masks.safetensors", outside_lr_scale=0.0)
        model = get_masked_lr_model(base_model, config)
    """

    target_modules: list[str] | str | None = help_field(
        "Modules to adapt, with peft's usual meaning: a list of names or name suffixes (e.g. "
        "['q_proj', 'v_proj']), a regex string, or 'all-linear'. None = exactly the modules that "
        "have a mask. Only nn.Linear and GPT-2's Conv1D are supported.",
        None,
    )
    exclude_modules: list[str] | str | None = help_field(
        "Modules never to adapt (same syntax as target_modules).", None
    )
    masks_file: str | None = help_field(
        "Masks written by hf_sparse.masked.save_masks, keyed by full parameter name "
        "(model.layers.0.self_attn.q_proj.weight; a PEFT 'base_model.model.' prefix is ignored). "
        "Each mask has the weight's stored shape ([in, out] for Conv1D). Masks passed to "
        "get_masked_lr_model take precedence; a saved adapter carries its own masks.",
        None,
    )
    inside_lr_scale: float = help_field(
        "Learning-rate multiplier of the entries where the mask is True (> 0). Exact for "
        "Adam-family optimizers; with SGD the effective multiplier is its square.",
        1.0,
    )
    outside_lr_scale: float = help_field(
        "Learning-rate multiplier of the other entries (>= 0). 0 = they never change and are not "
        "even stored; > 0 stores a second trainable vector for them (dense storage).",
        0.0,
    )
    init_weights: bool = help_field(
        "True: the delta starts at zero, so the adapted model equals the base model. False: "
        "small random values (for tests only).",
        True,
    )
    modules_to_save: list[str] | None = help_field(
        "Modules apart from the adapted ones to train fully and save (e.g. a classifier head).",
        None,
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = MASKED_LR
        if isinstance(self.target_modules, list):
            self.target_modules = set(self.target_modules)
        if isinstance(self.exclude_modules, list):
            self.exclude_modules = set(self.exclude_modules)
        if isinstance(self.masks_file, os.PathLike):
            self.masks_file = os.fspath(self.masks_file)
        if self.masks_file is not None and not isinstance(self.masks_file, str):
            raise ValueError(f"masks_file must be a path, got {self.masks_file!r}")
        _check_scale("inside_lr_scale", self.inside_lr_scale, allow_zero=False)
        _check_scale("outside_lr_scale", self.outside_lr_scale, allow_zero=True)

    @classmethod
    def from_pretrained(
        cls, pretrained_model_name_or_path: str, subfolder: str | None = None, **kw
    ):
        """Load a saved config; its masks then come with the adapter weights, not ``masks_file``."""
        config = super().from_pretrained(pretrained_model_name_or_path, subfolder=subfolder, **kw)
        config._masks_in_checkpoint = True
        return config


def _check_scale(field: str, value: object, allow_zero: bool) -> None:
    bound = ">= 0" if allow_zero else "> 0"
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"{field} must be a number {bound}, got {value!r}")
    if not math.isfinite(value) or value < 0 or (value == 0 and not allow_zero):
        fix = "use 0 to freeze these entries" if allow_zero else "use a small positive value"
        raise ValueError(f"{field} must be finite and {bound}, got {value!r}; {fix}")
