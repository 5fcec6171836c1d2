"""Per-sample random draws: what sample b gets depends only on (seed, its key, which draw), never on
the batch it sits in, the rank that holds it or the world size.

    d = Draws(keys, seed=0)                   # keys [B] int64: one global key per sample
    noise = d.uniform(196)                    # [B, 196] float32 in [0, 1)
    masks = masker(B, grid, draws=d.child("mask"))
    v1, v2 = augment.two_views(imgs, d.child("views"))

Why: masks and augmentations drawn from a per-rank generator make a 2-rank run differ from a 1-rank
run of the same global batch, and a resume at another world size leave the trajectory. Keyed draws
make them a function of the sample alone. The engine keys each sample by its place in the data
(`epoch * num_samples + dataset index`, `Loader.sample_keys`), so the same image in the same epoch
gets the same mask on any number of ranks, with any per-rank batch, before or after a resume.

How: a counter-based generator. Every value is a hash of (seed, stream, call, key, element index),
computed with integer tensor ops on the keys' device: no generator state, no host sync, nothing to
checkpoint. Successive calls on one `Draws` (and `child` streams) give independent numbers; a
`child(name)` stream does not shift when another component adds a draw. The hash is lowbias32
(Wellons) chained over 32-bit lanes held in int64 tensors (multiplies split in 16-bit halves so no
intermediate overflows int64). Uniforms carry 24 random bits (float32's mantissa).

`Draws.from_generator(B, generator)` gives draws with keys taken from a torch.Generator: the way
to use a generator-style API (tests, direct calls) through the same single implementation.
"""
from __future__ import annotations

import zlib

import torch

_M32 = 0xFFFFFFFF
_M64 = (1 << 64) - 1


def mix64(*values: int) -> int:
    """Deterministic 63-bit value from integers (SplitMix64 finalizer over a running hash): stable
    across Python versions and processes, unlike hash()."""
    h = 0x9E3779B97F4A7C15
    for v in values:
        h = (h ^ (int(v) & _M64)) * 0xBF58476D1CE4E5B9 & _M64
        h = (h ^ (h >> 31)) * 0x94D049BB133111EB & _M64
        h ^= h >> 29
    return h >> 1


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """(x * c) mod 2**32 for int64 x in [0, 2**32): two products below 2**49, never an int64 overflow."""
    lo, hi = c & 0xFFFF, c >> 16
    return (x * lo + (((x * hi) & 0xFFFF) << 16)) & _M32


def _hash32(x: torch.Tensor) -> torch.Tensor:
    """lowbias32 over int64 tensors holding 32-bit values."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x21F0AAAD)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x735A2D97)
    return x ^ (x >> 15)


class Draws:
    """Random numbers for a batch of B samples, row b a function of (seed, stream, call, keys[b]).

    keys [B] int64 (>= 0), one per sample; seed: the run's seed; stream: a sub-stream id (use
    `child(name)`). Methods: uniform, randint, bernoulli, normal, child, repeat.
    """

    def __init__(self, keys: torch.Tensor, seed: int = 0, stream: int = 0):
        if keys.dim() != 1 or keys.dtype != torch.int64:
            raise ValueError(f"Draws needs keys [B] int64, got {keys.dtype} {tuple(keys.shape)}")
        self.keys, self.seed, self.stream = keys, int(seed), int(stream)
        self.calls = 0
        self._row: torch.Tensor | None = None

    @classmethod
    def from_generator(cls, batch_size: int, generator: torch.Generator | None = None,
                       device: torch.device | str | None = None, seed: int = 0) -> "Draws":
        """Keys drawn from `generator` (None: torch's global RNG) for B samples, on `device`
        (default: the generator's)."""
        if device is None:
            device = generator.device if generator is not None else "cpu"
        gen_device = generator.device if generator is not None else torch.device("cpu")
        keys = torch.randint(0, 2**62, (batch_size,), generator=generator, device=gen_device)
        return cls(keys.to(device), seed=seed)

    @property
    def batch_size(self) -> int:
        return self.keys.shape[0]

    @property
    def device(self) -> torch.device:
        return self.keys.device

    def child(self, name: str | int) -> "Draws":
        """An independent stream for one component (masks, views, ...), same keys."""
        salt = zlib.crc32(name.encode()) if isinstance(name, str) else int(name)
        return Draws(self.keys, self.seed, mix64(self.stream, salt))

    def repeat(self, copies: int) -> "Draws":
        """Draws for copies*B rows: row k*B + b is copy k of sample b (the layout of
        `x.repeat(copies, ...)`), each copy an independent stream of the sample's key."""
        k = torch.arange(copies, device=self.device, dtype=torch.int64).repeat_interleave(self.batch_size)
        keys = self.keys.repeat(copies)
        mixed = (keys ^ (_hash32((k * 0x9E3779B9 + 0x7F4A7C15) & _M32) << 31)) & ((1 << 63) - 1)
        return Draws(mixed, self.seed, mix64(self.stream, 0x5EED, copies))

    def _bits(self, n: int) -> torch.Tensor:
        """[B, n] int64 holding 32 random bits each; advances the call counter."""
        if self._row is None:  # per-sample base hash, computed once per Draws
            lo, hi = self.keys & _M32, (self.keys >> 32) & _M32
            s = mix64(self.seed, self.stream)
            self._row = _hash32(_hash32(lo ^ (s & _M32)) ^ hi ^ ((s >> 32) & _M32))
        c = mix64(self.seed, self.stream, self.calls)
        self.calls += 1
        col = _hash32((torch.arange(n, device=self.device, dtype=torch.int64) + (c & _M32)) & _M32)
        return _hash32(self._row.view(-1, 1) ^ col.view(1, -1) ^ ((c >> 32) & _M32))

    def uniform(self, *shape: int) -> torch.Tensor:
        """[B, *shape] float32 in [0, 1), 24 random bits each."""
        n = 1
        for s in shape:
            n *= int(s)
        u = (self._bits(n) >> 8).to(torch.float32) * (1.0 / (1 << 24))
        return u.view(self.batch_size, *shape)

    def randint(self, high: int, *shape: int) -> torch.Tensor:
        """[B, *shape] int64 uniform in [0, high)."""
        return (self.uniform(*shape) * high).long().clamp_(max=high - 1)

    def bernoulli(self, p: float | torch.Tensor, *shape: int) -> torch.Tensor:
        """[B, *shape] bool, True with probability p."""
        return self.uniform(*shape) < p

    def normal(self, *shape: int) -> torch.Tensor:
        """[B, *shape] float32 standard normal (Box-Muller over two uniform draws)."""
        u1 = self.uniform(*shape)
        u2 = self.uniform(*shape)
        return torch.sqrt(-2.0 * torch.log1p(-u1)) * torch.cos(2.0 * torch.pi * u2)


def as_draws(batch_size: int, draws: Draws | None = None, generator: torch.Generator | None = None,
             device: torch.device | str | None = None, who: str = "draws") -> Draws:
    """The Draws a component uses: `draws` when given (checked for B), else keys from `generator`."""
    if draws is not None:
        if draws.batch_size != batch_size:
            raise ValueError(f"{who}: draws for {draws.batch_size} samples, the batch has {batch_size}")
        return draws
    return Draws.from_generator(batch_size, generator, device)


__all__ = ["Draws", "as_draws", "mix64"]
