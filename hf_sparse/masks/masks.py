"""``ParameterMasks``: boolean masks keyed by parameter name, as one object.

Set algebra (``&``, ``|``, ``~``, ``-``, Jaccard), density and memory reports, bit-packed
safetensors storage (1 bit per parameter, see ``bitmask.py``) and export to / import from torch
sparse COO for tools that store masks that way.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from .bitmask import load_masks, save_masks, stored_mask_bytes


@dataclass(frozen=True)
class TensorMasksReport:
    """Density and storage cost of one tensor's mask."""

    name: str
    shape: tuple[int, ...]
    numel: int
    kept: int
    density: float
    packed_bytes: int  # one bit per entry
    stored_bytes: int  # what ``save`` writes (encoding auto): bits or 4 bytes per kept entry
    bool_bytes: int  # a dense torch.bool tensor: one byte per entry
    coo_bytes: int  # int64 COO indices, one row per dimension (torch sparse, no values)

    def to_dict(self) -> dict:
        return asdict(self)


class ParameterMasks(Mapping[str, torch.Tensor]):
    """Boolean masks keyed by parameter name (``model.layers.0.mlp.up_proj.weight``).

    Masks are kept on the CPU as ``torch.bool``. Binary operators need both sides to hold the
    same names with the same shapes, so a mistake in one file cannot silently shrink a mask.
    """

    def __init__(self, masks: Mapping[str, torch.Tensor]):
        converted = {}
        for name, mask in masks.items():
            if not isinstance(mask, torch.Tensor):
                raise TypeError(f"mask {name!r} must be a tensor, got {type(mask).__name__}")
            if mask.dtype != torch.bool:
                if mask.is_floating_point() or mask.is_complex():
                    raise TypeError(f"mask {name!r} must be bool or integer 0/1, got {mask.dtype}")
                if not bool(((mask == 0) | (mask == 1)).all()):
                    raise ValueError(f"mask {name!r} holds values other than 0 and 1")
            converted[name] = mask.detach().to(device="cpu", dtype=torch.bool)
        self._masks = converted

    # Mapping protocol
    def __getitem__(self, name: str) -> torch.Tensor:
        return self._masks[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._masks)

    def __len__(self) -> int:
        return len(self._masks)

    def __repr__(self) -> str:
        return (
            f"ParameterMasks({len(self)} tensors, {self.count():,} of {self.numel():,} kept, "
            f"density {self.density():.4%})"
        )

    # Counts
    def numel(self) -> int:
        return sum(m.numel() for m in self._masks.values())

    def count(self) -> int:
        """Number of True entries over all tensors."""
        return sum(int(m.sum()) for m in self._masks.values())

    def density(self) -> float:
        total = self.numel()
        return self.count() / total if total else 0.0

    def report(self) -> list[TensorMasksReport]:
        """Per-tensor density and the bytes each storage format needs."""
        rows = []
        for name, mask in self._masks.items():
            kept = int(mask.sum())
            rows.append(
                TensorMasksReport(
                    name=name,
                    shape=tuple(mask.shape),
                    numel=mask.numel(),
                    kept=kept,
                    density=kept / mask.numel() if mask.numel() else 0.0,
                    packed_bytes=(mask.numel() + 7) // 8,
                    stored_bytes=stored_mask_bytes(mask.numel(), kept),
                    bool_bytes=mask.numel(),
                    coo_bytes=kept * max(mask.ndim, 1) * 8,
                )
            )
        return rows

    # Set algebra
    def _check_compatible(self, other: ParameterMasks, op: str) -> None:
        if not isinstance(other, ParameterMasks):
            raise TypeError(f"cannot {op} ParameterMasks with {type(other).__name__}")
        if set(self) != set(other):
            only_self = sorted(set(self) - set(other))[:3]
            only_other = sorted(set(other) - set(self))[:3]
            raise ValueError(
                f"cannot {op} masks over different parameters: only in left {only_self}, "
                f"only in right {only_other}; restrict both with .select(names) first"
            )
        for name, mask in self._masks.items():
            if mask.shape != other[name].shape:
                raise ValueError(
                    f"cannot {op} masks: {name!r} is {tuple(mask.shape)} on the left and "
                    f"{tuple(other[name].shape)} on the right"
                )

    def _combine(self, other: ParameterMasks, op: str, fn) -> ParameterMasks:
        self._check_compatible(other, op)
        return ParameterMasks({n: fn(m, other[n]) for n, m in self._masks.items()})

    def __and__(self, other: ParameterMasks) -> ParameterMasks:
        return self._combine(other, "intersect", torch.logical_and)

    def __or__(self, other: ParameterMasks) -> ParameterMasks:
        return self._combine(other, "unite", torch.logical_or)

    def __sub__(self, other: ParameterMasks) -> ParameterMasks:
        """Entries kept here and not in ``other``."""
        return self._combine(other, "subtract", lambda a, b: a & ~b)

    def __xor__(self, other: ParameterMasks) -> ParameterMasks:
        return self._combine(other, "xor", torch.logical_xor)

    def __invert__(self) -> ParameterMasks:
        return ParameterMasks({n: ~m for n, m in self._masks.items()})

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, ParameterMasks) or set(self) != set(other):
            return False
        return all(
            m.shape == other[n].shape and torch.equal(m, other[n]) for n, m in self._masks.items()
        )

    __hash__ = None  # mutable contents, like dict

    def jaccard(self, other: ParameterMasks) -> float:
        """|A & B| / |A | B| over all tensors (1.0 when both are empty)."""
        self._check_compatible(other, "compare")
        inter = sum(int((m & other[n]).sum()) for n, m in self._masks.items())
        union = sum(int((m | other[n]).sum()) for n, m in self._masks.items())
        return inter / union if union else 1.0

    def jaccard_per_tensor(self, other: ParameterMasks) -> dict[str, float]:
        self._check_compatible(other, "compare")
        result = {}
        for name, mask in self._masks.items():
            union = int((mask | other[name]).sum())
            result[name] = int((mask & other[name]).sum()) / union if union else 1.0
        return result

    def select(self, names) -> ParameterMasks:
        """The masks of ``names`` only (unknown names raise)."""
        missing = [n for n in names if n not in self._masks]
        if missing:
            raise KeyError(f"no mask for {missing[:3]}; masks exist for {list(self)[:3]} ...")
        return ParameterMasks({n: self._masks[n] for n in names})

    # Model checks
    def check_against(self, model: nn.Module) -> None:
        """Raise if a mask names a parameter the model lacks or has a different shape."""
        params = dict(model.named_parameters())
        unknown = [n for n in self._masks if n not in params]
        if unknown:
            raise ValueError(
                f"{len(unknown)} mask(s) name parameters this model does not have, e.g. "
                f"{unknown[:3]}; the model has e.g. {list(params)[:3]}. Masks are keyed by "
                "model.named_parameters() names of the model they were computed on."
            )
        for name, mask in self._masks.items():
            if tuple(params[name].shape) != tuple(mask.shape):
                raise ValueError(
                    f"mask {name!r} has shape {tuple(mask.shape)} but the parameter is "
                    f"{tuple(params[name].shape)}: the masks belong to a different model"
                )

    @torch.no_grad()
    def zero_(self, model: nn.Module) -> None:
        """Set the masked (True) entries of the model's parameters to zero, in place."""
        self.check_against(model)
        params = dict(model.named_parameters())
        for name, mask in self._masks.items():
            param = params[name]
            param.masked_fill_(mask.to(param.device), 0)

    # Storage
    def save(
        self,
        path: str | os.PathLike,
        metadata: Mapping[str, str] | None = None,
        encoding: str = "auto",
    ) -> Path:
        """Write to safetensors atomically: per tensor 1 bit per entry or int32 positions of
        the kept entries, whichever is smaller (``encoding="bits"`` / ``"indices"`` forces one).
        """
        return save_masks(self._masks, path, metadata=metadata, encoding=encoding)

    @classmethod
    def load(cls, path: str | os.PathLike) -> ParameterMasks:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"mask file {path} does not exist")
        return cls(load_masks(path))

    def to_sparse_coo(self) -> dict[str, torch.Tensor]:
        """Each mask as a coalesced torch sparse COO tensor of ones (int64 indices)."""
        result = {}
        for name, mask in self._masks.items():
            indices = mask.nonzero().t().contiguous()
            values = torch.ones(indices.shape[1], dtype=torch.bool)
            result[name] = torch.sparse_coo_tensor(
                indices, values, mask.shape, check_invariants=True
            ).coalesce()
        return result

    @classmethod
    def from_sparse_coo(cls, tensors: Mapping[str, torch.Tensor]) -> ParameterMasks:
        """Inverse of ``to_sparse_coo``; any sparse COO tensor's nonzero pattern becomes a mask."""
        masks = {}
        for name, tensor in tensors.items():
            if not tensor.is_sparse:
                raise TypeError(f"{name!r} is not a sparse COO tensor (layout {tensor.layout})")
            tensor = tensor.coalesce()
            mask = torch.zeros(tensor.shape, dtype=torch.bool)
            keep = tensor.values() != 0
            mask[tuple(tensor.indices()[:, keep])] = True
            masks[name] = mask
        return cls(masks)
