"""Image files for the file loaders: list them, check them once, and hand back the good ones.

    files, sizes, bad = image_files(data_cfg)        # data_cfg: fastmask.engine.config.DataConfig

- `list_image_files(root)`: an ImageNet-style folder (class subfolders, searched recursively) or a
  `.txt` file list (one path per line, relative paths taken from the list's folder, an optional
  trailing integer label ignored); `None` = the embedded photo set, written once as JPEGs into the
  cache folder (`embedded_root()`).
- `validate_files(files, threads)`: opens every file with PIL and decodes it at 1/8 scale (JPEG DCT
  scaling makes that a few times cheaper than a full decode, yet it reads every entropy-coded byte,
  so truncated or garbled files fail). DALI's decoders stop the whole pipeline on such a file in
  the middle of an epoch; checking up front is what lets a run skip it or refuse to start. Results
  are cached per root in the cache folder, keyed by each file's (mtime_ns, size), so only new or
  changed files are decoded again. Also records each image's size after EXIF orientation, which
  the DALI loader needs to draw its crop windows.
- `image_files(data_cfg)`: both, then `data_cfg.on_corrupt`: "skip" warns once naming every bad
  file with its reason and drops them; "fail" raises `CorruptImageError` naming them, before any
  training work.

The cache folder is `$FASTMASK_CACHE`, else `~/.cache/fastmask`.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

# What DALI's image decoders read (and PIL can check). No GIF: DALI does not decode it.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".pnm", ".ppm",
                    ".pgm", ".pbm", ".jp2")
_CACHE_VERSION = 1
_EXIF_ORIENTATION = 0x0112


class CorruptImageError(RuntimeError):
    """Image files that cannot be decoded, found before training (data.on_corrupt=fail)."""


def cache_dir() -> Path:
    return Path(os.environ.get("FASTMASK_CACHE") or Path.home() / ".cache" / "fastmask")


def embedded_root() -> Path:
    """-> folder holding the embedded photo set as JPEGs (`photos/00000.jpg` ...), written once.

    Written to a temporary sibling and renamed into place, so concurrent ranks never see half a set.
    """
    from fastmask.data.embedded import DEFAULT_COUNT, DEFAULT_SIZE, write_image_folder

    root = cache_dir() / f"embedded-photos-{DEFAULT_COUNT}x{DEFAULT_SIZE}-v1"
    if root.is_dir():
        return root
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=root.name + ".tmp-", dir=root.parent))
    write_image_folder(tmp)
    try:
        os.replace(tmp, root)
    except OSError:  # another rank got there first
        if not root.is_dir():
            raise
        import shutil
        shutil.rmtree(tmp, ignore_errors=True)
    return root


def list_image_files(root: str | Path | None) -> list[str]:
    """-> sorted absolute paths of the images under `root` (folder or .txt list; None = embedded set)."""
    if root is None:
        root = embedded_root()
    path = Path(root).expanduser()
    if path.is_file():
        if path.suffix.lower() != ".txt":
            raise ValueError(f"data.root {str(root)!r} is a file but not a .txt file list")
        files = []
        for line in path.read_text().splitlines():
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            parts = line.rsplit(maxsplit=1)
            # "path label" lists (ImageNet's train_cls.txt style): drop a trailing integer label.
            if len(parts) == 2 and parts[1].lstrip("-").isdigit() and not (path.parent / line).exists():
                line = parts[0]
            p = Path(line).expanduser()
            files.append(str(p if p.is_absolute() else (path.parent / p).resolve()))
        missing = [f for f in files if not os.path.isfile(f)]
        if missing:
            raise FileNotFoundError(f"file list {str(path)!r} names {len(missing)} missing file(s), "
                                    f"first: {missing[:5]}")
        if not files:
            raise ValueError(f"file list {str(path)!r} names no files")
        return files
    if not path.is_dir():
        raise FileNotFoundError(f"data.root {str(root)!r} is neither a folder nor a .txt file list")
    files = []
    for dirpath, dirnames, filenames in os.walk(path, followlinks=True):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        files.extend(os.path.join(dirpath, f) for f in filenames
                     if f.lower().endswith(IMAGE_EXTENSIONS) and not f.startswith("."))
    if not files:
        raise ValueError(f"data.root {str(root)!r} holds no image files "
                         f"({', '.join(IMAGE_EXTENSIONS)}) in it or its subfolders")
    return sorted(os.path.abspath(f) for f in files)


def _check_one(path: str) -> tuple[int, int, str | None]:
    """-> (width, height after EXIF orientation, None) or (0, 0, reason)."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            w, h = im.size
            orientation = im.getexif().get(_EXIF_ORIENTATION, 1)
            # DCT-domain downscale for JPEG (a no-op for other formats): every byte is still decoded.
            im.draft("RGB", (max(1, w // 8), max(1, h // 8)))
            im.load()
        if orientation in (5, 6, 7, 8):  # transposed orientations: DALI rotates these (adjust_orientation)
            w, h = h, w
        if w < 1 or h < 1:
            return 0, 0, "empty image"
        return w, h, None
    except Exception as e:  # noqa: BLE001 - any failure to decode is what we are looking for
        return 0, 0, f"{type(e).__name__}: {e}"


def _cache_path(files: list[str], key: str | None) -> Path:
    ident = key if key is not None else (os.path.dirname(files[0]) if files else "")
    return cache_dir() / "validated" / (hashlib.sha1(ident.encode()).hexdigest()[:16] + ".json")


def validate_files(files: list[str], threads: int = 0, cache_key: str | None = None,
                   use_cache: bool = True) -> tuple[np.ndarray, list[tuple[str, str]]]:
    """-> (sizes int64 [N, 2] as (width, height), 0 for bad files; [(path, reason)] of the bad ones).

    `cache_key` names the cache entry (the data root); files whose (mtime_ns, size) match the cached
    record are not opened again.
    """
    threads = threads or min(32, (os.cpu_count() or 1) * 2)
    cpath = _cache_path(files, cache_key)
    cached: dict = {}
    if use_cache and cpath.is_file():
        try:
            blob = json.loads(cpath.read_text())
            if blob.get("version") == _CACHE_VERSION:
                cached = blob["files"]
        except (OSError, ValueError, KeyError):
            cached = {}

    with ThreadPoolExecutor(max_workers=threads) as pool:
        stats = list(pool.map(os.stat, files))
        keys = [(s.st_mtime_ns, s.st_size) for s in stats]
        todo = [i for i, (f, k) in enumerate(zip(files, keys))
                if f not in cached or tuple(cached[f][:2]) != k]
        checked = list(pool.map(_check_one, [files[i] for i in todo]))

    records = {f: cached[f] for f in files if f in cached}
    for i, (w, h, err) in zip(todo, checked):
        records[files[i]] = [keys[i][0], keys[i][1], w, h, err]
    if use_cache and todo:
        try:
            cpath.parent.mkdir(parents=True, exist_ok=True)
            tmp = cpath.with_suffix(f".tmp{os.getpid()}")
            tmp.write_text(json.dumps({"version": _CACHE_VERSION, "files": records}))
            os.replace(tmp, cpath)
        except OSError as e:  # a read-only cache costs time, not correctness
            warnings.warn(f"could not write the image validation cache {cpath}: {e}", stacklevel=2)

    sizes = np.array([records[f][2:4] for f in files], dtype=np.int64).reshape(len(files), 2)
    bad = [(f, records[f][4]) for f in files if records[f][4] is not None]
    return sizes, bad


def image_files(data_cfg, threads: int = 0) -> tuple[list[str], np.ndarray, list[tuple[str, str]]]:
    """data_cfg: DataConfig -> (good files, sizes int64 [N, 2] (width, height), [(bad path, reason)]).

    Applies `data_cfg.on_corrupt`: "skip" warns naming every bad file; "fail" raises CorruptImageError.
    """
    if data_cfg.on_corrupt not in ("skip", "fail"):
        raise ValueError(f"data.on_corrupt must be skip|fail, got {data_cfg.on_corrupt!r}")
    files = list_image_files(data_cfg.root)
    key = os.path.abspath(os.path.expanduser(data_cfg.root)) if data_cfg.root else str(embedded_root())
    sizes, bad = validate_files(files, threads, cache_key=key)
    if bad:
        listing = "\n".join(f"  {p}: {why}" for p, why in bad)
        if data_cfg.on_corrupt == "fail":
            raise CorruptImageError(
                f"{len(bad)} of {len(files)} image file(s) under {key} cannot be decoded "
                f"(data.on_corrupt=fail; set data.on_corrupt=skip to train without them):\n{listing}")
        warnings.warn(f"skipping {len(bad)} of {len(files)} image file(s) that cannot be decoded "
                      f"(data.on_corrupt=skip):\n{listing}", stacklevel=2)
        keep = np.array([r is None for r in (dict(bad).get(f) for f in files)])
        files = [f for f, k in zip(files, keep) if k]
        sizes = sizes[keep]
    if not files:
        raise ValueError(f"no decodable image files under {key}")
    return files, sizes, bad
