"""The run folder's side of a run: one run at a time writes it, and nothing is written before the
new run is known to fit the folder.

    run = RunFolder.open(out, cfg, info, precision, signature, arg_defaults, schedule)  # collective
    run.commit(config_yaml, ds_config)                                                # collective
    ...train...
    run.close()

`open`: rank 0 takes the folder's lock (`runlock`), decides where the run starts (`resume.plan`) and
compares this config with the resumed checkpoint's (`config_diff`): changes that cannot resume are
refused in one ConfigError listing all of them, before anything but the lock file is written (so
config.yaml is never overwritten by a refused config). The other ranks receive rank 0's decision, or
the same error, over the CPU control group.
`commit` (after the trainer's own checks): rank 0 moves aside what does not belong to the run
(`resume.apply`), writes config.yaml (this run's resolved config) and ds_config.json (the DeepSpeed
config it hands to deepspeed.initialize, for bug reports), records accepted config changes as an
event line in metrics.jsonl ({"step", "event": "config_changed", "changes": {key: [old, new]}, "schedule"})
and prints what it did.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

from .checkpoint import write_atomic
from .config import Config, ConfigError, to_dict
from .config_diff import ConfigDiff, compare, schedule_note
from .control import broadcast_from_main
from .distributed import DistInfo, barrier
from .resume import ARCHIVE, Start, apply, plan
from .runlock import RunLock


class RunFolder:
    def __init__(self, out: Path, info: DistInfo, start: Start, diff: ConfigDiff | None, schedule: str | None,
                 lock: RunLock | None):
        self.out, self.info, self.start, self.diff = out, info, start, diff
        self.schedule, self.lock = schedule, lock

    @property
    def resume_state(self) -> dict | None:
        return self.start.checkpoint.state if self.start.checkpoint else None

    @property
    def resume_folder(self) -> Path | None:
        return self.start.checkpoint.path if self.start.checkpoint else None

    @classmethod
    def open(cls, out: Path, cfg: Config, info: DistInfo, precision: str, signature: dict, arg_defaults: dict,
             schedule: dict) -> RunFolder:
        lock, payload = None, None
        if info.is_main:
            try:
                lock = RunLock(out).acquire()
                payload = ("ok", *_decide(out, cfg, precision, signature, arg_defaults, schedule))
            except Exception as err:  # noqa: BLE001 - every rank must fail with it
                if lock is not None:
                    lock.release()
                if info.world_size == 1:
                    raise
                payload = ("error", err if isinstance(err, ConfigError) else
                           RuntimeError(f"rank 0 could not open the run folder {out}: {err}"))
        payload = broadcast_from_main(payload)
        if payload[0] == "error":
            raise payload[1]
        return cls(out, info, *payload[1:], lock=lock)

    def commit(self, config_yaml: str, ds_config: dict) -> None:
        if self.info.is_main:
            notes = apply(self.out, self.start)
            write_atomic(self.out / "config.yaml", config_yaml)
            write_atomic(self.out / "ds_config.json", json.dumps(ds_config, indent=1) + "\n")
            if self.diff is not None and self.diff.changed:
                notes.append(f"config changes accepted on resume at step {self.start.step}: "
                             f"{self.diff.describe_changes()}")
                event = {"step": self.start.step, "event": "config_changed", "changes": self.diff.changed,
                         "schedule": self.schedule}
                with open(self.out / "metrics.jsonl", "a") as f:
                    f.write(json.dumps(event) + "\n")
            for line in notes + ([self.schedule] if self.schedule else []):
                print(line, file=sys.stderr, flush=True)
        barrier()

    def close(self) -> None:
        if self.lock is not None:
            self.lock.release()
            self.lock = None


def _decide(out: Path, cfg: Config, precision: str, signature: dict, arg_defaults: dict,
            schedule: dict) -> tuple[Start, ConfigDiff | None, str | None]:
    e = cfg.engine
    start = plan(out, e.resume, e.resume_from)
    if start.checkpoint is None:
        return start, None, None
    state, where = start.checkpoint.state, start.checkpoint.path
    diff = compare(state.get("config", {}), to_dict(cfg), state.get("params"), signature,
                   state.get("precision", precision), precision, arg_defaults)
    if diff.refused:
        raise ConfigError(f"cannot resume {where} with this config: {'; '.join(diff.refused)} (cannot change "
                          "on resume). Run with the saved values (its config.yaml), start another run folder "
                          f"from its weights with engine.init_from={where}, or start over here with "
                          f"--no-resume (the old run is moved to {out / ARCHIVE})")
    return start, diff, schedule_note(state, start.step, schedule)
