"""A checkpointable per-rank random stream for the methods that draw masks and views in `forward`.

The same scheme as `fastmask.methods.mae`: draw n on rank r re-seeds one torch.Generator with
mix(seed, r, n), so masks/views differ per rank and per step, and resuming needs only (seed, n),
which travel in the module's `_extra_state` (DeepSpeed saves module state from rank 0 only).
"""
from __future__ import annotations

import torch

from .mae import _mix, _rank


class DrawStream:
    """stream.next(device) -> a torch.Generator seeded for this draw; state() / load(state)."""

    def __init__(self, seed: int = 0):
        self.seed, self.draws = int(seed), 0
        self._gen: torch.Generator | None = None

    @torch.compiler.disable
    def next(self, device: torch.device) -> torch.Generator:
        if self._gen is None or self._gen.device.type != device.type:
            self._gen = torch.Generator(device=device)
        self._gen.manual_seed(_mix(self.seed, _rank(), self.draws))
        self.draws += 1
        return self._gen

    def state(self) -> dict:
        return {"seed": self.seed, "draws": self.draws}

    def load(self, state: dict) -> None:
        self.seed, self.draws = int(state["seed"]), int(state["draws"])
