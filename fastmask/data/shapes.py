"""A generated, labelled image set where the class is a shape and everything else is noise.

    img = shapes_image(seed=0, split="test", index=7)         # uint8 [64, 64, 3]
    imgs, labels = shapes_set("test", count=2000)              # uint8 [N, 64, 64, 3], int64 [N]
    write_shapes_folder(root)                                   # root/images/00000.jpg ... (unlabelled)

Each image holds one large shape of one of `CLASSES` (the label) at a random position, size,
rotation (within +-25 degrees), aspect and colour, over a random low-contrast background (a colour
gradient or low-frequency colour noise), with 0-3 small fragments of random shapes as clutter and
pixel noise on top. Nothing but the large shape's outline tells the classes apart: colours,
background and clutter are drawn independently of the label, so pixel statistics, and a random
encoder that mostly sees them, score near chance, while a model that learned shapes scores high
(the figures, and how they were measured, are in `benchmarks/learning.py` and its results).

Deterministic from (seed, split, index): the i-th image of a split is the same whatever else is
generated, in any order or process. Splits draw from disjoint streams: "pretrain" (unlabelled,
for self-supervised training), "train" (the labelled set k-NN and linear probes fit on) and
"test" (the held-out labelled set they are scored on). Labels are balanced: index % len(CLASSES).

Sizes used across fastmask (one home each, here): `PRETRAIN_COUNT` unlabelled images (the
`data.dataset=shapes` pretraining set, written once as JPEGs by `fastmask.data.files.embedded_root`),
`TRAIN_COUNT` / `TEST_COUNT` labelled ones for evaluation (`shapes_set`, cached as .npy files in the
cache folder). `VERSION` names every cached file: bump it whenever an image would change.
"""
from __future__ import annotations

import functools
import math
import os
import tempfile
from pathlib import Path

import numpy as np

CLASSES = ("disk", "ring", "triangle", "square", "star", "plus", "arrow", "crescent", "ell", "heart")
SPLITS = {"pretrain": 0, "train": 1, "test": 2}
DEFAULT_SIZE = 64
PRETRAIN_COUNT = 20000
TRAIN_COUNT = 5000
TEST_COUNT = 2000
VERSION = 2
SUPERSAMPLE = 4  # shapes are drawn at 4x and box-filtered down: antialiased edges
MAX_TURN = 25 / 360  # the labelled shape turns at most 25 degrees either way (the augmentations of
# self-supervised methods never rotate, so a free rotation would be a nuisance no method can learn away)


def _regular(n: int, r: float = 1.0, phase: float = 0.0) -> list[np.ndarray]:
    a = phase + 2 * math.pi * np.arange(n) / n
    return [np.stack([r * np.cos(a), r * np.sin(a)], 1)]


def _circle(r: float = 1.0, cx: float = 0.0, cy: float = 0.0, n: int = 48) -> np.ndarray:
    a = 2 * math.pi * np.arange(n) / n
    return np.stack([cx + r * np.cos(a), cy + r * np.sin(a)], 1)


def _star() -> list[np.ndarray]:
    a = -math.pi / 2 + math.pi * np.arange(10) / 5
    r = np.where(np.arange(10) % 2 == 0, 1.0, 0.42)
    return [np.stack([r * np.cos(a), r * np.sin(a)], 1)]


def _heart() -> list[np.ndarray]:
    t = 2 * math.pi * np.arange(64) / 64
    x = 16 * np.sin(t) ** 3
    y = -(13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t))
    pts = np.stack([x, y], 1)
    pts -= pts.mean(0)
    return [pts / np.abs(pts).max()]


