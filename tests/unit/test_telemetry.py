"""The engine's observer hooks, end to end: Engine (FakeBackend, real SQLite sink) -> Telemetry ->
the Prometheus registry and the health state, plus the lag sampler fed from the fake broker."""

from __future__ import annotations

import json
import re
import urllib.error
import urllib.request
from collections.abc import Callable, MutableMapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import prometheus_client
import pytest

from consumer import Sink, SinkError, TopicPartition
from consumer.core.exit_codes import EXIT_OK, EXIT_PARTITIONS_STOPPED
from consumer.engine.batch import BadRecordPolicy, DeadLetter
from consumer.engine.data_loss import DataLossPolicy
from consumer.engine.dead_letters import DeadLetterWriter
from consumer.engine.group import Engine, EngineSettings
from consumer.runtime.health import Health, Verdict
from consumer.runtime.lag import LagSampler
from consumer.runtime.metrics import Metrics
from consumer.runtime.ops_server import OpsServer
from consumer.runtime.telemetry import Telemetry
from sinks import SqliteSink
from tests.fixtures.apps import event, events_app
from tests.fixtures.fake_backend import Assign, Call, FakeBackend, FakeClock, Fetch, Idle, Step
from tests.fixtures.flaky_sink import FlakySink
from tests.fixtures.sqlite_db import checkpoints

GROUP = "telemetry-group"
TOPIC = "events"
P0 = TopicPartition(TOPIC, 0)
P1 = TopicPartition(TOPIC, 1)


Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


@dataclass
class Observed:
    engine: Engine
    backend: FakeBackend
    clock: FakeClock
    telemetry: Telemetry
    sampler: LagSampler
    db: Path
    # What the registry and /readyz said just before the engine left the group (which revokes
    # every partition still assigned).
    at_close: Samples = field(default_factory=dict)
    ready_at_close: Verdict | None = None

    def value(self, name: str, **labels: str) -> float | None:
        return self.telemetry.metrics.registry.get_sample_value(name, labels)

    def before_close(self, name: str, **labels: str) -> float | None:
        return self.at_close.get((name, frozenset(labels.items())))

    def snapshot(self) -> None:
        for family in self.telemetry.metrics.registry.collect():
            for sample in family.samples:
                self.at_close[(sample.name, frozenset(sample.labels.items()))] = sample.value
        self.ready_at_close = self.telemetry.health.readiness()

    def sample_lag(self) -> None:
        self.sampler.sample(self.backend)


def _observed(
    tmp_path: Path,
    script: Sequence[Step],
    *,
    sink: Sink | None = None,
    batch_max_records: int = 4,
    readiness_timeout_s: float = 30.0,
    dead_letters: DeadLetterWriter | None = None,
    after_sleep: Callable[[], None] = lambda: None,
    on_data_loss: DataLossPolicy = "stop",
) -> Observed:
    clock = FakeClock()

    def sleep(seconds: float) -> None:  # the engine sleeps between retries: tests look in then
        clock.sleep(seconds)
        after_sleep()

    backend = FakeBackend(script, clock=clock)
    health = Health(readiness_timeout_s=readiness_timeout_s, clock=clock.now)
    telemetry = Telemetry(
        Metrics(app="events", group=GROUP, process_metrics=False),
        health,
        clock=clock.now,
        wall_clock=lambda: 1_800_000_000.0,
    )
    db = tmp_path / "telemetry.db"
    engine = Engine(
        events_app(),
        EngineSettings(
            group=GROUP,
            topics=(TOPIC,),
            batch_max_records=batch_max_records,
            poll_timeout_s=0.5,
            stop_when_idle_s=1.0,
            bad_records=BadRecordPolicy(action="stop" if dead_letters is None else "dead-letter"),
            on_data_loss=on_data_loss,
        ),
        backend,
        sink or SqliteSink(db),
        clock=clock.now,
        sleep=sleep,
        observer=telemetry,
        dead_letters=dead_letters,
    )
    sampler = LagSampler(telemetry, lambda: backend, interval_s=1.0)
    observed = Observed(engine, backend, clock, telemetry, sampler, db)
    leave_group = backend.close

    def snapshot_then_close() -> None:
        if not backend.closed:
            observed.snapshot()
        leave_group()

    backend.close = snapshot_then_close  # type: ignore[method-assign]
    return observed


