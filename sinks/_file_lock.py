"""The file sink's directory lock: every mutation of the directory holds it."""

from __future__ import annotations

import fcntl
import os
import time
from pathlib import Path

from consumer import SinkError


class DirectoryLock:
    """An exclusive flock on DIR/_offsetkeeper/lock, waited for up to a timeout. The kernel
    releases it when the holding process dies, so a crash never leaves the directory locked."""

    def __init__(self, path: Path, timeout_s: float) -> None:
        self._path = path
        self._timeout_s = timeout_s
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> None:
        if self._fd is not None:
            return
        # A new open file description per acquisition: flock excludes other sinks in this
        # process too, not only other processes.
        fd = os.open(self._path, os.O_RDWR | os.O_CREAT, 0o644)
        deadline = time.monotonic() + self._timeout_s
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    os.close(fd)
                    raise SinkError(
                        "the file sink's lock is held by another writer",
                        lock=str(self._path),
                        waited_s=self._timeout_s,
                    ) from None
                time.sleep(0.005)
            else:
                self._fd = fd
                return

    def release(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            os.close(fd)  # closing the last descriptor drops the flock
