"""Replay planning and the replay loop, with an in-memory reader and the real SQLite sink."""

from __future__ import annotations

import io
import sqlite3
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from consumer import Checkpoint, ConfigError, TopicPartition
from consumer.engine.data_loss import DataLossPolicy
from consumer.engine.retry import RetryPolicy
from consumer.replay.job import ReplayOptions, run_replay
from consumer.replay.plan import (
    PartitionRange,
    Progress,
    RangeRequest,
    ReplayPlan,
    default_job_id,
    job_group,
    parse_timestamp,
    request_fingerprint,
    resolve_plan,
)
from sinks import SqliteSink
from tests.fixtures.apps import EVENTS, event, events_app
from tests.fixtures.fake_reader import FakeReader
from tests.fixtures.flaky_sink import FlakySink
from tests.fixtures.observers import RecordingObserver

TOPIC = "events"


@pytest.fixture
def sink(tmp_path: Path) -> SqliteSink:
    opened = SqliteSink(tmp_path / "replay.db")
    opened.open((EVENTS,))
    return opened


def _reader(per_partition: int = 10, partitions: int = 2) -> FakeReader:
    reader = FakeReader(TOPIC)
    for p in range(partitions):
        for i in range(per_partition):
            reader.append(p, event(f"p{p}-{i}", i), timestamp_ms=1_000 * i)
    return reader


def _plan(
    reader: FakeReader, sink: SqliteSink, request: RangeRequest, partitions: list[int] | None = None
) -> ReplayPlan:
    fingerprint = request_fingerprint(TOPIC, partitions, "tests:app", request)
    return resolve_plan(
        reader,
        sink,
        job_id="job",
        topic=TOPIC,
        partitions=partitions,
        request=request,
        fingerprint=fingerprint,
    )


def _rows(sink_path: Path) -> list[tuple[Any, ...]]:
    return (
        sqlite3.connect(sink_path)
        .execute(
            "SELECT id, source_partition, source_offset FROM events"
            " ORDER BY source_partition, source_offset"
        )
        .fetchall()
    )


