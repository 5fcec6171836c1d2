"""Plain PyTorch loader: PIL decode + RandomResizedCrop + flip in DataLoader workers, normalize on device.

    loader = TorchLoader(cfg.data, rank, world_size, seed=0, device="cpu")
    for imgs in loader.epoch(epoch, start=k):      # imgs [B, 3, S, S] float32, ImageNet-normalized

Sources: `data.root: null` = the embedded photo set (JPEGs written once into the cache folder),
else an image folder with class subfolders or a .txt file list (`fastmask.data.files`, which also checks
every file once before training: `data.on_corrupt=fail` stops there naming the bad paths, `skip`
warns naming them and leaves them out).

Determinism, which exact resume and the 1-rank = N-rank equivalence rely on:
- Order: each epoch, one permutation of all samples drawn from (seed, epoch). A global micro-batch
  of B * world_size samples is cut into world_size blocks of B: micro-batch t of rank r is
  perm[t*G + r*B : t*G + (r+1)*B] with G = B * world_size. So the union over ranks of micro-batch t
  is the same samples whatever the world size (a 2-rank run at B sees what a 1-rank run sees at 2B).
  The tail that does not fill a global batch is dropped (drop_last).
- Augmentation: the crop window (torchvision's RandomResizedCrop algorithm, `rrc_windows`) and the
  flip of sample i in epoch e come from a generator seeded with (seed, e, i), independent of the
  worker, the rank and the batch position.
- `epoch(e, start=k)` builds the DataLoader over the remaining batches only, so it yields exactly
  the batches k, k+1, ... of `epoch(e)`.

Views (`views=[ViewSpec, ...]`, a method's multi-crop): each image is decoded once at full
resolution and every view cut from it (its window, bicubic resize to S_v x S_v, flip); view v of
sample i in epoch e uses `fastmask.data.dali.view_params`' draws keyed by (seed, e, i, v), the
windows the DALI loader cuts too. A batch is then a list of [B, 3, S_v, S_v], one per view.

The workers return uint8 [B, S, S, 3] (a quarter of the bytes of float32 over the worker pipe and
the host-to-device copy); conversion to float and normalization happen on the device.
"""
from __future__ import annotations

import warnings
from collections.abc import Iterator

import numpy as np
import torch

from . import ViewSpec, check_views
from .dali import IMAGENET_MEAN, IMAGENET_STD, rrc_windows, view_params
from .files import check_loader_args


class _Samples(torch.utils.data.Dataset):
    """Item k -> uint8 [S, S, 3]: sample `indices[k]` cropped, resized and maybe flipped; with views,
    a tuple of uint8 [S_v, S_v, 3], one per view, all cut from the one decoded image."""

    def __init__(self, files: list[str], sizes: np.ndarray,
                 indices: np.ndarray, seed: int, epoch: int, img_size: int, min_scale: float,
                 hflip: bool, on_corrupt: str, views: list[ViewSpec] | None = None):
        self.files, self.sizes = files, sizes
        self.indices, self.seed, self.epoch = indices, seed, epoch
        self.img_size, self.min_scale, self.hflip, self.on_corrupt = img_size, min_scale, hflip, on_corrupt
        self.views = views
        self._reported: set[str] = set()

    def __len__(self) -> int:
        return len(self.indices)

    def _open(self, i: int):
        from PIL import Image, ImageOps

        with Image.open(self.files[i]) as im:
            # EXIF orientation applied, as the sizes recorded at validation (and DALI) assume.
            return ImageOps.exif_transpose(im).convert("RGB")

    def __getitem__(self, k: int) -> torch.Tensor | tuple[torch.Tensor, ...]:
        n = len(self.sizes)
        i = int(self.indices[k])
        # A file that decoded at the pre-training check but fails now (changed on disk, flaky
        # storage): skip mode substitutes the next sample, so a batch never comes up short and the
        # run never dies mid-epoch; each bad path is reported once per worker.
        for attempt in range(n):
            j = (i + attempt) % n
            try:
                img = self._open(j)
                break
            except Exception as e:  # noqa: BLE001 - any decode failure of this one file
                path = self.files[j]
                if self.on_corrupt == "fail":
                    raise RuntimeError(f"cannot decode image {path}: {type(e).__name__}: {e} "
                                       f"(data.on_corrupt=fail)") from e
                if path not in self._reported:
                    self._reported.add(path)
                    warnings.warn(f"skipping image {path} that cannot be decoded: {type(e).__name__}: {e}",
                                  stacklevel=2)
        else:
            raise RuntimeError("no image of the dataset can be decoded")
        if self.views is not None:
            # The windows fit the image decoded (a substitute's own size), keyed by the sample asked for.
            windows, flips = view_params(self.seed, self.epoch, np.array([i]), np.array([img.size]),
                                         self.views)
            return tuple(_cut(img, windows[0, v], v_spec.size, bool(flips[0, v]))
                         for v, v_spec in enumerate(self.views))
        rng = np.random.default_rng([self.seed, self.epoch, i])
        window = rrc_windows(np.array([img.size]), rng, scale=(self.min_scale, 1.0))[0]
        flip = bool(rng.integers(0, 2)) if self.hflip else False
        return _cut(img, window, self.img_size, flip)


