"""Mask generators. Each draws from per-sample keyed `fastmask.draws.Draws` (or a torch.Generator) and
returns `Masks(ids_keep [B, K], ids_restore [B, L], mask [B, L])`, 1 = hidden.

    masker = build_masker("random", mask_ratio=0.75)
    masks = masker(B, (14, 14), draws=Draws(keys, seed))     # or device=..., generator=g

New generators live in their own file here, subclass `MaskGenerator` and register with
`@register_masker(name)`; add the module name to `_MODULES` so `build_masker` finds it.
"""
from __future__ import annotations

import importlib

from .base import MASKERS, MaskGenerator, Masks, check_ratio, grid_length, masks_from_shuffle, register_masker
from .random import RandomMasking

_MODULES = ("random", "block", "attention_guided", "adversarial", "multi")


def _load_all() -> None:
    for mod in _MODULES:
        importlib.import_module(f"fastmask.masking.{mod}")


def build_masker(name: str, **kwargs) -> MaskGenerator:
    """Registered generator `name` with its kwargs (e.g. mask_ratio); ValueError for unknown names."""
    _load_all()
    if name not in MASKERS:
        raise ValueError(f"unknown mask generator {name!r}; available: {', '.join(sorted(MASKERS))}")
    return MASKERS[name](**kwargs)


__all__ = ["MASKERS", "MaskGenerator", "Masks", "RandomMasking", "build_masker", "register_masker",
           "masks_from_shuffle", "check_ratio", "grid_length"]
