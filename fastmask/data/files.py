"""Image files for the file loaders: list them, check them once, and hand back the good ones.

    files, sizes, bad = image_files(data_cfg)        # data_cfg: fastmask.engine.config.DataConfig

- `list_image_files(root, dataset)`: an ImageNet-style folder (class subfolders, searched
  recursively) or a `.txt` file list (one path per line, relative paths taken from the list's
  folder, an optional trailing integer label ignored); `None` = the embedded set `dataset`
  (`EMBEDDED_SETS`: "photos", the crops of scikit-learn's photos, or "shapes", the unlabelled split
  of `fastmask.data.shapes`), written once as JPEGs into the cache folder (`embedded_root()`).
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

import contextlib
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
_CACHE_VERSION = 2
_EXIF_ORIENTATION = 0x0112


class CorruptImageError(RuntimeError):
    """Image files that cannot be decoded, found before training (data.on_corrupt=fail)."""


def cache_dir() -> Path:
    return Path(os.environ.get("FASTMASK_CACHE") or Path.home() / ".cache" / "fastmask")


EMBEDDED_SETS = ("photos", "shapes")


def embedded_root(dataset: str = "photos") -> Path:
    """-> folder holding the embedded set `dataset` as JPEGs (`photos/00000.jpg` ...), written once.

    Written to a temporary sibling and renamed into place, so concurrent ranks never see half a set.
    """
    if dataset == "photos":
        from fastmask.data.embedded import DEFAULT_COUNT, DEFAULT_SIZE, write_image_folder

        root = cache_dir() / f"embedded-photos-{DEFAULT_COUNT}x{DEFAULT_SIZE}-v1"
        write = write_image_folder
    elif dataset == "shapes":
        from fastmask.data import shapes

        root = cache_dir() / (f"shapes-pretrain-{shapes.PRETRAIN_COUNT}x{shapes.DEFAULT_SIZE}"
                              f"-v{shapes.VERSION}")
        write = shapes.write_shapes_folder
    else:
        raise ValueError(f"unknown embedded dataset {dataset!r}; valid: {', '.join(EMBEDDED_SETS)}")
    if root.is_dir():
        return root
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=root.name + ".tmp-", dir=root.parent))
    write(tmp)
    try:
        os.replace(tmp, root)
    except OSError:  # another rank got there first
        if not root.is_dir():
            raise
        import shutil
        shutil.rmtree(tmp, ignore_errors=True)
    return root


def list_image_files(root: str | Path | None, dataset: str = "photos") -> list[str]:
    """-> sorted absolute paths of the images under `root` (folder or .txt list; None = embedded
    `dataset`)."""
    if root is None:
        root = embedded_root(dataset)
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
    record are not opened again. The ranks of a node share the entry: the first one to take its lock
    checks the files, the others wait and then read its result.
    """
    threads = threads or min(32, (os.cpu_count() or 1) * 2)
    cpath = _cache_path(files, cache_key)
    with _locked(cpath.with_suffix(".lock") if use_cache else None):
        with ThreadPoolExecutor(max_workers=threads) as pool:
            stats = list(pool.map(os.stat, files))
            mtime = np.array([st.st_mtime_ns for st in stats], dtype=np.int64)
            nbytes = np.array([st.st_size for st in stats], dtype=np.int64)
            sizes = np.zeros((len(files), 2), dtype=np.int64)
            errors: dict[int, str] = {}
            fresh = np.zeros(len(files), dtype=bool)
            if use_cache:
                fresh = _read_cache(cpath, files, mtime, nbytes, sizes, errors)
            todo = np.flatnonzero(~fresh)
            for i, (w, h, err) in zip(todo, pool.map(_check_one, [files[i] for i in todo])):
                sizes[i] = (w, h)
                if err is None:
                    errors.pop(int(i), None)
                else:
                    errors[int(i)] = err
        if use_cache and len(todo):
            try:
                cpath.parent.mkdir(parents=True, exist_ok=True)
                tmp = cpath.with_suffix(f".tmp{os.getpid()}")
                # Columns, not one record per file: ImageNet's 1.28M files load in seconds.
                tmp.write_text(json.dumps({"version": _CACHE_VERSION, "files": files,
                                           "mtime_ns": mtime.tolist(),
                                           "bytes": nbytes.tolist(), "width": sizes[:, 0].tolist(),
                                           "height": sizes[:, 1].tolist(),
                                           "errors": {str(i): e for i, e in errors.items()}}))
                os.replace(tmp, cpath)
            except OSError as e:  # a read-only cache costs time, not correctness
                warnings.warn(f"could not write the image validation cache {cpath}: {e}", stacklevel=2)
    bad = [(files[i], errors[i]) for i in sorted(errors)]
    return sizes, bad


