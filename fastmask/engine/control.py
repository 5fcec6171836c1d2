"""Control-plane collectives: the few decisions every rank must share (a stop request, rank 0's plan
for the run folder or its refusal, a checkpoint's weight norm), over a CPU (gloo) group, so deciding
never syncs the GPU stream and works whatever device the values live on.

Without an initialized process group, or on one rank, every function returns its argument.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

_groups: dict[int, Any] = {}


def _group():
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return None
    world = dist.group.WORLD
    if id(world) not in _groups:  # created once per process group, by every rank in the same order
        _groups[id(world)] = world if dist.get_backend() == "gloo" else dist.new_group(backend="gloo")
    return _groups[id(world)]


def broadcast_from_main(obj: Any) -> Any:
    """Rank 0's `obj` (picklable) on every rank."""
    group = _group()
    if group is None:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0, group=group)
    return box[0]


def max_over_ranks(value: int) -> int:
    """The largest `value` any rank passed (a flag raised on one rank is raised on all)."""
    group = _group()
    if group is None:
        return value
    t = torch.tensor([value], dtype=torch.long)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    return int(t.item())


def sum_over_ranks(values: list[float]) -> list[float]:
    """Element-wise sums of `values` over the ranks (fp64)."""
    group = _group()
    if group is None:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(t, group=group)
    return t.tolist()