def _tp(tp: TopicPartition) -> dict[str, str]:
    return {"topic": tp.topic, "partition": str(tp.partition)}


def test_counters_offsets_and_lag_follow_the_commits(tmp_path: Path) -> None:
    lag_seen: list[float | None] = []
    o = _observed(tmp_path, [])
    o.backend.then(
        Assign([P0, P1]),
        Call(o.sample_lag),  # ends known: P0 has 10 records waiting, P1 has 5
        Call(lambda: lag_seen.append(o.value("offsetkeeper_consumer_lag", **_tp(P0)))),
        Fetch(),
        Idle(),  # an empty poll settles the batch in flight
        Call(lambda: lag_seen.append(o.value("offsetkeeper_consumer_lag", **_tp(P0)))),
    )
    o.backend.append(P0, *(event(f"a{i}", i) for i in range(10)))
    o.backend.append(P1, *(event(f"b{i}", i) for i in range(5)))

    assert o.engine.run() == EXIT_OK

    # Lag 10 at the first sample, then lowered by the first commit alone (no new sample).
    assert lag_seen == [10, 8]
    assert checkpoints(o.db, GROUP) == {(TOPIC, 0): 10, (TOPIC, 1): 5}
    for tp, records in ((P0, 10), (P1, 5)):
        assert o.value("offsetkeeper_records_consumed_total", **_tp(tp)) == records
        assert o.value("offsetkeeper_records_committed_total", **_tp(tp)) == records
        assert o.before_close("offsetkeeper_committed_offset", **_tp(tp)) == records
        assert o.before_close("offsetkeeper_consumer_lag", **_tp(tp)) == 0
        assert o.before_close("offsetkeeper_log_end_offset", **_tp(tp)) == records
        # Leaving the group revoked them: their gauges went with them.
        assert o.value("offsetkeeper_consumer_lag", **_tp(tp)) is None
    assert o.value("offsetkeeper_rows_committed_total") == 15
    batches = o.engine.batches_committed
    assert batches >= 4  # 15 records, at most 4 per batch
    assert o.value("offsetkeeper_batches_committed_total") == batches
    assert o.value("offsetkeeper_batch_records_count") == batches
    assert o.value("offsetkeeper_batch_records_sum") == 15
    assert o.value("offsetkeeper_batch_duration_seconds_count") == batches
    assert o.value("offsetkeeper_sink_duration_seconds_count", action="commit") == batches
    assert o.value("offsetkeeper_sink_duration_seconds_count", action="acquire") == 1
    assert o.value("offsetkeeper_rebalances_total", kind="assigned") == 1
    assert o.before_close("offsetkeeper_assigned_partitions") == 2
    assert o.value("offsetkeeper_assigned_partitions") == 0
    assert o.value("offsetkeeper_rebalances_total", kind="revoked") == 1
    assert o.value("offsetkeeper_last_commit_timestamp_seconds") == 1_800_000_000.0
    assert o.value("offsetkeeper_sink_retries_total", action="commit") is None
    assert o.value("offsetkeeper_consumer_info", app="events", group=GROUP) == 1


def test_sink_retries_are_counted_and_the_failing_gauge_resets(tmp_path: Path) -> None:
    flaky = FlakySink(tmp_path / "telemetry.db", failures=3)
    o = _observed(tmp_path, [Assign([P0])], sink=flaky)
    o.backend.append(P0, event("a", 1))

    assert o.engine.run() == EXIT_OK

    assert flaky.commit_attempts == 4
    assert o.value("offsetkeeper_sink_retries_total", action="commit") == 3
    assert o.value("offsetkeeper_sink_duration_seconds_count", action="commit") == 1
    assert o.value("offsetkeeper_sink_failing_seconds") == 0
    assert o.telemetry.health.readiness().ok