_P = 0.32  # arm half-width of the plus, stroke of the ell, shaft of the arrow
# Outlines in unit coordinates (about [-1, 1]^2, y down). Each class is a list of polygons: the
# first is filled, the others are holes cut out of it.
_OUTLINES = {
    "disk": lambda: [_circle()],
    "ring": lambda: [_circle(), _circle(0.55)],
    "triangle": lambda: _regular(3, 1.0, -math.pi / 2),
    "square": lambda: _regular(4, 1.0, math.pi / 4),
    "star": _star,
    "plus": lambda: [np.array([(-_P, -1), (_P, -1), (_P, -_P), (1, -_P), (1, _P), (_P, _P), (_P, 1), (-_P, 1),
                               (-_P, _P), (-1, _P), (-1, -_P), (-_P, -_P)], float)],
    "arrow": lambda: [np.array([(-1, -_P / 1.3), (0.15, -_P / 1.3), (0.15, -0.8), (1, 0), (0.15, 0.8),
                                (0.15, _P / 1.3), (-1, _P / 1.3)], float)],
    "crescent": lambda: [_circle(), _circle(0.85, 0.45, -0.1)],
    "ell": lambda: [np.array([(-0.8, -1), (-0.8 + 2 * _P, -1), (-0.8 + 2 * _P, 1 - 2 * _P), (0.8, 1 - 2 * _P),
                              (0.8, 1), (-0.8, 1)], float)],
    "heart": _heart,
}


def _shape_mask(rng: np.random.Generator, cls: int, size: int, radius: float, center: tuple[float, float],
                cut: bool = False, max_turn: float = 0.5) -> np.ndarray:
    """-> float32 [size, size] coverage in [0, 1] of shape `cls` drawn with a random rotation (up to
    `max_turn` of a full turn either way) and aspect."""
    from PIL import Image, ImageDraw

    S = size * SUPERSAMPLE
    theta = rng.uniform(-max_turn, max_turn) * 2 * math.pi
    aspect = math.exp(rng.uniform(-0.2, 0.2))
    c, s = math.cos(theta), math.sin(theta)
    scale = np.array([radius * aspect, radius / aspect]) * SUPERSAMPLE
    rot = np.array([[c, -s], [s, c]])
    canvas = Image.new("L", (S, S), 0)
    draw = ImageDraw.Draw(canvas)
    for k, poly in enumerate(_OUTLINES[CLASSES[cls]]()):
        pts = (poly * scale) @ rot.T + np.array(center) * SUPERSAMPLE
        draw.polygon([tuple(p) for p in pts.tolist()], fill=0 if k else 255)
    m = np.asarray(canvas.reduce(SUPERSAMPLE), dtype=np.float32) / 255  # box filter, in C
    if cut:  # a fragment: keep one side of a random line through the shape
        yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
        a = rng.uniform(0, 2 * math.pi)
        off = rng.uniform(-0.3, 0.3) * radius
        side = (xx - center[0]) * math.cos(a) + (yy - center[1]) * math.sin(a) > off
        m = m * side
    return m


def _random_colour(rng: np.random.Generator) -> np.ndarray:
    return rng.uniform(0, 1, 3).astype(np.float32)


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """-> float32 [size, size, 3] in [0, 1]: a linear gradient or low-frequency noise between a random
    colour and colours near it (low contrast, so the background stays behind the shape)."""
    a = _random_colour(rng)
    b = np.clip(a + rng.normal(0, 0.15, 3), 0, 1).astype(np.float32)
    noise = bool(rng.integers(0, 2))
    angle = rng.uniform(0, 2 * math.pi)
    if noise:  # bicubic upsampling of a 2x2 .. 5x5 grid of colours near `a`
        from PIL import Image

        g = int(rng.integers(2, 6))
        coarse = np.clip(a + rng.normal(0, 0.15, (g, g, 3)), 0, 1).astype(np.float32)
        img = Image.fromarray((coarse * 255).astype(np.uint8)).resize((size, size), Image.BICUBIC)
        return np.asarray(img, dtype=np.float32) / 255
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    u = xx * math.cos(angle) + yy * math.sin(angle)
    t = ((u - u.min()) / max(float(u.max() - u.min()), 1e-6))[..., None]  # gradient a -> b along `angle`
    return a * (1 - t) + b * t


