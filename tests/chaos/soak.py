"""The soak's instruments: a steady stream with a few bad records, a sampler of one consumer
process (resident memory, open file descriptors) and of the group's lag, and the verdicts drawn
from the samples."""

from __future__ import annotations

import json
import statistics
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from confluent_kafka import Consumer, Producer, TopicPartition

from tests.fixtures.chaos import chaos_event
from tests.fixtures.kafka_tools import unique_name


def bad_event(index: int) -> tuple[bytes, bytes]:
    """Valid JSON that the chaos app refuses (no "version"): a bad record, dead-lettered."""
    key = f"bad-{index}"
    return key.encode(), json.dumps({"key": key}).encode()


@dataclass
class SteadyStream:
    """Produces `rate` records once a second, every `bad_every`-th a bad one, until stopped.

    One burst per second (not an even trickle) so that between bursts a consumer that keeps up
    has committed everything: its lag is then exactly 0, which is what the soak checks after
    each rebalance."""

    bootstrap: str
    topic: str
    rate: int
    bad_every: int
    keys: int = 5_000
    produced: int = 0
    bad: int = 0
    error: BaseException | None = None
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> SteadyStream:
        self._thread = threading.Thread(target=self._run, name="steady-stream", daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        try:
            producer = Producer(
                {"bootstrap.servers": self.bootstrap, "enable.idempotence": True, "linger.ms": 5}
            )
            next_burst = time.monotonic()
            while not self._stop.is_set():
                for _ in range(self.rate):
                    index = self.produced
                    if index % self.bad_every == self.bad_every - 1:
                        key, value = bad_event(index)
                        self.bad += 1
                    else:
                        key, value = chaos_event(index, self.keys)
                    producer.produce(self.topic, key=key, value=value)
                    self.produced += 1
                if producer.flush(60):
                    raise RuntimeError("the steady stream could not deliver a burst")
                next_burst += 1.0
                self._stop.wait(max(0.0, next_burst - time.monotonic()))
        except BaseException as exc:
            self.error = exc

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=120)
        if self.error is not None:
            raise self.error


@dataclass(frozen=True)
class Sample:
    at: float  # seconds since the soak started
    rss_kib: int
    open_fds: int
    committed: dict[int, int]
    ends: dict[int, int]

    @property
    def lag(self) -> int:
        return sum(max(0, end - self.committed.get(p, 0)) for p, end in self.ends.items())


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"process {pid} has no VmRSS")


def end_offsets_of(reader: Consumer, topic: str, partitions: int) -> dict[int, int]:
    return {
        p: reader.get_watermark_offsets(TopicPartition(topic, p), timeout=10)[1]
        for p in range(partitions)
    }


@dataclass
class Sampler:
    """Every `interval` seconds: the watched process's RSS and open descriptors, the group's
    committed offsets (read first) and the topic's end offsets (read second, so a lag of 0 means
    the commits had reached offsets that existed when the ends were read)."""

    bootstrap: str
    topic: str
    partitions: int
    pid: int
    committed: Callable[[], dict[int, int]]
    interval: float = 1.0
    samples: list[Sample] = field(default_factory=list)
    error: BaseException | None = None
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None
    _started: float = field(default_factory=time.monotonic)

    def start(self) -> Sampler:
        self._started = time.monotonic()
        self._thread = threading.Thread(target=self._run, name="soak-sampler", daemon=True)
        self._thread.start()
        return self

    def elapsed(self) -> float:
        return time.monotonic() - self._started

    def ends_now(self) -> dict[int, int]:
        """The topic's end offsets now, from a reader of the caller's own."""
        reader = Consumer({"bootstrap.servers": self.bootstrap, "group.id": unique_name("ends")})
        try:
            return end_offsets_of(reader, self.topic, self.partitions)
        finally:
            reader.close()

    def _run(self) -> None:
        reader = Consumer({"bootstrap.servers": self.bootstrap, "group.id": unique_name("lag")})
        try:
            while not self._stop.wait(self.interval):
                committed = self.committed()
                ends = end_offsets_of(reader, self.topic, self.partitions)
                self.samples.append(
                    Sample(
                        at=self.elapsed(),
                        rss_kib=_rss_kib(self.pid),
                        open_fds=len(list(Path(f"/proc/{self.pid}/fd").iterdir())),
                        committed=committed,
                        ends=ends,
                    )
                )
        except BaseException as exc:
            self.error = exc
        finally:
            reader.close()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=60)
        if self.error is not None:
            raise self.error


def catch_up_seconds(
    samples: list[Sample], rebalanced_at: float, ends_then: dict[int, int]
) -> float | None:
    """Seconds from a rebalance until the group's lag was exactly 0 on records that arrived
    after it in every partition (`ends_then`: the end offsets read once it had completed), so
    the partitions that moved were served by their new owner; None if that never happened."""
    for sample in samples:
        if sample.at <= rebalanced_at or sample.lag != 0:
            continue
        if all(sample.ends[p] > ends_then[p] for p in ends_then):
            return sample.at - rebalanced_at
    return None


@dataclass(frozen=True)
class ResourceVerdict:
    rss_after_warm_up_kib: float
    rss_at_end_kib: float
    rss_growth: float  # a fraction: 0.05 is 5 %
    fds_after_warm_up: int
    fds_at_end: int


def resource_verdict(samples: list[Sample], warm_up: float, window: float) -> ResourceVerdict:
    """Median RSS of the `window` seconds after warm-up against that of the last `window`
    seconds (medians, so one sample taken mid-batch does not decide), and the most descriptors
    open in each of the two windows."""
    first = [s for s in samples if warm_up <= s.at < warm_up + window]
    last = [s for s in samples if s.at >= samples[-1].at - window]
    if not first or not last:
        raise AssertionError(f"too few samples for the windows: {len(samples)}")
    rss_first = statistics.median(s.rss_kib for s in first)
    rss_last = statistics.median(s.rss_kib for s in last)
    return ResourceVerdict(
        rss_after_warm_up_kib=rss_first,
        rss_at_end_kib=rss_last,
        rss_growth=(rss_last - rss_first) / rss_first,
        fds_after_warm_up=max(s.open_fds for s in first),
        fds_at_end=max(s.open_fds for s in last),
    )
