"""Boolean masks stored at one bit per parameter inside safetensors.

Layout: for a mask named ``p`` the file holds ``p`` as a flat ``uint8`` tensor of packed bits
(most significant bit first, like ``numpy.packbits``); the shapes live in the file's metadata
under ``"hf_sparse.mask_shapes"`` as JSON.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

MASKS_FILE = "sparsity_masks.safetensors"  # name of the mask file beside saved weights
_SHAPES_KEY = "hf_sparse.mask_shapes"
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
    count = 1
    for size in shape:
        count *= size
    if packed.dtype != torch.uint8 or packed.numel() != (count + 7) // 8:
        raise ValueError(
            f"packed mask of {packed.numel()} bytes ({packed.dtype}) cannot hold shape "
            f"{tuple(shape)} ({(count + 7) // 8} bytes of uint8 expected)"
        )
    bits = packed.reshape(-1, 1).bitwise_and(_BIT_WEIGHTS).ne(0).reshape(-1)
    return bits[:count].reshape(tuple(shape))


def save_masks(masks: dict[str, torch.Tensor], path: str | os.PathLike) -> Path:
    """Write masks as packed bits to ``path`` atomically (temporary file, then rename)."""
    path = Path(path)
    shapes = {name: list(mask.shape) for name, mask in masks.items()}
    tensors = {name: pack_bits(mask) for name, mask in masks.items()}
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        save_file(tensors, str(tmp), metadata={_SHAPES_KEY: json.dumps(shapes)})
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
        return {name: unpack_bits(handle.get_tensor(name), shape) for name, shape in shapes.items()}
