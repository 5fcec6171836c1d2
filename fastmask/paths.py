"""Checks on the paths a command will write, made before any work starts.

    check_output_dir("runs/mae_b", "--out")      # a run folder: created later, written throughout
    check_output_file("enc.pth", "--export")     # one file: written (atomically) at the end

Each raises `OutputPathError` (a ValueError: the CLI prints it as one line) naming the option and
the reason: a path that runs through a file, a folder where a file is wanted (or the reverse), or
a folder this process may not write. Writability is `os.access(W_OK | X_OK)`, which reports a
read-only file system for every user but, for root, ignores permission bits (root may write there).
"""
from __future__ import annotations

import os
from pathlib import Path


class OutputPathError(ValueError):
    """A path a command would write that cannot be written."""


def _nearest_existing(path: Path) -> Path:
    """The path itself, or its closest ancestor that exists (what `mkdir(parents=True)` starts from)."""
    for p in (path, *path.parents):
        if p.exists():
            return p
    return Path(".")


def _check_folder(folder: Path, path: Path, what: str) -> None:
    if not folder.is_dir():
        raise OutputPathError(f"{what} {path}: {folder} is a file, not a folder")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise OutputPathError(f"{what} {path}: folder {folder} is not writable")


def check_output_dir(path: str | Path, what: str, files: tuple[str, ...] = ()) -> Path:
    """`path` can be created (or exists as a folder) and written; `files` inside it that exist
    (a run folder's config.yaml, metrics.jsonl, checkpoints/...) can be replaced or written too."""
    path = Path(path)
    _check_folder(_nearest_existing(path), path, what)
    for name in files:
        f = path / name
        if f.is_dir():
            _check_folder(f, path, what)
        elif f.exists() and not os.access(f, os.W_OK):
            raise OutputPathError(f"{what} {path}: {f} is not writable")
    return path


def check_output_file(path: str | Path, what: str) -> Path:
    """`path` names a file that can be written (replaced if it exists): not a folder, and its
    folder can be created or exists and is writable."""
    path = Path(path)
    if path.is_dir():
        raise OutputPathError(f"{what} {path} is a folder; give the path of a file to write")
    if path.name in ("", ".", ".."):
        raise OutputPathError(f"{what} {path!s} does not name a file")
    _check_folder(_nearest_existing(path.parent), path, what)
    return path
