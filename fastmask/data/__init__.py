"""Image batches for pretraining: one loader protocol, three sources.

    loader = build_loader(cfg.data, rank, world_size, seed=cfg.engine.seed, device=device)
    for epoch in range(...):
        for imgs in loader.epoch(epoch, start=0):   # imgs [B, 3, S, S] float32, ImageNet-normalized
            ...

Sources (`data.loader`):
- `torch`: `fastmask.data.torch_loader.TorchLoader`: the embedded photo set (`data.root: null`) or an
  image folder / file list, PIL decode, RandomResizedCrop(scale=(min_scale, 1), bicubic) + flip,
  a torch DataLoader with `data.num_workers` worker processes (0 = in the main process).
- `dali`: `fastmask.data.dali.DaliLoader` (NVIDIA DALI; GPU JPEG decoding).
- `synthetic`: `fastmask.data.synthetic.SyntheticLoader`: random normalized images generated on the
  device (for benchmarks: no decoding, no host-to-device copy).
- `auto`: dali where `nvidia.dali` imports and the device is a GPU, else torch.
"""
from __future__ import annotations

import importlib.util
from collections.abc import Iterator
from typing import Protocol, runtime_checkable

import numpy as np
import torch


@runtime_checkable
class Loader(Protocol):
    """What the engine needs from a data source (one instance per rank).

    - `batches_per_epoch`: how many batches `epoch(e)` yields on this rank; equal on every rank.
    - `epoch(epoch, start=0)`: yields this rank's batches `imgs [B, 3, S, S]` float32 (the DALI
      loader may be asked for fp16), ImageNet-normalized, on the loader's device, from batch
      `start` on. Deterministic given (seed, epoch, rank, world_size): `epoch(e, start=k)` yields
      exactly the batches k, k+1, ... of `epoch(e)`, which is what makes a resumed run continue
      the uninterrupted one. Ranks see disjoint samples of each epoch; the last partial batch is
      dropped (drop_last).

    - `sample_keys(epoch)`: int64 [batches_per_epoch, B], the global key of every sample this rank
      yields in `epoch` (row t = batch t): unique over the run and the same for a sample whatever
      the world size or per-rank batch (`epoch * num_samples + dataset index` for the file loaders).
      Methods key their random masks and views by it (`fastmask.draws`).
    """

    batches_per_epoch: int

    def epoch(self, epoch: int, start: int = 0) -> Iterator[torch.Tensor]: ...

    def sample_keys(self, epoch: int) -> np.ndarray: ...


def dali_available() -> bool:
    return importlib.util.find_spec("nvidia") is not None and importlib.util.find_spec("nvidia.dali") is not None


def resolve_loader_name(name: str, device: torch.device | str) -> str:
    """'auto' -> 'dali' when nvidia.dali imports and the device is CUDA, else 'torch'."""
    if name != "auto":
        return name
    return "dali" if torch.device(device).type == "cuda" and dali_available() else "torch"


def build_loader(data_cfg, rank: int = 0, world_size: int = 1, seed: int = 0,
                 device: torch.device | str = "cpu") -> Loader:
    """data_cfg: fastmask.engine.config.DataConfig -> a Loader for this rank (see the module docstring).

    Bad input (no images, a corrupt file under data.on_corrupt=fail, fewer images than one global
    batch) raises here, before any training work.
    """
    name = resolve_loader_name(data_cfg.loader, device)
    if name == "torch":
        from .torch_loader import TorchLoader
        return TorchLoader(data_cfg, rank, world_size, seed, device)
    if name == "synthetic":
        from .synthetic import SyntheticLoader
        return SyntheticLoader(data_cfg, rank, world_size, seed, device)
    if name == "dali":
        from .dali import DaliLoader
        return DaliLoader(data_cfg, rank, world_size, seed, device)
    raise ValueError(f"data.loader must be auto|torch|dali|synthetic, got {data_cfg.loader!r}")


__all__ = ["Loader", "build_loader", "resolve_loader_name", "dali_available"]
