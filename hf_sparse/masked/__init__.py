"""Masks as first-class objects: bit-packed storage (more to come: set algebra, masked LR)."""

from .bitmask import load_masks, pack_bits, save_masks, unpack_bits

__all__ = ["load_masks", "pack_bits", "save_masks", "unpack_bits"]