ROW_VALUE = "card-4111-1111-1111-1111"


class StringDataRightTruncation(Exception):  # noqa: N818 - named as psycopg names it
    """Stands in for the driver's exception (psycopg's quotes the refused value)."""


class RowQuotingSink(SqliteSink):
    """A SqliteSink whose commits fail the way PostgreSQL's do: the message quotes the row."""

    def commit(self) -> None:
        try:
            raise StringDataRightTruncation(f'value too long: "{ROW_VALUE}"')
        except StringDataRightTruncation as exc:
            raise SinkError(
                f"cannot write rows: value too long for column id: {ROW_VALUE}",
                table="events",
                sqlstate="22001",
                reason=f'ERROR: value too long for type character varying(8): "{ROW_VALUE}"',
            ) from exc


def test_readyz_names_the_failing_action_class_and_sqlstate_but_never_a_row_value(
    tmp_path: Path, log_events: list[MutableMapping[str, Any]]
) -> None:
    answers: list[tuple[int, dict[str, Any]]] = []

    def ask_readyz() -> None:  # over real HTTP, while the engine waits to retry the commit
        request = urllib.request.Request(f"http://127.0.0.1:{server.port}/readyz")
        try:
            with urllib.request.urlopen(request, timeout=5) as answer:  # noqa: S310 - our server
                status, body = answer.status, answer.read()
        except urllib.error.HTTPError as error:
            status, body = error.code, error.read()
        assert ROW_VALUE.encode() not in body
        answers.append((status, json.loads(body)))

    o = _observed(
        tmp_path,
        [Assign([P0])],
        sink=RowQuotingSink(tmp_path / "telemetry.db"),
        readiness_timeout_s=2.0,
        after_sleep=ask_readyz,
    )
    server = OpsServer("127.0.0.1", 0, o.telemetry.metrics.registry, o.telemetry.health)
    server.start()
    try:
        o.backend.append(P0, event(ROW_VALUE, 1))
        with pytest.raises(SinkError, match="value too long"):
            o.engine.run()
    finally:
        server.stop()

    status, body = answers[-1]
    assert status == 503
    [reason] = body["reasons"]
    assert re.fullmatch(
        r"the sink has been failing for \d+s: commit failed with SinkError "
        rf"\({re.escape(__name__)}\.StringDataRightTruncation, SQLSTATE 22001\)",
        reason,
    ), reason
    assert "value too long" not in reason
    # The log keeps the whole message: it is not served over HTTP.
    retries = [e for e in log_events if e["event"] == "sink_retry"]
    assert retries
    assert all(ROW_VALUE in e["error"] for e in retries)


def test_a_sink_that_is_not_up_at_start_is_retried_not_fatal(tmp_path: Path) -> None:
    flaky = FlakySink(tmp_path / "telemetry.db", failures=0, open_failures=2)
    o = _observed(tmp_path, [Assign([P0])], sink=flaky)
    o.backend.append(P0, event("a", 1))

    assert o.engine.run() == EXIT_OK

    assert o.value("offsetkeeper_sink_retries_total", action="open") == 2
    assert o.value("offsetkeeper_sink_duration_seconds_count", action="open") == 1
    assert checkpoints(o.db, GROUP) == {(TOPIC, 0): 1}


def test_a_sink_failing_longer_than_the_readiness_timeout_is_reported(tmp_path: Path) -> None:
    readiness: list[tuple[bool, list[str]]] = []
    flaky = FlakySink(tmp_path / "telemetry.db", failures=1_000)

    def record_readiness() -> None:
        verdict = o.telemetry.health.readiness()
        readiness.append((verdict.ok, verdict.body["reasons"]))

    o = _observed(
        tmp_path,
        [Assign([P0])],
        sink=flaky,
        readiness_timeout_s=2.0,
        after_sleep=record_readiness,
    )
    o.backend.append(P0, event("a", 1))
    with pytest.raises(Exception, match="disk full"):
        o.engine.run()

    assert readiness[0] == (True, [])
    assert readiness[-1][0] is False
    assert readiness[-1][1][0].startswith("the sink has been failing for ")
    # The action and the error class, never the message (a sink's message can quote rows).
    assert readiness[-1][1][0].endswith("s: commit failed with SinkError")
    assert not any("disk full" in reason for _ok, reasons in readiness for reason in reasons)
    assert o.value("offsetkeeper_sink_retries_total", action="commit") == flaky.commit_attempts