def _cut(img, window: np.ndarray, size: int, flip: bool) -> torch.Tensor:
    """PIL image, window (x0, y0, w, h) -> uint8 [size, size, 3]: the window, bicubic, maybe flipped."""
    from PIL import Image

    x0, y0, w, h = (int(v) for v in window)
    out = img.resize((size, size), Image.BICUBIC, box=(x0, y0, x0 + w, y0 + h))
    if flip:
        out = out.transpose(Image.FLIP_LEFT_RIGHT)
    return torch.from_numpy(np.asarray(out, dtype=np.uint8).copy())


class TorchLoader:
    """One rank's loader over the embedded set or an image folder. See the module docstring.

    views: `fastmask.data.ViewSpec`s to cut from every image (None: the one crop of data_cfg).
    Attributes: batches_per_epoch, num_samples (usable images), skipped ([(path, reason)]).
    """

    def __init__(self, data_cfg, rank: int = 0, world_size: int = 1, seed: int = 0,
                 device: torch.device | str = "cpu", views: list[ViewSpec] | None = None):
        problems = check_loader_args(data_cfg, rank, world_size) + check_views(views)
        if data_cfg.num_workers < 0:
            problems.append(f"data.num_workers must be >= 0, got {data_cfg.num_workers}")
        if problems:
            raise ValueError("torch loader: " + "; ".join(problems))
        self.cfg = data_cfg
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.device = torch.device(device)
        self.views = list(views) if views is not None else None
        from .files import image_files

        # data.root=None: the embedded photo set, written once as JPEGs into the cache folder
        # (fastmask.data.files.embedded_root), so this loader and DALI read the very same files.
        self._files, self._sizes, self.skipped = image_files(data_cfg)
        self.num_samples = len(self._sizes)
        G = data_cfg.batch_size * world_size
        self.batches_per_epoch = self.num_samples // G
        if self.batches_per_epoch == 0:
            raise ValueError(f"{self.num_samples} usable image(s) do not fill one global batch of "
                             f"{data_cfg.batch_size} x {world_size} rank(s) = {G}")
        mean = torch.tensor(IMAGENET_MEAN, dtype=torch.float32).view(1, 3, 1, 1) * 255
        std = torch.tensor(IMAGENET_STD, dtype=torch.float32).view(1, 3, 1, 1) * 255
        self._mean, self._std = mean.to(self.device), std.to(self.device)

    def __len__(self) -> int:
        return self.batches_per_epoch

    def epoch_indices(self, epoch: int) -> np.ndarray:
        """-> int64 [batches_per_epoch, B]: the sample indices of this rank's batches of `epoch`."""
        B, W = self.cfg.batch_size, self.world_size
        perm = np.random.default_rng([self.seed, epoch]).permutation(self.num_samples)
        glob = perm[:self.batches_per_epoch * B * W].reshape(self.batches_per_epoch, W, B)
        return glob[:, self.rank]

    def sample_keys(self, epoch: int) -> np.ndarray:
        """-> int64 [batches_per_epoch, B]: each sample's global key, epoch * N + its index (N samples)."""
        return epoch * self.num_samples + self.epoch_indices(epoch).astype(np.int64)

    def epoch(self, epoch: int, start: int = 0) -> Iterator[torch.Tensor | list[torch.Tensor]]:
        """Yield this rank's batches imgs [B, 3, S, S] float32 (normalized, on device), from `start` on
        (with views: lists of [B, 3, S_v, S_v])."""
        if not 0 <= start <= self.batches_per_epoch:
            raise ValueError(f"start must be in [0, {self.batches_per_epoch}], got {start}")
        return self._batches(epoch, start)

    def _batches(self, epoch: int, start: int) -> Iterator[torch.Tensor | list[torch.Tensor]]:
        if start == self.batches_per_epoch:
            return
        cfg = self.cfg
        indices = self.epoch_indices(epoch)[start:].reshape(-1)
        ds = _Samples(self._files, self._sizes, indices, self.seed, epoch, cfg.img_size,
                      cfg.min_scale, cfg.hflip, cfg.on_corrupt, self.views)
        cuda = self.device.type == "cuda"
        dl = torch.utils.data.DataLoader(
            ds, batch_size=cfg.batch_size, shuffle=False, drop_last=True, num_workers=cfg.num_workers,
            pin_memory=cuda, persistent_workers=False,
            # Its own generator: a DataLoader draws its workers' base seed from torch's global RNG
            # otherwise, which would shift the training stream of a resumed run.
            generator=torch.Generator().manual_seed(self.seed * 1_000_003 + epoch),
            prefetch_factor=4 if cfg.num_workers > 0 else None)
        for batch in dl:  # uint8 [B, S, S, 3], or a list of them (views)
            yield self._normalize(batch) if self.views is None else [self._normalize(b) for b in batch]

    def _normalize(self, batch: torch.Tensor) -> torch.Tensor:
        """uint8 [B, S, S, 3] -> float32 [B, 3, S, S] on the device, ImageNet-normalized."""
        x = batch.to(self.device, non_blocking=True).permute(0, 3, 1, 2).float()
        return x.sub_(self._mean).div_(self._std).contiguous()
