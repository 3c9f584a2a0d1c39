"""Bit-packed mask storage (hf_sparse.masks.bitmask)."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from hf_sparse.masks.bitmask import load_masks, pack_bits, save_masks, unpack_bits

SHAPES = [(1,), (7,), (8,), (9,), (1000,), (3, 5), (2, 3, 7), (4, 1, 9), (16, 64)]


def _random_mask(shape, seed=0, density=0.5):
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(shape, generator=generator) < density


def _reference_pack(mask: torch.Tensor) -> list[int]:
    """Bytes of the flattened mask, most significant bit first, zero-padded (numpy.packbits)."""
    bits = [int(b) for b in mask.flatten().tolist()]
    bits += [0] * (-len(bits) % 8)
    return [
        sum(bit << (7 - i) for i, bit in enumerate(bits[j : j + 8])) for j in range(0, len(bits), 8)
    ]


@pytest.mark.parametrize("shape", SHAPES)
def test_pack_unpack_round_trip(shape):
    mask = _random_mask(shape, seed=sum(shape))
    packed = pack_bits(mask)
    count = math.prod(shape)
    assert packed.dtype == torch.uint8 and packed.ndim == 1
    assert packed.numel() == math.ceil(count / 8)
    assert packed.tolist() == _reference_pack(mask)
    restored = unpack_bits(packed, shape)
    assert restored.dtype == torch.bool and restored.shape == shape
    assert torch.equal(restored, mask)


@pytest.mark.parametrize(
    ("bits", "expected"),
    [
        ([1], [128]),
        ([0, 0, 0, 0, 0, 0, 0, 1], [1]),
        ([1, 0, 1, 0, 0, 0, 0, 0, 1], [160, 128]),
        ([1] * 8 + [1, 1], [255, 192]),
    ],
)
def test_pack_bits_msb_first(bits, expected):
    assert pack_bits(torch.tensor(bits, dtype=torch.bool)).tolist() == expected


@pytest.mark.parametrize("fill", [True, False])
def test_all_true_and_all_false(fill):
    mask = torch.full((3, 11), fill)
    assert torch.equal(unpack_bits(pack_bits(mask), (3, 11)), mask)


def test_pack_bits_accepts_non_bool_and_non_contiguous():
    mask = _random_mask((6, 10), seed=3)
    assert torch.equal(pack_bits(mask.int()), pack_bits(mask))
    transposed = mask.t()
    assert not transposed.is_contiguous()
    assert torch.equal(unpack_bits(pack_bits(transposed), (10, 6)), transposed)


@pytest.mark.parametrize(
    ("packed", "shape"),
    [
        (torch.zeros(2, dtype=torch.uint8), (17,)),  # needs 3 bytes
        (torch.zeros(3, dtype=torch.uint8), (16,)),  # needs 2 bytes
        (torch.zeros(1, dtype=torch.uint8), (3, 3)),
        (torch.zeros(2, dtype=torch.int32), (16,)),  # right size, wrong dtype
    ],
)
def test_unpack_wrong_size_raises(packed, shape):
    with pytest.raises(ValueError, match="cannot hold shape"):
        unpack_bits(packed, shape)


def test_save_load_round_trip(tmp_path):
    masks = {
        "model.layers.0.mlp.down_proj.weight": _random_mask((64, 128), seed=1),
        "model.layers.0.self_attn.q_proj.weight": _random_mask((32, 32), seed=2, density=0.1),
        "odd": _random_mask((7,), seed=3),
        "cube": _random_mask((3, 5, 9), seed=4),
    }
    path = save_masks(masks, tmp_path / "masks.safetensors")
    assert path == tmp_path / "masks.safetensors"
    assert [p.name for p in tmp_path.iterdir()] == ["masks.safetensors"]  # no temporary left
    loaded = load_masks(path)
    assert set(loaded) == set(masks)
    for name, mask in masks.items():
        assert loaded[name].dtype == torch.bool
        assert torch.equal(loaded[name], mask), name
    # The stored layout: packed uint8 tensors plus shapes in the metadata.
    with safe_open(str(path), framework="pt") as handle:
        shapes = json.loads(handle.metadata()["hf_sparse.mask_shapes"])
        assert shapes == {name: list(mask.shape) for name, mask in masks.items()}
        stored = handle.get_tensor("odd")
        assert stored.dtype == torch.uint8 and stored.tolist() == _reference_pack(masks["odd"])


def test_saved_file_is_about_one_bit_per_entry(tmp_path):
    count = 256 * 512
    path = save_masks({"w": _random_mask((256, 512), seed=5)}, tmp_path / "big.safetensors")
    size = path.stat().st_size
    assert count // 8 <= size <= count // 8 + 512  # payload plus a small header
    assert size < count // 4  # far below one byte per entry


def test_save_masks_overwrites(tmp_path):
    path = tmp_path / "m.safetensors"
    save_masks({"a": torch.ones(5, dtype=torch.bool)}, path)
    save_masks({"b": torch.zeros(9, dtype=torch.bool)}, path)
    loaded = load_masks(path)
    assert list(loaded) == ["b"] and not loaded["b"].any()


def test_load_foreign_safetensors_raises(tmp_path):
    path = tmp_path / "weights.safetensors"
    save_file({"w": torch.zeros(4, 4)}, str(path))
    with pytest.raises(ValueError, match="not an hf_sparse mask file"):
        load_masks(path)
    other = tmp_path / "other_meta.safetensors"
    save_file({"w": torch.zeros(2, dtype=torch.uint8)}, str(other), metadata={"format": "pt"})
    with pytest.raises(ValueError, match="hf_sparse.mask_shapes"):
        load_masks(other)


def test_saved_mask_file_follows_the_umask(tmp_path):
    """safetensors writes 0600; a mask file beside a checkpoint must be as readable as it."""
    import os

    previous = os.umask(0o022)
    try:
        save_masks({"w": torch.ones(4, 8, dtype=torch.bool)}, tmp_path / "masks.safetensors")
    finally:
        os.umask(previous)
    assert oct((tmp_path / "masks.safetensors").stat().st_mode & 0o777) == oct(0o644)