def test_a_bad_record_is_counted_and_makes_the_consumer_unready(tmp_path: Path) -> None:
    o = _observed(tmp_path, [Assign([P0, P1])])
    o.backend.append(P0, event("a", 1), {"fail": "invalid"}, event("c", 3))
    o.backend.append(P1, event("d", 4))

    assert o.engine.run() == EXIT_PARTITIONS_STOPPED

    labels = {**_tp(P0), "error_type": "InvalidRecordError", "outcome": "stopped"}
    assert o.value("offsetkeeper_bad_records_total", **labels) == 1
    assert o.before_close("offsetkeeper_partitions_stopped") == 1
    assert o.value("offsetkeeper_partitions_stopped") == 0  # released on leaving the group
    # Consumed counts what was handed to the processor; committed stops before the bad record.
    assert o.value("offsetkeeper_records_consumed_total", **_tp(P0)) == 3
    assert o.value("offsetkeeper_records_committed_total", **_tp(P0)) == 1
    verdict = o.ready_at_close
    assert verdict is not None
    assert not verdict.ok
    assert verdict.body["reasons"] == ["events[0] is stopped on a bad record at offset 1"]
    assert o.engine.stopped_partitions.keys() == {P0}  # still reported after leaving


def test_revocation_drops_the_partition_gauges_but_keeps_its_counters(tmp_path: Path) -> None:
    from tests.fixtures.fake_backend import Revoke  # noqa: PLC0415 - one test needs it

    o = _observed(tmp_path, [])
    o.backend.then(Assign([P0, P1]), Call(o.sample_lag), Fetch(), Revoke([P1]), Idle())
    o.backend.append(P0, event("a", 1))
    o.backend.append(P1, event("b", 2))

    assert o.engine.run() == EXIT_OK

    assert o.before_close("offsetkeeper_rebalances_total", kind="revoked") == 1
    assert o.before_close("offsetkeeper_assigned_partitions") == 1
    assert o.before_close("offsetkeeper_consumer_lag", **_tp(P1)) is None
    assert o.before_close("offsetkeeper_committed_offset", **_tp(P1)) is None
    assert o.before_close("offsetkeeper_consumer_lag", **_tp(P0)) == 0
    assert o.value("offsetkeeper_records_committed_total", **_tp(P1)) == 1  # counters stay
    assert o.telemetry.positions() == {}


def test_a_fencing_rejection_is_counted_and_the_partition_released(tmp_path: Path) -> None:
    from tests.fixtures.apps import EVENTS  # noqa: PLC0415 - one test needs it

    o = _observed(tmp_path, [])

    def newer_owner_takes_p1() -> None:
        rival = SqliteSink(o.db)
        rival.open([EVENTS])
        rival.acquire(GROUP, [P1])  # bumps P1's epoch behind the engine's back
        rival.close()

    o.backend.then(Assign([P0, P1]), Call(o.sample_lag), Call(newer_owner_takes_p1), Fetch())
    o.backend.append(P0, event("a", 1))
    o.backend.append(P1, event("b", 2))

    assert o.engine.run() == EXIT_OK

    assert o.value("offsetkeeper_fenced_partitions_total", **_tp(P1)) == 1
    assert o.value("offsetkeeper_fenced_partitions_total", **_tp(P0)) is None
    assert o.before_close("offsetkeeper_assigned_partitions") == 1
    assert o.before_close("offsetkeeper_consumer_lag", **_tp(P1)) is None  # not ours any more
    assert o.value("offsetkeeper_records_committed_total", **_tp(P0)) == 1
    assert o.value("offsetkeeper_records_committed_total", **_tp(P1)) is None
    assert o.value("offsetkeeper_records_consumed_total", **_tp(P1)) == 1  # fetched, rolled back


