"""Custom PEFT methods: a member in peft's closed ``PeftType`` enum and peft's registration.

Each hf_sparse PEFT method (``MASKED_LR``, ``BASIS_SHARING``, ``SPD``) calls
``add_peft_type`` when its config module is imported and ``register_tuner`` when its package
is imported (``import hf_sparse`` imports all of them).
"""

from __future__ import annotations

from peft.mapping import (
    PEFT_TYPE_TO_CONFIG_MAPPING,
    PEFT_TYPE_TO_MIXED_MODEL_MAPPING,
    PEFT_TYPE_TO_PREFIX_MAPPING,
    PEFT_TYPE_TO_TUNER_MAPPING,
)
from peft.utils import PeftType, register_peft_method


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


def register_tuner(peft_type: PeftType, config_cls: type, model_cls: type) -> None:
    """Register a tuner with peft, replacing an earlier registration (a second import or a
    reload brings new classes; peft refuses a name twice, so the old entries go first)."""
    for mapping in (
        PEFT_TYPE_TO_CONFIG_MAPPING,
        PEFT_TYPE_TO_TUNER_MAPPING,
        PEFT_TYPE_TO_MIXED_MODEL_MAPPING,
        PEFT_TYPE_TO_PREFIX_MAPPING,
    ):
        mapping.pop(peft_type, None)
    register_peft_method(
        name=peft_type.value.lower(),
        config_cls=config_cls,
        model_cls=model_cls,
        prefix=model_cls.prefix,
    )
