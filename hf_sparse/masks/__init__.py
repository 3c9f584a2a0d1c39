"""Masks as first-class objects: bit-packed storage, set algebra, density, top-k ranking."""

from .bitmask import load_mask_metadata, load_masks, pack_bits, save_masks, unpack_bits
from .masks import ParameterMasks, TensorMasksReport
from .ranking import RANKING_SCOPES, TensorLayout, check_percent, count_for, top_k

__all__ = [
    "RANKING_SCOPES",
    "ParameterMasks",
    "TensorLayout",
    "TensorMasksReport",
    "check_percent",
    "count_for",
    "load_mask_metadata",
    "load_masks",
    "pack_bits",
    "save_masks",
    "top_k",
    "unpack_bits",
]
