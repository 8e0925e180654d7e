"""Fault injection for the crash tests: kill this process at a named point of the commit
sequence. Off unless the test environment variables are set; read once at start-up."""

from __future__ import annotations

import os
import signal
from dataclasses import dataclass

# Fault injection for the crash tests: the engine reads it once at start-up, never at import.
# Values: "after-rows" (outputs written, no COMMIT yet), "after-commit" (COMMIT done, no
# advisory Kafka commit yet) or "after-dead-letters" (the batch's dead letters acknowledged by
# the broker, nothing committed yet). OFFSETKEEPER_TEST_CRASH_AFTER_BATCHES picks which batch
# (default 1).
CRASH_POINT_ENV = "OFFSETKEEPER_TEST_CRASH_POINT"
CRASH_AFTER_ENV = "OFFSETKEEPER_TEST_CRASH_AFTER_BATCHES"
# "file-after-data": inside the file sink's commit, data files renamed, checkpoint not yet.
# "after-split-part": a part of a batch the sink refused committed, the rest not yet.
CRASH_POINTS = frozenset(
    {"after-rows", "after-commit", "after-dead-letters", "file-after-data", "after-split-part"}
)


@dataclass(slots=True)
class CrashInjector:
    """Kills this process with SIGKILL at a named point of the commit sequence (tests only)."""

    point: str | None = None
    after_batches: int = 1
    _batches: int = 0

    @classmethod
    def from_environment(cls) -> CrashInjector:
        point = os.environ.get(CRASH_POINT_ENV) or None
        if point is not None and point not in CRASH_POINTS:
            point = None
        return cls(point=point, after_batches=int(os.environ.get(CRASH_AFTER_ENV, "1")))

    def at(self, point: str) -> None:
        if self.point != point:
            return
        self._batches += 1  # each point is reached once per batch
        if self._batches >= self.after_batches:
            os.kill(os.getpid(), signal.SIGKILL)