def _read_cache(cpath: Path, files: list[str], mtime: np.ndarray, nbytes: np.ndarray, sizes: np.ndarray,
                errors: dict[int, str]) -> np.ndarray:
    """Fill sizes/errors from the cache where (path, mtime, bytes) match; -> bool [N] of the filled rows."""
    fresh = np.zeros(len(files), dtype=bool)
    try:
        blob = json.loads(cpath.read_text())
        if blob.get("version") != _CACHE_VERSION:
            return fresh
        cfiles = blob["files"]
        cols = [np.asarray(blob[k], dtype=np.int64) for k in ("mtime_ns", "bytes", "width", "height")]
        cerr = {int(k): v for k, v in blob["errors"].items()}
    except (OSError, ValueError, KeyError, TypeError):
        return fresh
    if cfiles == files:  # the usual case: same listing, so rows line up
        rows, src = np.arange(len(files)), np.arange(len(files))
    else:
        where = {f: i for i, f in enumerate(cfiles)}
        pairs = [(i, where[f]) for i, f in enumerate(files) if f in where]
        rows = np.array([p[0] for p in pairs], dtype=np.int64)
        src = np.array([p[1] for p in pairs], dtype=np.int64)
    if not len(rows):
        return fresh
    same = (cols[0][src] == mtime[rows]) & (cols[1][src] == nbytes[rows])
    rows, src = rows[same], src[same]
    fresh[rows] = True
    sizes[rows, 0], sizes[rows, 1] = cols[2][src], cols[3][src]
    for r, c in zip(rows.tolist(), src.tolist()):
        if c in cerr:
            errors[r] = cerr[c]
    return fresh


@contextlib.contextmanager
def _locked(path: Path | None):
    """Exclusive advisory lock on `path` (None, or a filesystem without locks: no lock)."""
    if path is None:
        yield
        return
    try:
        import fcntl
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except (ImportError, OSError):
        yield
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError:
            pass
        yield
    finally:
        os.close(fd)  # closing releases the lock


def image_files(data_cfg, threads: int = 0) -> tuple[list[str], np.ndarray, list[tuple[str, str]]]:
    """data_cfg: DataConfig -> (good files, sizes int64 [N, 2] (width, height), [(bad path, reason)]).

    Applies `data_cfg.on_corrupt`: "skip" warns naming every bad file; "fail" raises CorruptImageError.
    """
    if data_cfg.on_corrupt not in ("skip", "fail"):
        raise ValueError(f"data.on_corrupt must be skip|fail, got {data_cfg.on_corrupt!r}")
    files = list_image_files(data_cfg.root, data_cfg.dataset)
    key = (os.path.abspath(os.path.expanduser(data_cfg.root)) if data_cfg.root
           else str(embedded_root(data_cfg.dataset)))
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


def check_loader_args(data_cfg, rank: int, world_size: int) -> list[str]:
    """The problems every file loader checks before any work (rank, sizes, crop scale), as messages."""
    problems = []
    if not 0 <= rank < world_size:
        problems.append(f"rank must be in [0, world_size={world_size}), got {rank}")
    if data_cfg.img_size < 1 or data_cfg.batch_size < 1:
        problems.append(f"data.img_size and data.batch_size must be >= 1, got "
                        f"{data_cfg.img_size} and {data_cfg.batch_size}")
    if not 0.0 < data_cfg.min_scale <= 1.0:
        problems.append(f"data.min_scale must be in (0, 1], got {data_cfg.min_scale}")
    return problems
