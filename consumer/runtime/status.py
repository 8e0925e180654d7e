"""What the status page shows of one consumer process, as one snapshot (`StatusReport`): what
runs (app, group, topics, version), each owned partition's progress, the stopped partitions
with their error, and the counts of dead letters, lost records and sink retries.

It is read from the health state and the metrics registry only, never from the engine, and
holds nothing a row value could reach: error classes, field names and offsets, no messages.
A report travels as JSON (`/status.json`), so the supervisor of `run --workers N` can show its
workers' reports on its own page.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from prometheus_client.metrics import MetricWrapperBase

from consumer._version import __version__
from consumer.runtime.health import Health, PartitionState, SinkFailure, SinkState, StopCause
from consumer.runtime.metrics import Metrics


def offsetkeeper_version() -> str:
    """The one version of consumer/_version.py (what `offsetkeeper --version` prints)."""
    return __version__


@dataclass(frozen=True, slots=True)
class ConsumerInfo:
    """What runs: fixed for the life of the process."""

    app: str
    group: str
    topics: tuple[str, ...]
    version: str


@dataclass(frozen=True, slots=True)
class Tallies:
    """Counts since the process started (the registry's counters, summed over labels)."""

    dead_letters: int = 0
    bad_records_stopped: int = 0
    records_lost: int = 0
    sink_retries: int = 0
    fenced: int = 0


@dataclass(frozen=True, slots=True)
class StatusReport:
    """One process's status; see the module docstring."""

    info: ConsumerInfo
    ready: bool
    reasons: tuple[str, ...]
    partitions: tuple[PartitionState, ...]
    sink: SinkState
    tallies: Tallies
    taken_at: float  # Unix time

    @property
    def stopped(self) -> tuple[PartitionState, ...]:
        return tuple(p for p in self.partitions if p.stopped is not None)

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, document: dict[str, Any]) -> StatusReport:
        """The inverse of `to_json` (a `KeyError` or `TypeError` for anything else)."""
        info = document["info"]
        sink = document["sink"]
        failure = sink["failure"]
        return cls(
            info=ConsumerInfo(
                app=str(info["app"]),
                group=str(info["group"]),
                topics=tuple(str(t) for t in info["topics"]),
                version=str(info["version"]),
            ),
            ready=bool(document["ready"]),
            reasons=tuple(str(r) for r in document["reasons"]),
            partitions=tuple(_partition_of(p) for p in document["partitions"]),
            sink=SinkState(
                failing_for_s=float(sink["failing_for_s"]),
                retries=int(sink["retries"]),
                failure=None
                if failure is None
                else SinkFailure(
                    action=failure["action"],
                    error=failure["error"],
                    cause=failure["cause"],
                    codes=tuple((str(k), str(v)) for k, v in failure["codes"]),
                ),
            ),
            tallies=Tallies(**{k: int(v) for k, v in document["tallies"].items()}),
            taken_at=float(document["taken_at"]),
        )


def _partition_of(document: dict[str, Any]) -> PartitionState:
    stopped = document["stopped"]
    return PartitionState(
        **{k: v for k, v in document.items() if k != "stopped"},
        stopped=None if stopped is None else StopCause(**stopped),
    )


def _total(family: MetricWrapperBase, **wanted: str) -> int:
    """The sum of a counter family's `_total` samples whose labels include `wanted`."""
    total = 0.0
    for metric in family.collect():
        for sample in metric.samples:
            if sample.name.endswith("_total") and all(
                sample.labels.get(k) == v for k, v in wanted.items()
            ):
                total += sample.value
    return round(total)


def tallies_of(metrics: Metrics) -> Tallies:
    return Tallies(
        dead_letters=_total(metrics.bad_records, outcome="dead_lettered"),
        bad_records_stopped=_total(metrics.bad_records, outcome="stopped"),
        records_lost=_total(metrics.records_lost),
        sink_retries=_total(metrics.sink_retries),
        fenced=_total(metrics.fenced),
    )


class StatusSource:
    """Takes a `StatusReport` from a process's health and metrics, on demand."""

    def __init__(
        self,
        info: ConsumerInfo,
        health: Health,
        metrics: Metrics,
        *,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self._info = info
        self._health = health
        self._metrics = metrics
        self._wall_clock = wall_clock

    def report(self) -> StatusReport:
        readiness = self._health.readiness()
        return StatusReport(
            info=self._info,
            ready=readiness.ok,
            reasons=tuple(str(r) for r in readiness.body.get("reasons", ())),
            partitions=self._health.partition_states(),
            sink=self._health.sink_state(),
            tallies=tallies_of(self._metrics),
            taken_at=self._wall_clock(),
        )


def combined_tallies(reports: Sequence[StatusReport]) -> Tallies:
    return Tallies(
        **{
            name.name: sum(getattr(r.tallies, name.name) for r in reports)
            for name in dataclasses.fields(Tallies)
        }
    )
