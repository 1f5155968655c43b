"""Ctrl-C (SIGINT) and ``ray job stop`` (SIGTERM) during a sweep: stop within seconds, lose nothing, mark nothing.

An interrupted cell is neither ``failed`` nor ``stopped`` (ASHA's decision, a result): it simply has no
healed row, so the next run of the same command runs it again. What happens depends on the stage the
signal arrives in:

- planning, between stages: the sweep raises :class:`SweepInterrupted` at once; profiling (stage 1): within
  half a second, once Ray's wait returns (raising inside it would surface as a SystemError);
- the Tune grid (stage 2), from the CLI: the sweep stops at once (``stop_now``): the cells that failed before
  the signal get their ``failed`` row and those ASHA stopped their ``stopped`` row, the lock is released, and
  the process exits, taking its trials with it. Every row is written atomically, so nothing a slow stop would
  keep is lost, and Ray's ``ray job stop`` grace period (3 s by default) is enough. From Python (a notebook,
  where exiting is not an option) Tune is asked to stop instead, through the SIGUSR1 handler it installs for
  exactly this, and the grid comes back after the current step;
- while rows are written: the signal waits until the rows are on storage.

A second signal stops at once. The lock is released on the way out either way, and the CLI prints one
line and exits 130 (SIGINT) or 143 (SIGTERM). A driver whose lock another driver took over is stopped the
same way (``lose_lock``), and says so.
"""

from __future__ import annotations

import contextlib
import signal
import threading
import time
from typing import Callable, Iterator

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class SweepInterrupted(Exception):
    """The sweep was stopped by a signal; cells not finished run on the next run of the same command."""

    def __init__(self, signum: int, finished: int | None = None, total: int | None = None) -> None:
        self.signum, self.finished, self.total = signum, finished, total
        name = signal.Signals(signum).name
        counts = f": {finished} of {total} cells done" if total is not None else ""
        super().__init__(f"interrupted by {name}{counts}; run the same command again to run the rest")

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


class Interrupts:
    """Catches SIGINT/SIGTERM for the duration of a sweep (main thread only; elsewhere it does nothing)."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self.at: float | None = None  # time.monotonic() of the first signal
        self.phase = "run"
        self.stop_now: Callable[[int], None] | None = None  # the fast stop of stage 2, where the caller gave one
        self._previous: dict[int, object] = {}

    def __enter__(self) -> "Interrupts":
        return self.arm()

    def arm(self) -> "Interrupts":
        """(Re)install the handlers: ``ray.init`` replaces the process's SIGTERM handler with its own, which
        aborts, so the sweep arms again once Ray is up."""
        if threading.current_thread() is threading.main_thread():
            for sig in SIGNALS:
                previous = signal.signal(sig, self._handle)
                self._previous.setdefault(sig, previous)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum: int, frame) -> None:
        first = self.signum is None
        if first:
            self.signum, self.at = signum, time.monotonic()
        if self.phase == "waiting":
            return  # raised by check() once Ray's wait returns (a second signal too: it comes within 0.5 s)
        if first and self.phase == "writing":
            return  # raised by check() once the rows are written
        if first and self.phase == "tune" and self.stop_now is not None:
            self.stop_now(signum)
        if first and self.phase == "tune" and signal.getsignal(signal.SIGUSR1) not in (signal.SIG_DFL, None):
            signal.raise_signal(signal.SIGUSR1)  # Tune's own "stop the run" handler
            return
        raise SweepInterrupted(self.signum)

    def lose_lock(self, holder: dict) -> None:
        """Called from the lock's heartbeat thread when another driver took the lock: stop as on SIGTERM."""
        import _thread

        _thread.interrupt_main(signal.SIGTERM)

    @contextlib.contextmanager
    def during(self, phase: str) -> Iterator[None]:
        previous, self.phase = self.phase, phase
        try:
            yield
        finally:
            self.phase = previous

    @property
    def interrupted(self) -> bool:
        return self.signum is not None

    def before(self, t: float | None) -> bool:
        """Whether an event at monotonic time ``t`` came before the interrupt (always, if there was none)."""
        return self.at is None or (t is not None and t < self.at)

    def check(self, finished: int | None = None, total: int | None = None) -> None:
        if self.signum is not None:
            raise SweepInterrupted(self.signum, finished, total)
