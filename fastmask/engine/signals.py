"""Pre-emption: SIGTERM or SIGINT (a scheduler's notice, Ctrl-C) ends the run at the next optimizer-step
boundary with a checkpoint, instead of losing up to `engine.checkpoint_every` steps.

    with StopOnSignal() as stop:
        while training:
            ... one optimizer step ...
            if signum := stop.requested():   # collective over the CPU control group on several ranks
                save a checkpoint; raise StoppedBySignal(signum, step, checkpoint)

The handler only records the signal (little else is safe inside a handler). Ranks may receive it at
different steps, or only some of them: `requested()` takes the maximum over the ranks every step
(a tiny gloo all-reduce, so the GPU stream is never synced), so all ranks stop after the same step.
The same signal again while a stop is pending stops at once, without a checkpoint (the handler
installed before runs: KeyboardInterrupt for Ctrl-C, termination for SIGTERM). Handlers can only be
installed from the main thread; elsewhere signals keep their previous behaviour. A signal that was
ignored (SIG_IGN) stays ignored.
"""
from __future__ import annotations

import signal
import threading

from .control import max_over_ranks

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StoppedBySignal(RuntimeError):
    """The run stopped on SIGTERM/SIGINT after saving; `exit_code` is 128 + the signal number (143, 130),
    what a shell reports for a process ended by that signal, so schedulers treat it as pre-empted."""

    def __init__(self, signum: int, step: int, checkpoint: str | None):
        self.signum, self.step, self.checkpoint = signum, step, checkpoint
        self.exit_code = 128 + signum
        saved = (f"checkpoint {checkpoint} saved; run the same command to resume" if checkpoint
                 else "no run folder, nothing saved")
        super().__init__(f"stopped by {signal.Signals(signum).name} after step {step}: {saved}")


class StopOnSignal:
    def __init__(self):
        self.signum = 0
        self._previous: dict[int, object] = {}

    def __enter__(self) -> StopOnSignal:
        if threading.current_thread() is threading.main_thread():
            for s in SIGNALS:
                if signal.getsignal(s) is not signal.SIG_IGN:
                    self._previous[s] = signal.signal(s, self._handle)
        return self

    def _handle(self, signum: int, frame) -> None:
        # the first signal (or another kind while one is pending): stop after this step
        if self.signum != signum:
            self.signum = self.signum or signum
            return
        # the same again: stop now, without a checkpoint
        previous = self._previous.get(signum, signal.SIG_DFL)
        self._restore()
        if callable(previous):
            previous(signum, frame)
        else:
            signal.signal(signum, previous)
            signal.raise_signal(signum)

    def requested(self) -> int:
        """The signal number a rank received (0: none), the same on every rank."""
        return max_over_ranks(self.signum)

    def _restore(self) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous.clear()

    def __exit__(self, *exc) -> None:
        self._restore()