# -- request validation ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({}, "exactly one of --from"),
        ({"from_offset": 1, "from_timestamp": "2024-01-01"}, "exactly one of --from"),
        ({"from_offset": 1, "to_offset": 2, "to_timestamp": "2024-01-01"}, "at most one"),
        ({"from_offset": -1}, "must not be negative"),
        ({"from_offset": 5, "to_offset": 4}, "--to-offset is before --from-offset"),
        ({"from_timestamp": "2024-01-02", "to_timestamp": "2024-01-01"}, "before --from-timestamp"),
        ({"from_timestamp": "soon"}, "not an ISO 8601 timestamp"),
    ],
)
def test_contradictory_requests_are_refused(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        RangeRequest(**kwargs)


def test_timestamps_without_a_zone_are_utc() -> None:
    assert parse_timestamp("2023-11-14T22:13:20") == 1_700_000_000_000
    assert parse_timestamp("2023-11-14T23:13:20+01:00") == 1_700_000_000_000


def test_the_default_job_id_is_stable_for_the_same_request_only() -> None:
    request = RangeRequest(from_offset=0)
    first = default_job_id(request_fingerprint(TOPIC, None, "a:app", request))
    assert first == default_job_id(
        request_fingerprint(TOPIC, None, "a:app", RangeRequest(from_offset=0))
    )
    assert first != default_job_id(request_fingerprint(TOPIC, [1], "a:app", request))
    assert first.startswith(f"{TOPIC}-")


# -- planning -------------------------------------------------------------------------------------


def test_offset_range_is_resolved_per_partition(sink: SqliteSink) -> None:
    plan = _plan(_reader(), sink, RangeRequest(from_offset=2, to_offset=7))
    assert plan.ranges == (PartitionRange(0, 2, 7), PartitionRange(1, 2, 7))
    assert plan.records == 10
    assert ReplayPlan.from_document(plan.to_document()) == plan


def test_to_end_means_the_end_when_planned(sink: SqliteSink) -> None:
    reader = _reader()
    plan = _plan(reader, sink, RangeRequest(from_offset=0), partitions=[1])
    reader.append(1, event("late", 1))
    assert plan.ranges == (PartitionRange(1, 0, 10),)


def test_timestamps_resolve_to_the_first_offset_at_or_after_them(sink: SqliteSink) -> None:
    plan = _plan(
        _reader(),
        sink,
        RangeRequest(from_timestamp="1970-01-01T00:00:03Z", to_timestamp="1970-01-01T00:00:06Z"),
    )
    assert plan.ranges == (PartitionRange(0, 3, 6), PartitionRange(1, 3, 6))


def test_from_checkpoint_starts_where_the_group_is(sink: SqliteSink) -> None:
    tps = [TopicPartition(TOPIC, 0), TopicPartition(TOPIC, 1)]
    epochs = sink.acquire("live", tps)
    sink.begin()
    now = datetime.now(tz=UTC)
    sink.save_checkpoints(
        "live", [Checkpoint("live", TOPIC, 0, 4, now), Checkpoint("live", TOPIC, 1, 9, now)], epochs
    )
    sink.commit()
    plan = _plan(_reader(), sink, RangeRequest(from_checkpoint="live"))
    assert plan.ranges == (PartitionRange(0, 4, 10), PartitionRange(1, 9, 10))
    with pytest.raises(ConfigError, match="no checkpoint stored"):
        _plan(_reader(), sink, RangeRequest(from_checkpoint="nobody"))


@pytest.mark.parametrize(
    ("request_", "partitions", "message"),
    [
        (RangeRequest(from_offset=11), None, "--from-offset is outside the partition's log"),
        (RangeRequest(from_offset=0, to_offset=11), None, "--to-offset is outside"),
        (RangeRequest(from_offset=0), [5], "unknown partition"),
        (RangeRequest(from_timestamp="1970-01-01T01:00:00Z"), None, "later than every record"),
        (
            RangeRequest(from_offset=8, to_timestamp="1970-01-01T00:00:03Z"),
            None,
            "ends before it starts",
        ),
    ],
)
def test_bounds_outside_the_log_are_refused(
    sink: SqliteSink, request_: RangeRequest, partitions: list[int] | None, message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        _plan(_reader(), sink, request_, partitions)


def test_an_offset_below_the_log_start_is_refused(sink: SqliteSink) -> None:
    reader = FakeReader(TOPIC, log_start={0: 5})
    for i in range(3):
        reader.append(0, event(f"x{i}", i))
    with pytest.raises(ConfigError, match="outside the partition's log") as caught:
        _plan(reader, sink, RangeRequest(from_offset=2))
    assert caught.value.context["log_start"] == 5


def test_unknown_topic_is_refused(sink: SqliteSink) -> None:
    with pytest.raises(ConfigError, match="unknown topic"):
        resolve_plan(
            _reader(),
            sink,
            job_id="j",
            topic="nope",
            partitions=None,
            request=RangeRequest(from_offset=0),
            fingerprint={},
        )


# -- the replay loop ------------------------------------------------------------------------------


def test_replay_writes_the_range_and_its_job_checkpoint(sink: SqliteSink, tmp_path: Path) -> None:
    reader = _reader()
    plan = _plan(reader, sink, RangeRequest(from_offset=3, to_offset=6))
    summary = run_replay(
        events_app(), reader, sink, plan, progress=Progress("job", plan.records, out=io.StringIO())
    )
    assert summary.records == 6
    assert summary.rows == 6
    assert not summary.resumed_from
    assert _rows(tmp_path / "replay.db") == [(f"p{p}-{i}", p, i) for p in (0, 1) for i in (3, 4, 5)]
    stored = sink.load_checkpoints(job_group("job"))
    assert {tp.partition: cp.next_offset for tp, cp in stored.items()} == {0: 6, 1: 6}


def test_a_rerun_resumes_at_the_job_checkpoint_and_a_finished_job_does_nothing(
    sink: SqliteSink, tmp_path: Path
) -> None:
    reader = _reader()
    plan = _plan(reader, sink, RangeRequest(from_offset=0))
    tp = TopicPartition(TOPIC, 0)
    epochs = sink.acquire(job_group("job"), [tp])
    sink.begin()
    sink.save_checkpoints(
        job_group("job"), [Checkpoint(job_group("job"), TOPIC, 0, 7, datetime.now(tz=UTC))], epochs
    )
    sink.commit()
    seen: list[tuple[int, int]] = []
    summary = run_replay(
        events_app(seen), reader, sink, plan, progress=Progress("job", 13, out=io.StringIO())
    )
    assert summary.resumed_from == {0: 7}
    assert sorted(seen) == [(0, 7), (0, 8), (0, 9)] + [(1, i) for i in range(10)]
    again = run_replay(events_app(seen), _reader(), sink, plan)
    assert again.already_complete
    assert again.records == 0


def test_replay_retries_a_failing_sink_like_run_and_reports_to_its_observer(
    tmp_path: Path,
) -> None:
    flaky = FlakySink(tmp_path / "flaky.db", failures=2)
    flaky.open((EVENTS,))
    reader = _reader(per_partition=5)
    plan = _plan(reader, flaky, RangeRequest(from_offset=0))
    observer = RecordingObserver()
    summary = run_replay(
        events_app(),
        reader,
        flaky,
        plan,
        options=ReplayOptions(retry=RetryPolicy(deadline_s=30.0, max_backoff_s=0.01)),
        progress=Progress("job", plan.records, out=io.StringIO()),
        observer=observer,
    )
    assert summary.records == 10
    assert flaky.commit_attempts >= 3, "two failed commits, then the one that landed"
    assert sorted(r[0] for r in _rows(tmp_path / "flaky.db")) == sorted(
        f"p{p}-{i}" for p in (0, 1) for i in range(5)
    )
    assert observer.sink_failures == ["commit", "commit"]
    assert sum(observer.fetched.values()) >= 10


def test_a_second_run_of_the_same_job_fences_the_first(sink: SqliteSink) -> None:
    reader = _reader(per_partition=6)
    plan = _plan(reader, sink, RangeRequest(from_offset=0))
    interloper: list[bool] = []

    def a_second_run_takes_over() -> bool:
        if not interloper:  # after the first batch: another run of the job acquires
            interloper.append(True)
            sink.acquire(job_group("job"), [TopicPartition(TOPIC, 0), TopicPartition(TOPIC, 1)])
        return False

    with pytest.raises(ConfigError, match="another run of this replay job took over"):
        run_replay(
            events_app(),
            reader,
            sink,
            plan,
            options=ReplayOptions(batch_max_records=2),
            progress=Progress("job", plan.records, out=io.StringIO()),
            should_stop=a_second_run_takes_over,
        )
    assert sink.load_checkpoints(job_group("job")) == {}, "nothing committed after the takeover"


def test_a_bad_record_stops_only_its_partition(sink: SqliteSink, tmp_path: Path) -> None:
    reader = FakeReader(TOPIC)
    for i in range(5):
        reader.append(0, {"fail": "invalid"} if i == 2 else event(f"a{i}", i))
        reader.append(1, event(f"b{i}", i))
    plan = _plan(reader, sink, RangeRequest(from_offset=0))
    summary = run_replay(
        events_app(), reader, sink, plan, progress=Progress("job", 10, out=io.StringIO())
    )
    assert set(summary.stopped) == {0}
    assert summary.stopped[0].offset == 2
    assert summary.stopped[0].field == "amount"
    ids = [r[0] for r in _rows(tmp_path / "replay.db")]
    assert ids == ["a0", "a1", "b0", "b1", "b2", "b3", "b4"]
    stored = sink.load_checkpoints(job_group("job"))
    assert {tp.partition: cp.next_offset for tp, cp in stored.items()} == {0: 2, 1: 5}


def test_should_stop_ends_the_job_between_batches(sink: SqliteSink) -> None:
    reader = _reader(per_partition=100, partitions=1)
    plan = _plan(reader, sink, RangeRequest(from_offset=0))
    polls = [0]

    def stop_after_two_batches() -> bool:
        polls[0] += 1
        return polls[0] > 2

    summary = run_replay(
        events_app(),
        reader,
        sink,
        plan,
        options=ReplayOptions(batch_max_records=10),
        progress=Progress("job", 100, out=io.StringIO()),
        should_stop=stop_after_two_batches,
    )
    assert summary.records == 20
    stored = sink.load_checkpoints(job_group("job"))
    assert stored[TopicPartition(TOPIC, 0)].next_offset == 20


# -- progress -------------------------------------------------------------------------------------


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_draws_a_bar_on_a_terminal() -> None:
    times = iter([0.0, 1.0, 1.0, 2.0, 2.0, 2.0])
    out = _Terminal()
    progress = Progress("job-7", 100, out=out, clock=lambda: next(times))
    progress.advance(50)
    progress.advance(50, final=True)
    text = out.getvalue()
    assert "job-7 [###############               ] 50/100" in text
    assert "ETA" in text
    assert text.endswith("\n")
    assert "100/100" in text


def test_progress_logs_figures_when_not_on_a_terminal(log_events: list[dict[str, Any]]) -> None:
    times = iter([0.0, 5.0, 5.0, 10.0, 10.0])
    progress = Progress("job-8", 100, out=io.StringIO(), clock=lambda: next(times), interval_s=2.0)
    progress.advance(40)
    progress.advance(60, final=True)
    lines = [e for e in log_events if e["event"] == "replay_progress"]
    assert lines[0] == {
        "event": "replay_progress",
        "log_level": "info",
        "job": "job-8",
        "records_done": 40,
        "records_total": 100,
        "rate_per_s": 8.0,
        "eta_s": 7.5,
    }
    assert lines[-1]["records_done"] == 100
    assert lines[-1]["eta_s"] == 0.0


# -- records lost to retention --------------------------------------------------------------------


@pytest.mark.parametrize("policy", ["stop", "skip"])
def test_records_deleted_before_the_replay_read_them_follow_the_data_loss_policy(
    sink: SqliteSink, tmp_path: Path, policy: DataLossPolicy, log_events: list[dict[str, Any]]
) -> None:
    reader = _reader(per_partition=10)
    plan = _plan(reader, sink, RangeRequest(from_offset=0))
    reader.delete_records(0, 4)  # retention, after the plan was made
    polls = [0]

    def delete_more_while_running() -> bool:
        polls[0] += 1
        if polls[0] == 2:
            reader.delete_records(1, 8)  # partition 1 is behind: 2..7 go before it reads them
        return False

    summary = run_replay(
        events_app(),
        reader,
        sink,
        plan,
        options=ReplayOptions(batch_max_records=2, on_data_loss=policy),
        progress=Progress("job", plan.records, out=io.StringIO()),
        should_stop=delete_more_while_running,
    )
    done = {tp.partition: cp.next_offset for tp, cp in sink.load_checkpoints("replay:job").items()}
    if policy == "stop":
        assert set(summary.stopped) == {0, 1}
        assert summary.stopped[0].context["lost"] == 4
        assert summary.stopped[1].context["lost"] == 6
        assert done == {1: 2}, "partition 1 committed what it read before the gap"
    else:
        assert not summary.stopped
        assert done == {0: 10, 1: 10}
        rows = _rows(tmp_path / "replay.db")
        assert [r[2] for r in rows if r[1] == 0] == [4, 5, 6, 7, 8, 9]
        # Partition 0 (from 4) filled the first polls, so partition 1 had read nothing yet.
        assert [r[2] for r in rows if r[1] == 1] == [8, 9]
        assert sorted(e["lost"] for e in log_events if e["event"] == "records_lost") == [4, 8]


def test_a_replay_from_a_checkpoint_below_the_log_start_is_refused_unless_told(
    sink: SqliteSink,
) -> None:
    reader = _reader(per_partition=10)
    tp = TopicPartition(TOPIC, 0)
    epochs = sink.acquire("live", [tp])
    sink.begin()
    sink.save_checkpoints("live", [Checkpoint("live", TOPIC, 0, 1, datetime.now(tz=UTC))], epochs)
    sink.commit()
    reader.delete_records(0, 3)
    request = RangeRequest(from_checkpoint="live")
    with pytest.raises(ConfigError, match="below the log start") as refused:
        _plan(reader, sink, request, partitions=[0])
    assert refused.value.context["lost"] == 2
    fingerprint = request_fingerprint(TOPIC, [0], "tests:app", request)
    plan = resolve_plan(
        reader,
        sink,
        job_id="job",
        topic=TOPIC,
        partitions=[0],
        request=request,
        fingerprint=fingerprint,
        allow_data_loss=True,
    )
    assert [(r.start, r.end) for r in plan.ranges] == [(3, 10)]
