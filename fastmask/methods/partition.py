"""Parameters partitioned by DeepSpeed ZeRO-3, seen from the methods (no DeepSpeed import needed).

Built inside `deepspeed.zero.Init` (the engine does this at ZeRO-3), every parameter `p` is an
empty placeholder outside a gather: its real shape is `p.ds_shape`, and this rank's values are
`p.ds_tensor`, a flat slice of the flattened parameter padded to world_size equal slices.
"""
from __future__ import annotations

import torch


def is_partitioned(p: torch.Tensor) -> bool:
    """Whether DeepSpeed ZeRO-3 partitioned `p` (its values live in `p.ds_tensor`, this rank's slice)."""
    return hasattr(p, "ds_tensor")


def full_shape(p: torch.Tensor) -> tuple[int, ...]:
    """The parameter's real shape (a partitioned parameter's `p.shape` is its empty placeholder's)."""
    return tuple(p.ds_shape) if is_partitioned(p) else tuple(p.shape)


def local_tensor(p: torch.Tensor) -> torch.Tensor:
    """The tensor holding this rank's values of `p`: `p` itself, or its ZeRO-3 partition (flat)."""
    return p.ds_tensor if is_partitioned(p) else p


def regather(params: list[torch.Tensor]) -> None:
    """After writing partitions directly: ZeRO-3 parameters DeepSpeed keeps gathered between steps
    (small, "persistent" ones) hold a full copy beside their slice; drop it and gather it again
    from the slices. Collective (the set is the same on every rank); a no-op for the others."""
    held = [p for p in params if is_partitioned(p) and p.ds_status.name == "AVAILABLE"]
    if held:
        held[0].partition(held)
        held[0].all_gather(held)
