"""One run at a time per run folder: an exclusive lock on DIR/.lock, taken before anything is written.

    with RunLock(out):       # RunLockedError (a ConfigError) when another live process holds it
        ...                  # train, write checkpoints and metrics

The lock is `fcntl.flock` on DIR/.lock, so the kernel releases it when the holder exits in any way
(return, exception, kill -9): a lock left by a dead process is never in the way, and there is no
pid-liveness guess to get wrong (pid reuse, other hosts). While held, the file holds the holder's
host, pid, start time and command line, which a refused run prints. The file itself stays (emptied
on release): removing it would let a run that opened the old file and one that creates a new one
both hold "the" lock.

A file system without flock support (some Lustre/NFS mounts) cannot lock: the run proceeds with one
printed warning that a second run on the same folder would not be detected.
"""
from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import sys
import time
from pathlib import Path

from .config import ConfigError

LOCK_FILE = ".lock"
_UNSUPPORTED = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL)


class RunLockedError(ConfigError):
    """Another process is running in this run folder."""


def _holder_text(raw: str) -> str:
    try:
        h = json.loads(raw)
        return f"pid {h['pid']} on {h['host']} (since {h['started']}: {h['command']})"
    except (ValueError, KeyError, TypeError):
        return "another process (its lock file holds no readable holder yet)"


class RunLock:
    def __init__(self, run_dir: str | Path):
        self.path = Path(run_dir) / LOCK_FILE
        self.fd: int | None = None

    def acquire(self) -> RunLock:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as err:  # --out under a file, a read-only folder, ...
            raise ConfigError(f"cannot write to run folder {self.path.parent}: "
                              f"{err.strerror or err}") from err
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raw = os.pread(fd, 4096, 0).decode(errors="replace")
            os.close(fd)
            raise RunLockedError(f"run folder {self.path.parent} is in use by {_holder_text(raw)}; wait for "
                                 f"it to finish or stop it, or use another --out") from None
        except OSError as err:
            os.close(fd)
            if err.errno not in _UNSUPPORTED:
                raise
            print(f"warning: cannot lock {self.path} ({err.strerror}): a second run on this folder would not "
                  f"be detected", file=sys.stderr, flush=True)
            return self
        holder = {"host": socket.gethostname(), "pid": os.getpid(),
                  "started": time.strftime("%Y-%m-%d %H:%M:%S"), "command": " ".join(sys.argv)[:300]}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(holder).encode(), 0)
        os.fsync(fd)
        self.fd = fd
        return self

    def release(self) -> None:
        if self.fd is None:
            return
        fd, self.fd = self.fd, None
        try:
            os.ftruncate(fd, 0)
        finally:
            os.close(fd)  # closing the descriptor releases the flock

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
