"""Where a run starts: the checkpoint it continues, found by scanning (the `latest` pointer is a hint),
and what is moved aside (never deleted) so that DIR/checkpoints holds one run's lineage.

    start = plan(out, "auto", resume_from=None)   # reads only; a ConfigError when it cannot start
    notes = apply(out, start)                     # the moves, then the lines to print

Which checkpoint (`plan`):
- `engine.resume_from=STEP` (or `step_00000040`, or a checkpoint folder anywhere): that one, which
  must be complete; one recorded as not good is taken anyway, with its verdict printed;
- `engine.resume=auto|always`: the newest complete good checkpoint in DIR/checkpoints (good: see
  `fastmask.engine.health`). When `latest` names another, the line printed says why it was passed
  over (missing, incomplete, not good). Complete checkpoints but none good: refused, naming each
  verdict (pick one with engine.resume_from, or start over with --no-resume);
- `engine.resume=never` (`--no-resume`), or nothing to resume: a new run.

What moves into DIR/archive/<time>-<why>/ (`apply`), relative paths kept:
- a new run in a folder holding a previous run (checkpoints, or a non-empty metrics.jsonl): that
  run's checkpoints/, metrics.jsonl, config.yaml, ds_config.json and tensorboard/;
- a resume at step S: the checkpoints after S (an abandoned future: a manual rollback, checkpoints
  passed over as not good, or left behind by engine.resume_from) and the metrics.jsonl lines after S
  (a crash's tail, or the abandoned future's); resuming a checkpoint outside DIR/checkpoints moves
  all of DIR's checkpoints and metrics instead.
So pruning (`keep_last`) only ever meets the continued run's lineage and this run's own checkpoints.
`.staging` (a save cut short) is left for the next save to clear: it is never a checkpoint.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
import time
from pathlib import Path

from .checkpoint import STATE_FILE, checkpoint_root, tag_for, write_atomic
from .config import ConfigError

ARCHIVE = "archive"
RUN_FILES = ("metrics.jsonl", "config.yaml", "ds_config.json", "tensorboard")
_TAG = re.compile(r"^step_(\d+)$")


@dataclasses.dataclass
class CheckpointInfo:
    path: Path
    step: int
    state: dict | None      # engine_state.json; None: incomplete (or unreadable)

    @property
    def good(self) -> bool:
        return self.state is not None and bool((self.state.get("health") or {}).get("good", True))

    def why_not_good(self) -> str:
        if self.state is None:
            return "incomplete (no readable engine_state.json)"
        return "; ".join((self.state.get("health") or {}).get("why") or []) or "good"


def read_info(path: Path) -> CheckpointInfo:
    m = _TAG.match(path.name)
    try:
        state = json.loads((path / STATE_FILE).read_text())
    except (OSError, ValueError):
        state = None
    step = int(state["step"]) if state and "step" in state else (int(m.group(1)) if m else -1)
    return CheckpointInfo(path, step, state)


def scan(run_dir: str | Path) -> list[CheckpointInfo]:
    """The step_* folders under DIR/checkpoints, oldest first."""
    root = checkpoint_root(run_dir)
    if not root.is_dir():
        return []
    infos = (read_info(p) for p in root.iterdir() if p.is_dir() and _TAG.match(p.name))
    return sorted(infos, key=lambda i: i.step)


def newest_good(run_dir: str | Path) -> CheckpointInfo | None:
    good = [i for i in scan(run_dir) if i.good]
    return good[-1] if good else None


@dataclasses.dataclass
class Start:
    checkpoint: CheckpointInfo | None   # the checkpoint to resume; None: a new run
    notes: list[str]                    # lines to print: which checkpoint and why
    move: list[Path]                    # what `apply` moves into the archive
    why: str                            # the archive folder's suffix
    trim_after: int | None              # metrics.jsonl lines after this step move too
    good: list[Path]                    # the lineage's good checkpoints in DIR/checkpoints, oldest first

    @property
    def step(self) -> int:
        return self.checkpoint.step if self.checkpoint else 0


def _pointer(run_dir: Path) -> str | None:
    try:
        return (checkpoint_root(run_dir) / "latest").read_text().strip() or None
    except OSError:
        return None


def _requested(run_dir: Path, resume_from: int | str) -> CheckpointInfo:
    text = str(resume_from).strip()
    if re.fullmatch(r"\d+", text):
        path = checkpoint_root(run_dir) / tag_for(int(text))
    elif _TAG.match(text):
        path = checkpoint_root(run_dir) / text
    else:
        path = Path(text)
    info = read_info(path) if path.is_dir() else None
    if info is None or info.state is None:
        have = ", ".join(str(i.step) for i in scan(run_dir) if i.state is not None) or "none"
        raise ConfigError(f"engine.resume_from={resume_from}: {path} is not a complete checkpoint "
                          f"(complete checkpoints in {checkpoint_root(run_dir)}: {have})")
    return info


def _previous_run(run_dir: Path, infos: list[CheckpointInfo]) -> list[Path]:
    metrics = run_dir / "metrics.jsonl"
    if not infos and not (metrics.is_file() and metrics.stat().st_size > 0):
        return []  # nothing trained here (at most a config of a start that failed): overwritten
    moving = [i.path for i in infos] + [checkpoint_root(run_dir) / "latest"]
    return [p for p in moving + [run_dir / f for f in RUN_FILES] if p.exists()]


def plan(run_dir: str | Path, mode: str, resume_from: int | str | None = None) -> Start:
    """Decide where the run in `run_dir` starts (reads only). mode: auto | always | never."""
    run_dir = Path(run_dir)
    infos = scan(run_dir)
    root = checkpoint_root(run_dir)
    if resume_from is not None:
        if mode == "never":
            raise ConfigError("engine.resume_from asks to resume, engine.resume=never (--no-resume) not to: "
                              "drop one of them")
        chosen = _requested(run_dir, resume_from)
        notes = [f"resuming from {chosen.path} (engine.resume_from={resume_from})"
                 + ("" if chosen.good else f"; it is recorded as not good: {chosen.why_not_good()}")]
    elif mode != "never" and any(i.good for i in infos):
        chosen = [i for i in infos if i.good][-1]
        notes = [f"resuming from {chosen.path} at step {chosen.step}"]
        hint = _pointer(run_dir)
        if hint and hint != chosen.path.name:
            named = next((i for i in infos if i.path.name == hint), None)
            why = ("which is missing" if named is None else
                   "which is incomplete" if named.state is None else
                   f"which is not good ({named.why_not_good()})" if not named.good else "an older one")
            notes[0] += (f" (checkpoints/latest names {hint}, {why}; this is the newest complete good "
                         "checkpoint)")
    elif mode != "never" and any(i.state is not None for i in infos):
        verdicts = "; ".join(f"{i.path.name}: {i.why_not_good()}" for i in infos if i.state is not None)
        raise ConfigError(f"{run_dir} holds checkpoints but none is good ({verdicts}); resume one anyway "
                          "with engine.resume_from=STEP, or start over with --no-resume (the old run is "
                          f"moved to {run_dir / ARCHIVE})")
    elif mode == "always":
        raise ConfigError(f"engine.resume=always but {run_dir} holds no complete checkpoint")
    else:
        move = _previous_run(run_dir, infos)
        return Start(None, [], move, "previous-run", None, [])

    inside = chosen.path.parent.resolve() == root.resolve()
    if not inside:  # continuing a checkpoint from elsewhere: DIR's own run is another lineage
        return Start(chosen, notes, _previous_run(run_dir, infos), "previous-run", None, [])
    future = [i.path for i in infos if i.step > chosen.step]
    if future and resume_from is not None:
        notes[0] += ("; later runs of this command roll back to it again: drop engine.resume_from once it "
                     "has run")
    good = [i.path for i in infos if i.good and i.step <= chosen.step]
    return Start(chosen, notes, future, f"after-step-{chosen.step}", chosen.step, good)


def _archive_dir(run_dir: Path, why: str) -> Path:
    base = run_dir / ARCHIVE / f"{time.strftime('%Y%m%d-%H%M%S')}-{why}"
    path, n = base, 1
    while path.exists():
        path, n = Path(f"{base}-{n}"), n + 1
    return path


def _split_metrics(path: Path, after: int) -> tuple[list[str], list[str]]:
    keep, drop = [], []
    for line in path.read_text().splitlines():
        try:
            step = json.loads(line).get("step", 0)
        except ValueError:
            continue  # a line cut by a crash
        (keep if step <= after else drop).append(line)
    return keep, drop


def apply(run_dir: str | Path, start: Start) -> list[str]:
    """Move aside what `plan` decided (rank 0; after every check passed). -> the lines to print."""
    run_dir = Path(run_dir)
    if start.trim_after is not None and _pointer(run_dir) != start.checkpoint.path.name:
        write_atomic(checkpoint_root(run_dir) / "latest", start.checkpoint.path.name + "\n")
    metrics = run_dir / "metrics.jsonl"
    keep, drop = (_split_metrics(metrics, start.trim_after)
                  if start.trim_after is not None and metrics.is_file() else ([], []))
    if not start.move and not drop:
        return start.notes
    dest = _archive_dir(run_dir, start.why)
    dest.mkdir(parents=True)
    if drop:  # the dropped lines are safe in the archive before metrics.jsonl loses them
        write_atomic(dest / "metrics.jsonl", "".join(line + "\n" for line in drop))
        write_atomic(metrics, "".join(line + "\n" for line in keep))
    for p in start.move:
        target = dest / p.relative_to(run_dir)
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(p, target)
    what = ", ".join([p.name for p in start.move]
                     + ([f"{len(drop)} metrics.jsonl line(s) after step {start.trim_after}"] if drop else []))
    if start.checkpoint is None:
        return [*start.notes, f"a new run: the previous run in {run_dir} ({what}) moved to {dest}"]
    return [*start.notes, f"moved to {dest}: {what}"]
