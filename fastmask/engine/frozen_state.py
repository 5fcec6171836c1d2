"""The method state DeepSpeed's optimizer does not own, checkpointed so any stage and world size reads it
back.

DeepSpeed restores trainable parameters from the optimizer's fp32 state (and converts that for a
universal resume). The rest of a method it carries unevenly: frozen parameters (EMA teachers, fixed
position embeddings) as whole module states at stages 0-1 and as per-rank slices at stages 2-3,
which load only at the same world size; at a universal resume (another world size or stage)
DeepSpeed loads no module state at all, so teachers, buffers (BatchNorm statistics, DINO's centre)
and `_extra_state` (draw counters) would restart from their initial values. The fp32 EMA shadows
of low-precision teachers it never sees.

So every checkpoint also holds, for each rank r of N, `frozen_rank{r}.pt`:

    {"world_size": N,
     "params":  {name: (offset, shape, values)},   every frozen parameter (requires_grad False)
     "shadows": {name: (offset, shape, values)},   EMA fp32 shadows, under their teacher parameter's name
     "module":  {buffers and _extra_state}}        rank 0 only (as DeepSpeed saves module state)

`values` is the flat slice [offset, offset + len) of the flattened tensor that rank r holds: its
ZeRO-3 partition without the padding, or, at stages 0-2 where every rank holds everything, the r-th
of N equal slices, so the files add up to one copy. Loading gives each parameter this rank's part
(its ZeRO-3 partition, or all of it) from the overlapping slices of every file, and checks that the
slices cover it: any stage and world size reads any other. Memory: saving clones this rank's slices
(frozen bytes / N, plus shadows); loading memory-maps the files and copies slice by slice.
"""
from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import nn

from fastmask.methods.momentum import ema_shadow, set_ema_shadow, teachers
from fastmask.methods.partition import full_shape, is_partitioned, local_tensor, regather

FILE = "frozen_rank{}.pt"


def _world() -> int:
    d = torch.distributed
    return d.get_world_size() if d.is_available() and d.is_initialized() else 1


def _span(p: torch.Tensor, rank: int, world: int, needed: bool) -> tuple[int, int]:
    """[lo, hi) of the flattened `p` this rank writes (needed=False) or must read back (needed=True)."""
    numel = math.prod(full_shape(p))
    if is_partitioned(p):
        part = p.ds_tensor.ds_numel
        lo = min(part * rank, numel)
        return lo, min(lo + part, numel)
    if needed:
        return 0, numel
    part = math.ceil(numel / world)
    lo = min(part * rank, numel)
    return lo, min(lo + part, numel)


def _piece(p: torch.Tensor, local: torch.Tensor, rank: int, world: int) -> tuple[int, tuple, torch.Tensor]:
    """(offset, full shape, values): the slice of `local` (p's local tensor or its shadow) this rank saves."""
    lo, hi = _span(p, rank, world, needed=False)
    flat = local.detach().reshape(-1)
    start = 0 if is_partitioned(p) else lo  # a partition starts at its own offset
    return lo, full_shape(p), flat[start:start + hi - lo].cpu().clone()


def _fill(name: str, p: torch.Tensor, local: torch.Tensor, pieces: list, rank: int, world: int) -> None:
    """Copy into `local` (p's local tensor or its shadow) the part of p this rank needs, from saved pieces."""
    lo, hi = _span(p, rank, world, needed=True)
    flat = local.detach().view(-1)
    covered = 0
    for off, shape, values in pieces:
        if tuple(shape) != full_shape(p):
            raise ValueError(f"checkpoint holds {name} with shape {tuple(shape)}, the method's is "
                             f"{full_shape(p)}")
        a, b = max(lo, off), min(hi, off + values.numel())
        if a < b:
            flat[a - lo:b - lo].copy_(values[a - off:b - off])
            covered += b - a
    if covered != hi - lo:
        raise ValueError(f"checkpoint slices of {name} cover {covered} of the {hi - lo} elements this rank "
                         "needs")


def save(method: nn.Module, folder: Path, rank: int) -> None:
    """Write this rank's `frozen_rank{rank}.pt` into checkpoint `folder` (every rank calls it)."""
    world = _world()
    params = {n: _piece(p, local_tensor(p), rank, world) for n, p in method.named_parameters()
              if not p.requires_grad}
    shadows = {}
    for tname, teacher in teachers(method):
        shadow = ema_shadow(teacher)
        for (n, p), s in zip(teacher.named_parameters(), shadow or []):
            shadows[f"{tname}.{n}"] = _piece(p, s, rank, world)
    blob = {"world_size": world, "params": params, "shadows": shadows}
    if rank == 0:
        names = {n for n, _ in method.named_parameters()}
        blob["module"] = {k: (v.detach().cpu().clone() if isinstance(v, torch.Tensor) else v)
                          for k, v in method.state_dict().items() if k not in names}
    torch.save(blob, folder / FILE.format(rank))


@torch.no_grad()
def load(method: nn.Module, folder: Path, rank: int) -> bool:
    """Restore frozen parameters, EMA shadows, buffers and `_extra_state` from checkpoint `folder`
    (written at any stage and world size). -> False when the checkpoint has no such files (older
    checkpoints: DeepSpeed's own restore stands). Collective under ZeRO-3 (persistent parameters are
    re-gathered)."""
    files = sorted(folder.glob(FILE.format("*")))
    if not files:
        return False
    blobs = [torch.load(f, map_location="cpu", weights_only=False, mmap=True) for f in files]
    saved_world = blobs[0]["world_size"]
    if len(blobs) != saved_world:
        raise ValueError(f"checkpoint {folder} holds {len(blobs)} of the {saved_world} frozen-state files")
    world = _world()

    def pieces(kind: str, name: str) -> list:
        return [b[kind][name] for b in blobs if name in b[kind]]

    frozen = [(n, p) for n, p in method.named_parameters() if not p.requires_grad]
    absent = [n for n, _ in frozen if not pieces("params", n)]
    if absent:
        raise ValueError(f"checkpoint {folder} lacks frozen parameters {absent[:5]} of this method")
    for n, p in frozen:
        _fill(n, p, local_tensor(p), pieces("params", n), rank, world)
    for tname, teacher in teachers(method):
        named = [(f"{tname}.{n}", p) for n, p in teacher.named_parameters()]
        if named and all(pieces("shadows", n) for n, _ in named):
            shadow = [torch.empty(local_tensor(p).shape, dtype=torch.float32, device=local_tensor(p).device)
                      for _, p in named]
            for (n, p), s in zip(named, shadow):
                _fill(n, p, s, pieces("shadows", n), rank, world)
            set_ema_shadow(teacher, shadow)
    result = method.load_state_dict(next(b["module"] for b in blobs if "module" in b), strict=False)
    if result.unexpected_keys:
        raise ValueError(f"checkpoint {folder} holds module state this method lacks: "
                         f"{result.unexpected_keys[:5]}")
    regather([p for _, p in frozen])
    return True
