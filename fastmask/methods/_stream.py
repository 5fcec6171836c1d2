"""Where a method's random draws (masks, views, slots) come from: per-sample keyed `Draws`.

    d = self.stream.draws(imgs.shape[0], imgs.device, keys)   # keys [B] int64 from the engine, or None
    masks = self.masker(B, grid, draws=d.child("mask"))

With `keys` (the engine passes each sample's global key, see `fastmask.draws`), what a sample gets
depends only on (seed, its key): the same on any world size, batch split or after a resume, and
nothing needs checkpointing. Without keys (direct calls: tests, benchmarks, `fastmask visualize`)
the keys come from a counter: draw n on rank r uses keys mix(seed, r, n) + [0, B), so calls differ
per step and per rank, and (seed, n) travel in the module's `_extra_state` (DeepSpeed saves module
state from rank 0 only, so a saved generator state would give every rank the same stream).
"""
from __future__ import annotations

import os

import torch

from ..draws import Draws, mix64

_KEY_MASK = (1 << 62) - 1
_mix = mix64  # the name tests and older callers import


def _rank() -> int:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank()
    return int(os.environ.get("RANK", 0))


class DrawStream:
    """stream.draws(B, device, keys=None) -> Draws; state() / load(state) for the counter."""

    def __init__(self, seed: int = 0):
        self.seed, self.draws_done = int(seed), 0

    @torch.compiler.disable  # a Python counter and host-built keys: keep them out of compiled graphs
    def draws(self, batch_size: int, device: torch.device, keys: torch.Tensor | None = None) -> Draws:
        if keys is None:
            base = mix64(self.seed, _rank(), self.draws_done) & _KEY_MASK
            self.draws_done += 1
            keys = (base + torch.arange(batch_size, dtype=torch.int64)) & _KEY_MASK
        elif keys.dim() != 1 or keys.shape[0] != batch_size:
            raise ValueError(f"keys must be [B] = [{batch_size}] int64 sample keys, got {tuple(keys.shape)}")
        return Draws(keys.to(device=device, dtype=torch.int64, non_blocking=True), self.seed)

    def state(self) -> dict:
        return {"seed": self.seed, "draws": self.draws_done}

    def load(self, state: dict) -> None:
        self.seed, self.draws_done = int(state["seed"]), int(state["draws"])
