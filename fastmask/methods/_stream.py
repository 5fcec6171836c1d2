"""A checkpointable per-rank random stream for the methods that draw masks and views in `forward`.

Draw n on rank r re-seeds one torch.Generator with mix(seed, r, n), so masks/views differ per rank
and per step, and resuming needs only (seed, n), which travel in the module's `_extra_state`
(DeepSpeed saves module state from rank 0 only, so a saved generator state would give every rank
the same stream after a resume).
"""
from __future__ import annotations

import os

import torch

_MASK64 = (1 << 64) - 1


def _mix(*values: int) -> int:
    """Deterministic 63-bit seed from integers (SplitMix64 finalizer over a running hash); stable
    across Python versions and processes, unlike hash()."""
    h = 0x9E3779B97F4A7C15
    for v in values:
        h = (h ^ (int(v) & _MASK64)) * 0xBF58476D1CE4E5B9 & _MASK64
        h = (h ^ (h >> 31)) * 0x94D049BB133111EB & _MASK64
        h ^= h >> 29
    return h >> 1


def _rank() -> int:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank()
    return int(os.environ.get("RANK", 0))


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