def test_an_empty_assignment_means_joined_and_ready_but_not_assigned_for_idleness(
    tmp_path: Path,
) -> None:
    seen: list[tuple[bool, int]] = []
    o = _observed(tmp_path, [])

    def look() -> None:
        seen.append((o.telemetry.health.readiness().ok, o.backend.polls))

    # Joined with nothing; idle far longer than stop_when_idle_s; then partitions arrive.
    o.backend.then(Assign([]), Call(look), *(Idle() for _ in range(6)), Assign([P0]), Call(look))
    o.backend.append(P0, event("a", 1))

    assert o.engine.run() == EXIT_OK

    assert [ok for ok, _polls in seen] == [True, True]
    assert o.backend.start_positions[0] == {}
    assert checkpoints(o.db, GROUP) == {(TOPIC, 0): 1}  # it waited for the partition
    assert o.value("offsetkeeper_rebalances_total", kind="assigned") == 1


def test_a_member_given_partitions_is_not_ready_until_it_owns_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Ready means owning what was assigned: not while the sink is still acquiring the
    partitions (a slow first acquire on a fresh database was a window of "ready, nothing
    owned")."""
    seen: list[bool] = []
    o = _observed(tmp_path, [Assign([P0])])
    acquire = SqliteSink.acquire

    def watched_acquire(self: SqliteSink, *args: Any, **kwargs: Any) -> Any:
        seen.append(o.telemetry.health.readiness().ok)
        return acquire(self, *args, **kwargs)

    monkeypatch.setattr(SqliteSink, "acquire", watched_acquire)
    o.backend.then(Call(lambda: seen.append(o.telemetry.health.readiness().ok)))
    o.backend.append(P0, event("a", 1))

    assert o.engine.run() == EXIT_OK

    assert seen == [False, True]


def test_stopping_is_reported_at_once(tmp_path: Path) -> None:
    o = _observed(tmp_path, [Assign([P0])])
    o.backend.then(Call(o.engine.request_stop))
    o.backend.append(P0, event("a", 1))

    assert o.engine.run() == EXIT_OK

    verdict = o.telemetry.health.readiness()
    assert (verdict.ok, verdict.body["reasons"]) == (False, ["shutting down"])
    assert o.value("offsetkeeper_ready") == 0


def test_a_failed_lag_sample_is_counted_and_logged_once_per_streak(
    tmp_path: Path, log_events: list[dict[str, object]]
) -> None:
    from consumer import KafkaError  # noqa: PLC0415 - one test needs it

    class DownBroker:
        calls = 0

        def watermarks(self, partition: TopicPartition, timeout_s: float = 10.0) -> tuple[int, int]:
            DownBroker.calls += 1
            raise KafkaError("cannot read watermarks", topic=partition.topic, retriable=True)

        def close(self) -> None:
            pass

    o = _observed(tmp_path, [Assign([P0])])
    o.backend.then(Call(lambda: o.sampler.sample(DownBroker())))
    o.backend.then(Call(lambda: o.sampler.sample(DownBroker())))
    o.backend.then(Call(o.sample_lag))
    o.backend.append(P0, event("a", 1))

    assert o.engine.run() == EXIT_OK

    assert o.value("offsetkeeper_lag_sample_errors_total") == 2
    names = [e["event"] for e in log_events if str(e["event"]).startswith("lag_sampling")]
    assert names == ["lag_sampling_failed", "lag_sampling_recovered"]


def test_the_sampler_thread_samples_until_stopped_and_closes_its_client(tmp_path: Path) -> None:
    o = _observed(tmp_path, [])
    o.telemetry.partitions_assigned({P0: 0})
    o.backend.append(P0, event("a", 1), event("b", 2))
    closed: list[bool] = []

    class Source:
        def watermarks(self, partition: TopicPartition, timeout_s: float = 10.0) -> tuple[int, int]:
            return o.backend.watermarks(partition, timeout_s)

        def close(self) -> None:
            closed.append(True)

    sampler = LagSampler(o.telemetry, Source, interval_s=0.01)
    sampler.start()
    try:
        for _ in range(500):
            if o.value("offsetkeeper_consumer_lag", **_tp(P0)) == 2:
                break
            import time  # noqa: PLC0415 - real time only in this threaded test

            time.sleep(0.01)
    finally:
        sampler.stop()
    assert o.value("offsetkeeper_consumer_lag", **_tp(P0)) == 2
    assert closed == [True]


def test_metrics_live_in_their_own_registry_never_the_global_one() -> None:
    before = set(prometheus_client.REGISTRY._names_to_collectors)

    first = Metrics(app="a", group="g", process_metrics=True)
    second = Metrics(app="a", group="g", process_metrics=True)  # no "duplicated timeseries"

    assert set(prometheus_client.REGISTRY._names_to_collectors) == before
    assert first.registry is not second.registry
    assert first.registry.get_sample_value("process_cpu_seconds_total") is not None
    import consumer.runtime.metrics as module  # noqa: PLC0415

    defined_at_import = [
        name
        for name, value in vars(module).items()
        if isinstance(value, prometheus_client.metrics.MetricWrapperBase)
    ]
    assert defined_at_import == []


class _KeptDeadLetters:
    def __init__(self) -> None:
        self.letters: list[DeadLetter] = []

    def topic_for(self, source_topic: str) -> str:
        return "dlq"

    def prepare(self, source_topics: Sequence[str]) -> None:
        pass

    def write(self, letters: Sequence[DeadLetter]) -> None:
        self.letters.extend(letters)

    def close(self) -> None:
        pass


def test_a_dead_lettered_record_is_counted_and_the_consumer_stays_ready(tmp_path: Path) -> None:
    kept = _KeptDeadLetters()
    o = _observed(tmp_path, [Assign([P0])], dead_letters=kept)
    o.backend.append(P0, event("a", 1), {"fail": "invalid"}, event("c", 3))

    assert o.engine.run() == EXIT_OK

    labels = {**_tp(P0), "error_type": "InvalidRecordError", "outcome": "dead_lettered"}
    assert o.value("offsetkeeper_bad_records_total", **labels) == 1
    assert o.value("offsetkeeper_records_committed_total", **_tp(P0)) == 3
    assert len(kept.letters) == 1
    verdict = o.ready_at_close
    assert verdict is not None
    assert verdict.ok


@pytest.mark.parametrize("policy", ["stop", "skip"])
def test_records_lost_to_retention_show_in_the_metrics(
    tmp_path: Path, policy: DataLossPolicy
) -> None:
    o = _observed(tmp_path, [], on_data_loss=policy)
    o.backend.then(Assign([P0]), Fetch(per_partition=2), Idle())
    o.backend.append(P0, *(event(f"a{i}", i) for i in range(10)))
    # The consumer read 2 records; retention then deleted 2..5 before it read them, and the
    # lag sampler saw the log start move past the checkpoint before the next fetch.
    o.backend.then(Call(lambda: o.backend.delete_records(P0, 6)), Call(o.sample_lag))

    code = o.engine.run()

    behind = o.before_close("offsetkeeper_records_behind_log_start", **_tp(P0))
    if policy == "stop":
        assert code == EXIT_PARTITIONS_STOPPED
        assert behind == 4, "the gauge says what checkpoint verify would"
        assert o.before_close("offsetkeeper_partitions_stopped") == 1
        assert o.value("offsetkeeper_records_lost_total", **_tp(P0)) is None
    else:
        assert code == EXIT_OK
        assert o.value("offsetkeeper_records_lost_total", **_tp(P0)) == 4
        assert checkpoints(o.db, GROUP) == {(TOPIC, 0): 10}
