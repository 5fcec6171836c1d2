"""Labeled image sets for evaluation and features of a frozen encoder.

    xtr, ytr, xte, yte, classes = shapes_labeled_set()           # the default: generated shapes, two splits
    imgs, labels, classes = embedded_labeled_set()               # scikit-learn's digits
    imgs, labels, classes = image_folder_set("data/val")          # class subfolders of image files
    split = fixed_split(labels, test_fraction=0.2)                # (train_idx, test_idx), seed-fixed
    x = to_model_input(imgs, img_size)                            # float32 [N, 3, S, S], ImageNet-normalized
    feats = extract_features(encoder, x, pool="cls")              # float32 [N, D]

Images stay uint8 HWC until `to_model_input`, which resizes them (bilinear, antialiased) to the
model's input size and applies the ImageNet normalization every fastmask loader applies.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".ppm", ".pgm")


def shapes_labeled_set(size: int = 64) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, list[str]]:
    """-> (uint8 train images [5000, size, size, 3], int64 train labels, test images [2000, ...], test
    labels, class names): the labelled splits of `fastmask.data.shapes` (held out from pretraining)."""
    from fastmask.data import shapes

    xtr, ytr = shapes.shapes_set("train", shapes.TRAIN_COUNT, size)
    xte, yte = shapes.shapes_set("test", shapes.TEST_COUNT, size)
    return xtr, ytr, xte, yte, list(shapes.CLASSES)


def embedded_labeled_set() -> tuple[np.ndarray, np.ndarray, list[str]]:
    """-> (uint8 [1797, 32, 32, 3], int64 [1797], class names '0'..'9'): scikit-learn's digits."""
    from fastmask.data.embedded import embedded_labeled

    imgs, labels = embedded_labeled()
    return imgs, labels, [str(i) for i in range(10)]


def image_folder_set(root: str | Path, size: int = 64) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Read root/<class>/<image> files -> (uint8 [N, size, size, 3], int64 [N], sorted class names).

    Every image is converted to RGB and resized to size x size (no crop: small eval sets are often
    not square-centred). Unreadable files raise one error naming each of them.
    """
    from PIL import Image

    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"labeled data folder {root} does not exist")
    classes = sorted(d.name for d in root.iterdir() if d.is_dir())
    if len(classes) < 2:
        raise ValueError(f"{root} must hold at least two class subfolders, found {classes}")
    files: list[tuple[Path, int]] = []
    for c, name in enumerate(classes):
        files += [(f, c) for f in sorted((root / name).rglob("*")) if f.suffix.lower() in _EXTS]
    if not files:
        raise ValueError(f"no image files ({', '.join(_EXTS)}) under {root}")
    imgs = np.empty((len(files), size, size, 3), dtype=np.uint8)
    bad = []
    for i, (f, _) in enumerate(files):
        try:
            with Image.open(f) as im:
                imgs[i] = np.asarray(im.convert("RGB").resize((size, size), Image.BILINEAR))
        except Exception as e:  # PIL raises many types for corrupt files
            bad.append(f"{f}: {e}")
    if bad:
        raise ValueError(f"{len(bad)} unreadable image file(s): "
                         + "; ".join(" ".join(b.split()) for b in bad))
    return imgs, np.array([c for _, c in files], dtype=np.int64), classes


def fixed_split(labels: np.ndarray, test_fraction: float = 0.2,
                seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """-> (train indices, test indices): a seeded, per-class (stratified) split, the same every run."""
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    rng = np.random.default_rng(seed)
    train, test = [], []
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        n_test = max(1, int(round(len(idx) * test_fraction)))
        test.append(idx[:n_test])
        train.append(idx[n_test:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(test))


def to_model_input(imgs: np.ndarray | torch.Tensor, img_size: int) -> torch.Tensor:
    """uint8 [N, H, W, 3] -> float32 [N, 3, img_size, img_size], scaled to [0, 1] then ImageNet-normalized."""
    x = torch.as_tensor(imgs)
    if x.dtype != torch.uint8 or x.dim() != 4 or x.shape[-1] != 3:
        raise ValueError(f"images must be uint8 [N, H, W, 3], got {x.dtype} {tuple(x.shape)}")
    x = x.permute(0, 3, 1, 2).float().div_(255.0)
    if x.shape[-2:] != (img_size, img_size):
        x = F.interpolate(x, size=(img_size, img_size), mode="bilinear", align_corners=False, antialias=True)
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (x - mean) / std


def pool_tokens(tokens: torch.Tensor, pool: str) -> torch.Tensor:
    """[B, 1+L, D] tokens of `forward_features` -> [B, D]: "cls" (token 0) or "mean" (the patch tokens'
    mean). The one definition of the pools, for probes and for training on a pool."""
    return tokens[:, 0] if pool == "cls" else tokens[:, 1:].mean(dim=1)


@torch.no_grad()
def extract_features(encoder: nn.Module, x: torch.Tensor, pool: str | tuple[str, ...] = "cls",
                     batch_size: int = 128,
                     device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32):
    """x float32 [N, 3, S, S] -> float32 [N, D] on the CPU, from `encoder.forward_features(x)` [B, 1+L, D].

    pool: "cls" (token 0, the MAE linear-probe feature) or "mean" (mean of the patch tokens, MAE's
    global pool), or a tuple of them -> a tuple of [N, D] tensors from one pass. The encoder runs
    in eval mode under no_grad; `dtype` other than fp32 runs it under autocast.
    """
    pools = (pool,) if isinstance(pool, str) else tuple(pool)
    if not pools or any(p not in ("cls", "mean") for p in pools):
        raise ValueError(f"pool must be 'cls' or 'mean' (or a tuple of them), got {pool!r}")
    if not hasattr(encoder, "forward_features"):
        raise TypeError(f"{type(encoder).__name__} has no forward_features(imgs) -> [B, N, D]")
    device = torch.device(device)
    was_training = encoder.training
    encoder.eval()
    out: list[list[torch.Tensor]] = [[] for _ in pools]
    try:
        for i in range(0, len(x), batch_size):
            xb = x[i:i + batch_size].to(device, non_blocking=True)
            with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
                tokens = encoder.forward_features(xb)
            for p, acc in zip(pools, out):
                acc.append(pool_tokens(tokens, p).float().cpu())
    finally:
        encoder.train(was_training)
    feats = tuple(torch.cat(acc) for acc in out)
    return feats[0] if isinstance(pool, str) else feats
