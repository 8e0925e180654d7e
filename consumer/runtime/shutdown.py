"""Graceful shutdown of `offsetkeeper run`: SIGTERM/SIGINT, a deadline, and a last resort.

    1. The first SIGTERM (or SIGINT) asks the engine to stop: it stops fetching, finishes and
       commits the batch in hand, leaves the group and exits 0.
    2. A second signal, or `deadline_s` passing since the first, aborts: `ShutdownAborted` is
       raised in the main thread wherever it is. Inside a batch, the sink transaction is rolled
       back on the way out (psycopg also cancels a running statement), so nothing is
       half-written. The process exits with `EXIT_ABORTED` (5).
    3. If the abort itself cannot finish within `abort_grace_s` (a call that never returns),
       the process ends with `os._exit(EXIT_ABORTED)`. The open transaction dies with its
       connection and the database rolls it back: still nothing half-written.

The handlers are installed first thing, so no signal is lost while the process starts. The
deadline is enforced by a watchdog thread that exists only after a stop was requested. The
timer wakes the main thread with SIGALRM (sent to that thread), so a blocking system call
returns and the abort is raised promptly.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Callable
from types import FrameType

import structlog

from consumer.core.exit_codes import EXIT_ABORTED

log = structlog.get_logger("offsetkeeper.shutdown")

DEFAULT_DEADLINE_S = 30.0
ABORT_GRACE_S = 10.0
_WATCH_INTERVAL_S = 0.05


class ShutdownAborted(SystemExit):
    """Raised in the main thread to abort a graceful stop. A `SystemExit`, so that nothing
    catches it by accident, psycopg cancels a running statement on it, and the interpreter
    exits with `EXIT_ABORTED` once it has unwound."""

    def __init__(self, reason: str) -> None:
        super().__init__(EXIT_ABORTED)
        self.reason = reason


class GracefulShutdown:
    """See the module docstring. Create it in the main thread, before anything slow."""

    def __init__(
        self,
        deadline_s: float = DEFAULT_DEADLINE_S,
        *,
        abort_grace_s: float = ABORT_GRACE_S,
        exit_hard: Callable[[int], object] = os._exit,
    ) -> None:
        self.deadline_s = deadline_s
        self._abort_grace_s = abort_grace_s
        self._exit_hard = exit_hard
        self._main_thread = threading.get_ident()
        self._on_request: list[Callable[[], None]] = []
        self._requested_at: float | None = None
        self._deadline_passed = False
        self._aborted_at: float | None = None
        self._disarmed = threading.Event()
        self._watchdog: threading.Thread | None = None
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGALRM):
            signal.signal(signum, self._on_signal)

    @property
    def requested(self) -> bool:
        return self._requested_at is not None

    def on_request(self, callback: Callable[[], None]) -> None:
        """Call `callback` on the first signal (at once, if that signal already came).
        Callbacks run inside a signal handler: they must only set flags."""
        self._on_request.append(callback)
        if self.requested:
            callback()

    def disarm(self) -> None:
        """The engine has returned: the watchdog has nothing left to enforce."""
        self._disarmed.set()

    # -- signals ------------------------------------------------------------------------------

    def _on_signal(self, signum: int, _frame: FrameType | None) -> None:
        if self._aborted_at is not None:
            return  # already unwinding; the watchdog ends it if it hangs
        if signum == signal.SIGALRM:
            if self._deadline_passed:
                self._abort("deadline")
            return
        if self._requested_at is None:
            self._requested_at = time.monotonic()
            log.info(
                "shutdown_requested",
                signal=signal.Signals(signum).name,
                deadline_s=self.deadline_s,
            )
            for callback in self._on_request:
                callback()
            self._watchdog = threading.Thread(
                target=self._watch, name="offsetkeeper-shutdown", daemon=True
            )
            self._watchdog.start()
            return
        self._abort(f"second {signal.Signals(signum).name}")

    def _abort(self, reason: str) -> None:
        self._aborted_at = time.monotonic()
        log.warning(
            "shutdown_aborted",
            reason=reason,
            deadline_s=self.deadline_s,
            exit_code=EXIT_ABORTED,
            in_flight_batch="rolled back",
        )
        raise ShutdownAborted(reason)

    # -- the watchdog ------------------------------------------------------------------------

    def _watch(self) -> None:
        requested_at = self._requested_at
        if requested_at is None:
            return
        while not self._disarmed.wait(_WATCH_INTERVAL_S):
            now = time.monotonic()
            if self._aborted_at is None and not self._deadline_passed:
                if now - requested_at >= self.deadline_s:
                    self._deadline_passed = True
                    signal.pthread_kill(self._main_thread, signal.SIGALRM)
                continue
            aborted_at = self._aborted_at
            started = aborted_at if aborted_at is not None else requested_at + self.deadline_s
            if now - started >= self._abort_grace_s:
                log.error(
                    "shutdown_forced",
                    reason="the abort did not finish in time",
                    abort_grace_s=self._abort_grace_s,
                    exit_code=EXIT_ABORTED,
                )
                self._exit_hard(EXIT_ABORTED)
                return
