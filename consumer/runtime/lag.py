"""Consumer lag, sampled in the background: every `interval_s`, ask the broker for the end offset
(high watermark) of every partition this member owns, and hand them to `Telemetry`, which sets
lag = end offset - checkpoint stored in the sink.

The sampler runs on its own thread with its own Kafka client (one that never joins a group),
so the partition loop never waits on these round trips, and a sink outage that holds the loop
in its retries does not freeze the lag: it keeps growing, visibly, while records arrive.
Between samples, every commit lowers the lag against the last sampled end offset.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping
from typing import Protocol

import structlog

from consumer.core.errors import OffsetkeeperError
from consumer.core.records import TopicPartition

log = structlog.get_logger("offsetkeeper.lag")


class WatermarkSource(Protocol):
    """Where end offsets come from (a `PartitionReader` fits)."""

    def watermarks(self, partition: TopicPartition, timeout_s: float = 10.0) -> tuple[int, int]: ...

    def close(self) -> None: ...


class LagTarget(Protocol):
    """Where samples go (`Telemetry`)."""

    def positions(self) -> Mapping[TopicPartition, int | None]: ...

    def ends_sampled(self, ends: Mapping[TopicPartition, int]) -> None: ...

    def starts_sampled(self, starts: Mapping[TopicPartition, int]) -> None:
        """The log start offsets sampled with the ends (records below them are gone)."""
        ...

    def ends_unknown(self) -> None: ...


class LagSampler:
    """See the module docstring. `open_source` is called on the sampler's thread, which owns
    the client it returns (and closes it when stopped)."""

    def __init__(
        self,
        target: LagTarget,
        open_source: Callable[[], WatermarkSource],
        *,
        interval_s: float = 10.0,
        timeout_s: float = 5.0,
    ) -> None:
        self._target = target
        self._open_source = open_source
        self._interval_s = interval_s
        self._timeout_s = min(timeout_s, interval_s)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._failing = False

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="offsetkeeper-lag", daemon=True)
        self._thread.start()

    def stop(self, timeout_s: float = 10.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout_s)

    def _run(self) -> None:
        source: WatermarkSource | None = None
        try:
            while not self._stop.is_set():
                if source is None:
                    source = self._open(source)
                if source is not None:
                    self.sample(source)
                self._stop.wait(self._interval_s)
        finally:
            if source is not None:
                source.close()

    def _open(self, source: WatermarkSource | None) -> WatermarkSource | None:
        try:
            return self._open_source()
        except OffsetkeeperError as exc:
            self._note_failure(str(exc))
            return source

    def sample(self, source: WatermarkSource) -> None:
        """One sample of every owned partition whose stored position is known."""
        ends: dict[TopicPartition, int] = {}
        starts: dict[TopicPartition, int] = {}
        for tp in sorted(self._target.positions()):
            if self._stop.is_set():
                return
            try:
                starts[tp], ends[tp] = source.watermarks(tp, self._timeout_s)
            except OffsetkeeperError as exc:
                self._note_failure(str(exc))
                return
        self._target.ends_sampled(ends)
        self._target.starts_sampled(starts)
        if self._failing:
            self._failing = False
            log.info("lag_sampling_recovered", partitions=len(ends))

    def _note_failure(self, error: str) -> None:
        self._target.ends_unknown()
        if not self._failing:  # one line per failure streak, not one per interval
            self._failing = True
            log.warning("lag_sampling_failed", error=error)
