"""Atomic, resumable checkpoints of a DeepSpeed run.

Layout under the run folder DIR:

    DIR/checkpoints/latest                   text: the tag of the newest checkpoint written (a hint:
                                             resume scans the folders, see `fastmask.engine.resume`)
    DIR/checkpoints/step_00000040/           DeepSpeed's files (model states, ZeRO partitions) +
        engine_state.json                    step, epoch, batch position, world size, precision,
                                             the `health` verdict (`fastmask.engine.health`), ...
        rng_rank{r}.pt                       python / numpy / torch / cuda RNG states of rank r
        frozen_rank{r}.pt                    frozen parameters (teachers), EMA shadows, buffers
                                             (`frozen_state`)
        config.yaml                          the resolved config of the run
    DIR/checkpoints/.staging/                a checkpoint being written (never read by resume)

Write protocol (`save`): every rank writes into `.staging/<tag>`; rank 0 fsyncs every file, then
renames the folder into place (one atomic rename) and replaces `latest` (written to a temporary
file, fsynced, `os.replace`d: also atomic); older checkpoints beyond `keep_last` are deleted only
after that, never the newest good one (`keep_good`). DIR/checkpoints holds only the lineage of the
run being continued and this run's checkpoints (`fastmask.engine.resume` moves anything else aside
first), so pruning never deletes another run's work. A crash at any point leaves the previous
checkpoint and `latest` untouched: a crash before the rename leaves only `.staging` (cleared by the
next save), a crash between the rename and the pointer update leaves a complete folder that
`latest` does not name yet (resume finds it by scanning).

`FASTMASK_TEST_CRASH_AT=ckpt:N` makes the process `os._exit(137)` in the middle of writing the
checkpoint of step N (after DeepSpeed's files, before the rename): what a kill -9 at the worst
moment does. Tests use it; nothing else reads it.
"""
from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch

from . import frozen_state
from .distributed import barrier

STAGING = ".staging"
STATE_FILE = "engine_state.json"


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def checkpoint_root(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def latest_tag(run_dir: str | Path) -> str | None:
    """-> the tag of the run's newest complete good checkpoint (found by scanning), else None."""
    from .resume import newest_good
    info = newest_good(run_dir)
    return info.path.name if info else None


def read_state(run_dir: str | Path, tag: str) -> dict:
    return json.loads((checkpoint_root(run_dir) / tag / STATE_FILE).read_text())


def mark_not_good(folder: Path, why: str) -> None:
    """Rewrite a saved checkpoint's verdict as not good (atomically), adding the reason."""
    state = json.loads((folder / STATE_FILE).read_text())
    health = state.setdefault("health", {})
    health["good"] = False
    health["why"] = [*health.get("why", []), why]
    write_atomic(folder / STATE_FILE, json.dumps(state, indent=1))


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(path: Path) -> None:
    for dirpath, _, files in os.walk(path):
        for f in files:
            _fsync_file(Path(dirpath) / f)
        _fsync_file(Path(dirpath))


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_file(path.parent)


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _crash_point(kind: str, step: int) -> None:
    spec = os.environ.get("FASTMASK_TEST_CRASH_AT", "")
    if spec == f"{kind}:{step}":
        os._exit(137)


def save(engine, run_dir: str | Path, step: int, state: dict, config_yaml: str, rank: int,
         keep_last: int, keep_good: Path | None = None) -> Path:
    """Write the checkpoint of `step` atomically (see the module docstring). Collective: every rank calls it.

    state: JSON-able engine state (rank 0's is written). keep_good: the newest good checkpoint, never
    pruned. -> the final checkpoint folder.
    """
    root = checkpoint_root(run_dir)
    staging = root / STAGING
    tag = tag_for(step)
    if rank == 0:
        shutil.rmtree(staging, ignore_errors=True)  # leftovers of a save that crashed
        staging.mkdir(parents=True, exist_ok=True)
    barrier()
    engine.save_checkpoint(str(staging), tag=tag, client_state={"fastmask_step": step}, save_latest=False)
    folder = staging / tag
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(rng_state(), folder / f"rng_rank{rank}.pt")
    frozen_state.save(engine.module, folder, rank)
    barrier()
    _crash_point("ckpt", step)
    if rank == 0:
        (folder / "config.yaml").write_text(config_yaml)
        # The state file goes last: a folder with it is complete.
        (folder / STATE_FILE).write_text(json.dumps(state, indent=1))
        _fsync_tree(folder)
        final = root / tag
        if final.exists():  # a complete folder the pointer never named (a crash after the rename)
            shutil.rmtree(final)
        os.replace(folder, final)
        _fsync_file(root)
        write_atomic(root / "latest", tag + "\n")
        shutil.rmtree(staging, ignore_errors=True)
        _prune(root, keep_last, keep={tag, keep_good.name if keep_good is not None else tag})
    barrier()
    return root / tag


def _prune(root: Path, keep_last: int, keep: set[str]) -> None:
    tags = sorted(p.name for p in root.iterdir() if p.is_dir() and p.name.startswith("step_"))
    for t in tags[:-keep_last]:
        if t not in keep:
            shutil.rmtree(root / t, ignore_errors=True)


def load(engine, folder: str | Path, rank: int, load_optimizer: bool = True, universal: bool = False) -> dict:
    """Restore model, optimizer (with loss scaler) and this rank's RNG from the checkpoint `folder`
    (usually DIR/checkpoints/<tag>; any checkpoint folder with engine.resume_from).

    universal: load `<tag>/universal` (DeepSpeed's universal format, see `fastmask.engine.universal`),
    for a world size other than the one that saved. -> the engine state dict saved with it. Collective.
    """
    root, tag = Path(folder).parent, Path(folder).name
    state = json.loads((root / tag / STATE_FILE).read_text())
    path, _ = engine.load_checkpoint(str(root), tag=f"{tag}/universal" if universal else tag,
                                     load_optimizer_states=load_optimizer,
                                     load_lr_scheduler_states=False, load_module_strict=True)
    if path is None:
        raise RuntimeError(f"DeepSpeed could not load checkpoint {root / tag}")
    # teachers, shadows, buffers: at any stage and world size
    frozen_state.load(engine.module, root / tag, rank)
    rng_file = root / tag / f"rng_rank{rank}.pt"
    if rng_file.is_file():
        set_rng_state(torch.load(rng_file, weights_only=False))
    return state