def shapes_image(seed: int, split: str, index: int, size: int = DEFAULT_SIZE) -> np.ndarray:
    """-> uint8 [size, size, 3]: image `index` of `split`; its label is `index % len(CLASSES)`."""
    return shapes_image_and_mask(seed, split, index, size)[0]


def shapes_image_and_mask(seed: int, split: str, index: int, size: int = DEFAULT_SIZE
                          ) -> tuple[np.ndarray, np.ndarray]:
    """-> (`shapes_image`'s uint8 [size, size, 3], float32 [size, size]: the labelled shape's coverage
    of each pixel in [0, 1]; it is drawn last, over the clutter, so nothing hides it)."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {tuple(SPLITS)}, got {split!r}")
    if size < 16:
        raise ValueError(f"size must be >= 16, got {size}")
    rng = np.random.default_rng([seed, SPLITS[split], index])
    label = index % len(CLASSES)
    img = _background(rng, size)
    for _ in range(int(rng.integers(0, 4))):  # clutter: fragments of smaller shapes, any class
        r = rng.uniform(0.06, 0.12) * size
        m = _shape_mask(rng, int(rng.integers(0, len(CLASSES))), size, r,
                        tuple(rng.uniform(0, size, 2)), cut=True)
        img = img * (1 - m[..., None]) + _random_colour(rng) * m[..., None]
    r = rng.uniform(0.25, 0.4) * size
    center = tuple(rng.uniform(r * 0.8, size - r * 0.8, 2))
    m = _shape_mask(rng, label, size, r, center, max_turn=MAX_TURN)
    under = (img * m[..., None]).sum((0, 1)) / max(float(m.sum()), 1e-6)
    for _ in range(16):  # a colour that stands out from what it covers
        fg = _random_colour(rng)
        if np.linalg.norm(fg - under) > 0.45:
            break
    img = img * (1 - m[..., None]) + fg * m[..., None]
    img = img + rng.normal(0, rng.uniform(0.0, 0.04), img.shape).astype(np.float32)
    return (np.clip(img, 0, 1) * 255 + 0.5).astype(np.uint8), m


@functools.lru_cache(maxsize=8)
def shapes_set(split: str, count: int, size: int = DEFAULT_SIZE, seed: int = 0,
               cache: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """-> (uint8 [count, size, size, 3], int64 labels [count]): images 0..count-1 of `split`.

    With `cache`, the images are read from (or written once, atomically, to) a .npy file in the
    cache folder (`$FASTMASK_CACHE`), since generating thousands takes tens of seconds.
    """
    from .files import cache_dir

    labels = np.arange(count, dtype=np.int64) % len(CLASSES)
    path = cache_dir() / f"shapes-{split}-s{seed}-{count}x{size}-v{VERSION}.npy"
    if cache and path.is_file():
        return np.load(path), labels
    imgs = np.stack([shapes_image(seed, split, i, size) for i in range(count)])
    if cache:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=path.name + ".tmp-", dir=path.parent)
        with os.fdopen(fd, "wb") as f:
            np.save(f, imgs)
        os.replace(tmp, path)
    return imgs, labels


def write_shapes_folder(root: str | Path, split: str = "pretrain", count: int | None = None,
                        size: int = DEFAULT_SIZE, seed: int = 0, quality: int = 95) -> Path:
    """Write images 0..count-1 (default PRETRAIN_COUNT) of `split` as JPEGs root/images/<index>.jpg
    (one folder: no labels) -> root."""
    from PIL import Image

    count = PRETRAIN_COUNT if count is None else count
    folder = Path(root) / "images"
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        Image.fromarray(shapes_image(seed, split, i, size)).save(folder / f"{i:05d}.jpg", quality=quality)
    return Path(root)


__all__ = ["CLASSES", "SPLITS", "shapes_image", "shapes_set", "write_shapes_folder"]
