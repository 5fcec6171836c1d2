"""Synthetic image batches for benchmarks: generated on the device, never decoded, never copied.

    loader = SyntheticLoader(cfg.data, rank, world_size, seed=0, device="cuda")
    for imgs in loader.epoch(0):                  # imgs [B, 3, S, S] float32, roughly N(0, 1) per pixel

Each image is smooth random structure (Gaussian noise at 1/8 resolution, bilinearly upsampled) plus
fine noise, so it looks like a normalized photo to the model (patch statistics vary; the MAE loss
is neither trivial nor pure noise) and is never all zeros. A small pool of distinct batches is
generated once per rank and cycled, so a step measured on this source measures the model, not the
generator. Deterministic given (seed, rank): batch t of epoch e is pool[(e * batches_per_epoch + t) % P].
An epoch is `data.synthetic_size` samples (ImageNet-1k's train set by default) over all ranks.
"""
from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch
import torch.nn.functional as F

POOL = 4


class SyntheticLoader:
    def __init__(self, data_cfg, rank: int = 0, world_size: int = 1, seed: int = 0,
                 device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
        B, S = data_cfg.batch_size, data_cfg.img_size
        if B < 1 or S < 8:
            raise ValueError(f"synthetic loader needs data.batch_size >= 1 and data.img_size >= 8, got {B}, "
                             f"{S}")
        self.cfg, self.rank, self.world_size, self.seed = data_cfg, rank, world_size, seed
        self.device = torch.device(device)
        self.batches_per_epoch = data_cfg.synthetic_size // (B * world_size)
        if self.batches_per_epoch == 0:
            raise ValueError(f"data.synthetic_size={data_cfg.synthetic_size} does not fill one global batch "
                             f"of {B} x {world_size}")
        g = torch.Generator(device="cpu").manual_seed(seed * 1_000_003 + rank)
        pool = []
        for _ in range(min(POOL, self.batches_per_epoch)):
            coarse = torch.randn(B, 3, max(1, S // 8), max(1, S // 8), generator=g)
            fine = torch.randn(B, 3, S, S, generator=g)
            img = F.interpolate(coarse, size=(S, S), mode="bilinear", align_corners=False) + 0.25 * fine
            pool.append(img.to(self.device, dtype))
        self._pool = pool

    def __len__(self) -> int:
        return self.batches_per_epoch

    def sample_keys(self, epoch: int) -> np.ndarray:
        """-> int64 [batches_per_epoch, B]: global positions (epoch, batch t, rank, index). The images
        themselves are per-rank pools, so synthetic runs are not world-size invariant anyway."""
        B, W, T = self.cfg.batch_size, self.world_size, self.batches_per_epoch
        t = np.arange(T, dtype=np.int64).reshape(T, 1)
        return (epoch * T + t) * (B * W) + self.rank * B + np.arange(B, dtype=np.int64).reshape(1, B)

    def epoch(self, epoch: int, start: int = 0) -> Iterator[torch.Tensor]:
        """Yield batches imgs [B, 3, S, S] (on device) of `epoch` from `start` on."""
        if not 0 <= start <= self.batches_per_epoch:
            raise ValueError(f"start must be in [0, {self.batches_per_epoch}], got {start}")
        return self._batches(epoch, start)

    def _batches(self, epoch: int, start: int) -> Iterator[torch.Tensor]:
        base = epoch * self.batches_per_epoch
        for t in range(start, self.batches_per_epoch):
            yield self._pool[(base + t) % len(self._pool)]
