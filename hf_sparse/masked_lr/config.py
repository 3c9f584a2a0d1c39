"""What the user sets for the masked-learning-rate PEFT method (``MASKED_LR``)."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

from peft.config import PeftConfig
from peft.utils import PeftType

from ..config_utils import help_field

PEFT_TYPE_NAME = "MASKED_LR"


def add_peft_type(name: str) -> PeftType:
    """Add ``name`` to peft's closed ``PeftType`` enum (once; later calls return the member).

    ``register_peft_method`` only accepts names already in ``PeftType``, and a ``str`` enum cannot
    be extended through its public API, so the member is built the way ``enum`` builds its own
    and entered in the three tables that lookups use (``PeftType.X``, ``PeftType("X")``,
    iteration). It compares and hashes as the plain string, which is what
    ``adapter_config.json`` stores.
    """
    existing = PeftType._member_map_.get(name)
    if existing is not None:
        return existing
    member = str.__new__(PeftType, name)
    member._name_ = name
    member._value_ = name
    member.__objclass__ = PeftType
    member._sort_order_ = len(PeftType._member_names_)
    setattr(PeftType, name, member)  # allowed until the name is in _member_map_
    PeftType._member_names_.append(name)
    PeftType._member_map_[name] = member
    PeftType._value2member_map_[name] = member
    return member


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
