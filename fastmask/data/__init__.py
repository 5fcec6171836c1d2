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

Views: a method that needs several crops per image (MST's 2 global + N local crops) declares them
as `ViewSpec`s (`Method.view_specs()`); the engine passes them as `views=`. The torch and DALI
loaders then decode each image once at full resolution and cut every view from it (crop window,
resize, flip per view; colour augmentations stay with the method, on the device), and a batch is a
list of tensors, one [B, 3, S_v, S_v] per view. Without `views` a batch is one tensor, cut as
before (`data.img_size`, `data.min_scale`, `data.hflip`). The synthetic loader ignores `views`:
methods cut their views from its one batch themselves.
"""
from __future__ import annotations

import importlib.util
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import numpy as np
import torch


@dataclass(frozen=True)
class ViewSpec:
    """One view a method needs of every sample: a RandomResizedCrop of the decoded full-resolution image.

    size: output side in pixels (square); scale: area fraction range of the crop; ratio: aspect range
    (log-uniform); hflip: flip with probability 0.5. E.g. DINO/MST: 2 x ViewSpec(224, (0.4, 1.0)) +
    8 x ViewSpec(96, (0.05, 0.4)).
    """

    size: int
    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    hflip: bool = True


def check_views(views: Sequence[ViewSpec] | None) -> list[str]:
    """Problems with a list of view specs (empty list: fine; None: no views, the single crop)."""
    if views is None:
        return []
    if len(views) == 0:
        return ["views must hold at least one ViewSpec (or be None for the single crop)"]
    problems = []
    for i, v in enumerate(views):
        if not isinstance(v, ViewSpec):
            problems.append(f"view {i} must be a ViewSpec, got {type(v).__name__}")
            continue
        if v.size < 1:
            problems.append(f"view {i}: size must be >= 1, got {v.size}")
        if not 0.0 < v.scale[0] <= v.scale[1] <= 1.0:
            problems.append(f"view {i}: scale must satisfy 0 < min <= max <= 1, got {v.scale}")
        if not 0.0 < v.ratio[0] <= v.ratio[1]:
            problems.append(f"view {i}: ratio must satisfy 0 < min <= max, got {v.ratio}")
    return problems


@runtime_checkable
class Loader(Protocol):
    """What the engine needs from a data source (one instance per rank).

    - `batches_per_epoch`: how many batches `epoch(e)` yields on this rank; equal on every rank.
    - `epoch(epoch, start=0)`: yields this rank's batches `imgs [B, 3, S, S]` float32 (the DALI
      loader may be asked for fp16), or with `views` a list of [B, 3, S_v, S_v], one per view,
      ImageNet-normalized, on the loader's device, from batch
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

    def epoch(self, epoch: int, start: int = 0) -> Iterator[torch.Tensor | list[torch.Tensor]]: ...

    def sample_keys(self, epoch: int) -> np.ndarray: ...


def dali_available() -> bool:
    return importlib.util.find_spec("nvidia") is not None \
        and importlib.util.find_spec("nvidia.dali") is not None


def resolve_loader_name(name: str, device: torch.device | str) -> str:
    """'auto' -> 'dali' when nvidia.dali imports and the device is CUDA, else 'torch'."""
    if name != "auto":
        return name
    return "dali" if torch.device(device).type == "cuda" and dali_available() else "torch"


def build_loader(data_cfg, rank: int = 0, world_size: int = 1, seed: int = 0,
                 device: torch.device | str = "cpu", views: Sequence[ViewSpec] | None = None) -> Loader:
    """data_cfg: fastmask.engine.config.DataConfig -> a Loader for this rank (see the module docstring).
    views: the crops to cut from every image (None: one crop per image, as configured in data_cfg).

    Bad input (no images, a corrupt file under data.on_corrupt=fail, fewer images than one global
    batch, a bad view spec) raises here, before any training work.
    """
    name = resolve_loader_name(data_cfg.loader, device)
    if name == "torch":
        from .torch_loader import TorchLoader
        return TorchLoader(data_cfg, rank, world_size, seed, device, views=views)
    if name == "synthetic":
        from .synthetic import SyntheticLoader
        return SyntheticLoader(data_cfg, rank, world_size, seed, device)
    if name == "dali":
        from .dali import DaliLoader
        return DaliLoader(data_cfg, rank, world_size, seed, device, views=views)
    raise ValueError(f"data.loader must be auto|torch|dali|synthetic, got {data_cfg.loader!r}")


__all__ = ["Loader", "ViewSpec", "check_views", "build_loader", "resolve_loader_name", "dali_available"]
