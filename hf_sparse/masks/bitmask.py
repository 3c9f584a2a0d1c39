"""Boolean masks stored at one bit per parameter inside safetensors.

Layout: for a mask named ``p`` the file holds ``p`` as a flat ``uint8`` tensor of packed bits
(most significant bit first, like ``numpy.packbits``); the shapes live in the file's metadata
under ``"hf_sparse.mask_shapes"`` as JSON.

Very sparse masks are smaller as a list of positions: below a density of 1/32 the sorted flat
``int32`` indices of the kept entries (4 bytes each) beat one bit per entry. ``encoding="auto"``
picks the smaller form per tensor; the stored dtype tells them apart (``uint8`` bits, ``int32``
positions). Either way the file stays far below int64 COO (16 bytes per
kept entry of a matrix) and a dense bool tensor (1 byte per entry).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ..io import public_file_mode

MASKS_FILE = "sparsity_masks.safetensors"  # name of the mask file beside saved weights
_SHAPES_KEY = "hf_sparse.mask_shapes"
MASK_ENCODINGS = ("auto", "bits", "indices")
_INT32_LIMIT = 2**31 - 1
_BIT_WEIGHTS = torch.tensor([128, 64, 32, 16, 8, 4, 2, 1], dtype=torch.uint8)


def pack_bits(mask: torch.Tensor) -> torch.Tensor:
    """Flat ``uint8`` tensor holding ``mask`` (any shape, bool) at 8 entries per byte."""
    flat = mask.detach().reshape(-1).to(torch.bool).cpu()
    pad = (-flat.numel()) % 8
    if pad:
        flat = torch.cat([flat, torch.zeros(pad, dtype=torch.bool)])
    return (flat.view(-1, 8).to(torch.uint8) * _BIT_WEIGHTS).sum(1, dtype=torch.uint8)


def unpack_bits(packed: torch.Tensor, shape: tuple[int, ...] | torch.Size) -> torch.Tensor:
    """Inverse of ``pack_bits``."""
    count = math.prod(shape)
    if packed.dtype != torch.uint8 or packed.numel() != (count + 7) // 8:
        raise ValueError(
            f"packed mask of {packed.numel()} bytes ({packed.dtype}) cannot hold shape "
            f"{tuple(shape)} ({(count + 7) // 8} bytes of uint8 expected)"
        )
    bits = packed.reshape(-1, 1).bitwise_and(_BIT_WEIGHTS).ne(0).reshape(-1)
    return bits[:count].reshape(tuple(shape))


def _indices_are_smaller(numel: int, kept: int) -> bool:
    return numel <= _INT32_LIMIT and 4 * kept < (numel + 7) // 8


def stored_mask_bytes(numel: int, kept: int) -> int:
    """Bytes ``encoding="auto"`` stores for a mask of ``numel`` entries, ``kept`` of them True."""
    return 4 * kept if _indices_are_smaller(numel, kept) else (numel + 7) // 8


def _choose_encoding(mask: torch.Tensor, encoding: str) -> str:
    if encoding == "bits" or mask.numel() > _INT32_LIMIT:
        return "bits"
    if encoding == "indices":
        return "indices"
    return "indices" if _indices_are_smaller(mask.numel(), int(mask.sum())) else "bits"


def save_masks(
    masks: Mapping[str, torch.Tensor],
    path: str | os.PathLike,
    metadata: Mapping[str, str] | None = None,
    encoding: str = "auto",
) -> Path:
    """Write masks to ``path`` atomically (temporary file, then rename).

    ``encoding``: ``bits`` (1 bit per entry), ``indices`` (int32 positions of kept entries) or
    ``auto`` (the smaller per tensor). ``metadata`` (string keys and values) is stored in the
    file header beside the shapes.
    """
    if encoding not in MASK_ENCODINGS:
        raise ValueError(f"encoding must be one of {list(MASK_ENCODINGS)}, got {encoding!r}")
    path = Path(path)
    shapes = {name: list(mask.shape) for name, mask in masks.items()}
    tensors = {name: encode_mask(mask, encoding) for name, mask in masks.items()}
    header = {str(k): str(v) for k, v in (metadata or {}).items()}
    if _SHAPES_KEY in header:
        raise ValueError(f"metadata key {_SHAPES_KEY!r} is reserved for the mask shapes")
    header[_SHAPES_KEY] = json.dumps(shapes)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        save_file(tensors, str(tmp), metadata=header)
        public_file_mode(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def load_masks(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read masks written by ``save_masks`` as boolean tensors."""
    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata() or {}
        if _SHAPES_KEY not in metadata:
            raise ValueError(f"{path} is not an hf_sparse mask file (no {_SHAPES_KEY} metadata)")
        shapes = json.loads(metadata[_SHAPES_KEY])
        return {
            name: decode_mask(handle.get_tensor(name), shape, name)
            for name, shape in shapes.items()
        }


def _mask_from_indices(indices: torch.Tensor, shape: list[int], name: str) -> torch.Tensor:
    count = math.prod(shape)
    if indices.ndim != 1 or (indices.numel() and (indices.min() < 0 or indices.max() >= count)):
        raise ValueError(f"stored indices of mask {name!r} do not fit its shape {tuple(shape)}")
    flat = torch.zeros(count, dtype=torch.bool)
    flat[indices.long()] = True
    return flat.reshape(tuple(shape))


def load_mask_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The metadata stored by ``save_masks`` (without the internal shapes entry)."""
    with safe_open(str(path), framework="pt") as handle:
        metadata = dict(handle.metadata() or {})
    metadata.pop(_SHAPES_KEY, None)
    return metadata


def encode_mask(mask: torch.Tensor, encoding: str = "auto") -> torch.Tensor:
    """One mask as the smaller of packed bits (``uint8``) and kept positions (``int32``).

    ``decode_mask`` tells the two apart by dtype, so the tensor alone (plus the shape) is
    enough to restore the mask: used where a mask travels inside another file (adapters).
    """
    if encoding not in MASK_ENCODINGS:
        raise ValueError(f"encoding must be one of {list(MASK_ENCODINGS)}, got {encoding!r}")
    if _choose_encoding(mask, encoding) == "indices":
        return mask.detach().reshape(-1).cpu().nonzero().reshape(-1).to(torch.int32)
    return pack_bits(mask)


def decode_mask(stored: torch.Tensor, shape: tuple[int, ...] | torch.Size, name: str = "mask"):
    """Inverse of ``encode_mask``."""
    if stored.dtype == torch.int32:
        return _mask_from_indices(stored, list(shape), name)
    return unpack_bits(stored, shape)
