"""Style: no line of the repository's .py files is longer than pyproject's `[tool.ruff] line-length`.

ruff is not a dependency and nothing else runs it, so this test is what holds the declared limit.
"""
import os
import subprocess
from pathlib import Path

import pytest

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10, which the project still allows: tomli is tomllib's backport
    tomllib = pytest.importorskip("tomli")

ROOT = Path(__file__).resolve().parents[1]
# Not the project's source: environments, build output, run folders (hidden folders are skipped too).
NOT_SOURCE = {"build", "dist", "runs", "venv", "__pycache__"}


def _line_length() -> int:
    with open(ROOT / "pyproject.toml", "rb") as f:
        return tomllib.load(f)["tool"]["ruff"]["line-length"]


def _python_files() -> list[Path]:
    """The tracked .py files (`git ls-files`); without git (an unpacked archive), every .py file under the
    root outside hidden folders and NOT_SOURCE."""
    try:
        out = subprocess.run(["git", "ls-files", "-z", "--", "*.py"], cwd=ROOT, capture_output=True,
                             check=True, timeout=60).stdout.decode()
    except (OSError, subprocess.SubprocessError):
        out = ""
    if out:
        return sorted(p for p in (ROOT / name for name in out.split("\0") if name) if p.is_file())
    found = []
    for folder, dirs, files in os.walk(ROOT):
        dirs[:] = [d for d in dirs if not d.startswith(".") and d not in NOT_SOURCE]
        found += [Path(folder) / name for name in files if name.endswith(".py")]
    return sorted(found)


def test_no_line_is_longer_than_pyprojects_line_length():
    limit = _line_length()
    files = _python_files()
    assert files, f"no .py files found under {ROOT}"
    over = [f"{path.relative_to(ROOT)}:{n}:{len(line)}"
            for path in files
            for n, line in enumerate(path.read_text(encoding="utf-8").split("\n"), 1) if len(line) > limit]
    assert not over, (f"{len(over)} line(s) longer than {limit} characters (pyproject.toml [tool.ruff] "
                      "line-length); file:line:length of the first 20:\n" + "\n".join(over[:20]))


def test_without_git_the_walk_finds_every_tracked_file(monkeypatch):
    tracked = _python_files()
    monkeypatch.setenv("PATH", "")  # `git` is not found: the fallback walks the folder
    walked = _python_files()
    assert set(tracked) <= set(walked)
