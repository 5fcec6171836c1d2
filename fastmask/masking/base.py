"""What every mask generator returns, the base class, and the registry.

A generator is an `nn.Module` (learned ones, such as ADIOS's occluder, have parameters) called as

    masks = masker(batch_size, grid, draws=d, **context)          # d: fastmask.draws.Draws for B samples
    masks = masker(batch_size, grid, device=..., generator=g)      # or keys drawn from a torch.Generator

with `grid` the patch grid (h, w) (or L, for generators that need no 2-D layout), per-sample keyed
`draws` (what a sample gets depends only on its key, so masks do not change with the world size,
the batch split or a resume; the engine passes them) or a `torch.Generator` (None: torch's global
RNG) from which `Draws.from_generator` takes keys, and `context` for what a particular generator
needs (images, attention maps); others ignore it.
Mask convention: 1 = hidden, 0 = visible.
"""
from __future__ import annotations

from typing import Callable, NamedTuple

import torch
from torch import nn


class Masks(NamedTuple):
    """ids_keep [B, K] int64: the visible patches, in the order the encoder will see them.
    ids_restore [B, L] int64: argsort of (ids_keep ++ hidden ids); `patch_scatter` uses it to put
    the K encoded tokens back in image order. mask [B, L] fp32: 1 = hidden, 0 = visible, image order."""

    ids_keep: torch.Tensor
    ids_restore: torch.Tensor
    mask: torch.Tensor


def masks_from_shuffle(ids_shuffle: torch.Tensor, len_keep: int) -> Masks:
    """ids_shuffle [B, L] int64 (a per-sample permutation, kept patches first), len_keep -> Masks.

    MAE's bookkeeping, shared by every generator that can express its choice as an ordering:
    ids_restore = argsort(ids_shuffle); mask = [0]*len_keep ++ [1]*(L-len_keep) unshuffled.
    """
    B, L = ids_shuffle.shape
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    ids_keep = ids_shuffle[:, :len_keep]
    # Hidden iff the patch's rank in the shuffle is >= len_keep (MAE builds ones, zeroes the first
    # len_keep and gathers with ids_restore; this is the same thing in one comparison).
    mask = (ids_restore >= len_keep).to(torch.float32)
    return Masks(ids_keep, ids_restore, mask)


def grid_length(grid: int | tuple[int, int]) -> int:
    if isinstance(grid, int):
        return grid
    h, w = grid
    return int(h) * int(w)


def check_ratio(mask_ratio: float, who: str) -> float:
    if isinstance(mask_ratio, bool) or not isinstance(mask_ratio, (int, float)) or not 0.0 < mask_ratio < 1.0:
        raise ValueError(f"{who}: mask_ratio must be in (0, 1), got {mask_ratio!r}")
    return float(mask_ratio)


class MaskGenerator(nn.Module):
    """Base class. Subclasses implement
    forward(batch_size, grid, device=None, generator=None, draws=None, **context) -> Masks."""

    name: str = ""

    def forward(self, batch_size: int, grid: int | tuple[int, int], device: torch.device | str | None = None,
                generator: torch.Generator | None = None, draws=None, **context) -> Masks:
        raise NotImplementedError


MASKERS: dict[str, type[MaskGenerator]] = {}


def register_masker(name: str) -> Callable[[type[MaskGenerator]], type[MaskGenerator]]:
    def deco(cls: type[MaskGenerator]) -> type[MaskGenerator]:
        if name in MASKERS:
            raise ValueError(f"mask generator {name!r} is already registered")
        cls.name = name
        MASKERS[name] = cls
        return cls
    return deco
