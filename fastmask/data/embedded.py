"""The embedded default datasets: real images that ship inside scikit-learn, so nothing is downloaded.

- `embedded_images()`: unlabeled crops cut from scikit-learn's two sample photos (china.jpg,
  flower.jpg, 427x640 each) at many positions, scales and flips: the default pretraining set.
- `embedded_labeled()`: scikit-learn's 1,797 handwritten digits (10 classes), upsampled to RGB:
  the default labeled set for k-NN / linear-probe evaluation.
- `write_image_folder(root, ...)`: writes either set as JPEG files in class subfolders
  (ImageNet-style), for the file loaders (DALI, PIL) and their tests and benchmarks.

All outputs are deterministic (fixed seeds), uint8 HWC numpy arrays.
"""
from __future__ import annotations

import functools
from pathlib import Path

import numpy as np

DEFAULT_COUNT = 512
DEFAULT_SIZE = 128


@functools.lru_cache(maxsize=4)
def embedded_images(count: int = DEFAULT_COUNT, size: int = DEFAULT_SIZE, seed: int = 0) -> np.ndarray:
    """-> uint8 [count, size, size, 3]: square crops of the two sample photos, resized to `size`.

    Crop sides are drawn between 96 px and the full photo height, so the set mixes texture close-ups
    with whole-scene views; every other crop is mirrored.
    """
    from PIL import Image
    from sklearn.datasets import load_sample_images

    photos = [Image.fromarray(img) for img in load_sample_images().images]
    rng = np.random.default_rng(seed)
    out = np.empty((count, size, size, 3), dtype=np.uint8)
    for i in range(count):
        photo = photos[i % len(photos)]
        W, H = photo.size
        side = int(rng.integers(96, H + 1))
        x0, y0 = int(rng.integers(0, W - side + 1)), int(rng.integers(0, H - side + 1))
        crop = photo.crop((x0, y0, x0 + side, y0 + side)).resize((size, size), Image.BICUBIC)
        if i % 2:
            crop = crop.transpose(Image.FLIP_LEFT_RIGHT)
        out[i] = np.asarray(crop)
    return out


@functools.lru_cache(maxsize=4)
def embedded_labeled(size: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """-> (uint8 [1797, size, size, 3], int64 labels [1797] in 0..9): scikit-learn's digits as RGB."""
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    imgs = np.empty((len(digits.images), size, size, 3), dtype=np.uint8)
    for i, d in enumerate(digits.images):  # values 0..16, ink is high
        g = Image.fromarray((d * (255.0 / 16.0)).astype(np.uint8)).resize((size, size), Image.BILINEAR)
        imgs[i] = np.repeat(np.asarray(g)[:, :, None], 3, axis=2)
    return imgs, digits.target.astype(np.int64)


def write_image_folder(root: str | Path, labeled: bool = False, count: int | None = None,
                       quality: int = 90) -> Path:
    """Write an embedded set as JPEGs under root/<class>/<index>.jpg and return root.

    Unlabeled crops go to a single class folder `photos`; the digits go to `0`..`9`.
    """
    from PIL import Image

    root = Path(root)
    if labeled:
        imgs, labels = embedded_labeled()
        names = [str(int(c)) for c in labels]
    else:
        imgs = embedded_images()
        names = ["photos"] * len(imgs)
    n = len(imgs) if count is None else min(count, len(imgs))
    for i in range(n):
        folder = root / names[i]
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(imgs[i]).save(folder / f"{i:05d}.jpg", quality=quality)
    return root
