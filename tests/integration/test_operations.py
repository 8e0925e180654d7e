"""Production operation against a real broker and database: /metrics during a run, /readyz
through a database outage, SIGTERM in the middle of a batch (graceful, second signal, deadline),
and the JSON log lines. Every data check is row by row."""

from __future__ import annotations

import json
import signal
import time
import uuid
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import psycopg
import pytest

from consumer import mask_url
from tests.fixtures.chaos import chaos_event, verify_chaos_sink
from tests.fixtures.control import require_control
from tests.fixtures.kafka_tools import (
    create_topic,
    encode,
    end_offsets,
    order_event,
    partition_contents,
    produce,
    unique_name,
)
from tests.fixtures.ops_http import OPS_ARGS, OpsEndpoint, ops_endpoint
from tests.fixtures.pg import checkpoints, create_database, query
from tests.fixtures.processes import ConsumerProcess, run_args, wait_until
from tests.fixtures.services import Service, free_port
from tests.integration.conftest import sqlite_checkpoints, sqlite_rows

pytestmark = [pytest.mark.integration]


def _args(app: str, kafka: Service, group: str, topic: str, sink: str, *extra: str) -> list[str]:
    return run_args(app, kafka.address, group, topic, sink, *extra)


def _wait_ready(ops: OpsEndpoint, process: ConsumerProcess, timeout: float = 60) -> dict[str, Any]:
    wait_until(
        lambda: ops.get("/readyz")[0] == 200 or not process.alive(),
        timeout=timeout,
        what="/readyz to answer 200",
    )
    status, body = ops.get("/readyz")
    assert status == 200, f"not ready: {body}; log:\n{process.log_path.read_text()[-3000:]}"
    return dict(body)


def _wait_caught_up_pg(kafka: Service, topic: str, partitions: int, dsn: str, group: str) -> None:
    ends = end_offsets(kafka.address, topic, partitions)
    wait_until(lambda: checkpoints(dsn, group) == ends, timeout=120, what="catch up")


# -- metrics -----------------------------------------------------------------------------------


def test_metrics_show_the_lag_falling_to_zero_and_counters_matching_the_sink(
    kafka: Service, tmp_path: Path, consumers: list[ConsumerProcess]
) -> None:
    partitions, total = 4, 6_000
    topic, group = unique_name("ops-metrics"), unique_name("ops-metrics")
    create_topic(kafka.address, topic, partitions)
    produce(
        kafka.address,
        topic,
        ((f"m-{i}".encode(), encode(order_event(f"m-{i}", 1))) for i in range(total)),
    )
    ends = end_offsets(kafka.address, topic, partitions)
    db = tmp_path / "orders.db"
    process = ConsumerProcess(
        _args(
            "tests.apps.slow_orders:app",
            kafka,
            group,
            topic,
            f"sqlite:///{db}",
            "--batch-max-records",
            "200",
            "--lag-interval",
            "0.2",
            *OPS_ARGS,
        ),
        tmp_path / "consumer.log",
        env={"SLOW_ORDERS_DELAY_S": "0.001"},  # ~6 s of work: time to watch the lag fall
    )
    consumers.append(process)
    ops = ops_endpoint(process)

    total_lags: list[int] = []

    def lag_is_zero() -> bool:
        lag = ops.scrape().by_partition("offsetkeeper_consumer_lag", topic)
        if len(lag) < partitions:
            return False  # not every partition sampled yet
        total_lags.append(int(sum(lag.values())))
        return total_lags[-1] == 0

    wait_until(lag_is_zero, timeout=180, interval=0.1, what="the lag to fall to zero")

    print(f"lag seen by successive scrapes: {total_lags[:5]} ... {total_lags[-3:]}")
    assert max(total_lags) >= total // 3, "the scrapes never saw the backlog"
    assert total_lags == sorted(total_lags, reverse=True), "lag rose while nothing was produced"
    assert len({lag for lag in total_lags if 0 < lag < max(total_lags)}) >= 3, "no fall seen"

    scrape = ops.scrape()
    stored = sqlite_checkpoints(db, group)
    assert stored == ends
    committed = scrape.by_partition("offsetkeeper_records_committed_total", topic)
    assert committed == {p: float(offset) for p, offset in ends.items()}
    assert scrape.by_partition("offsetkeeper_records_consumed_total", topic) == committed
    assert scrape.by_partition("offsetkeeper_committed_offset", topic) == committed
    assert scrape.by_partition("offsetkeeper_log_end_offset", topic) == committed
    rows = sqlite_rows(db, "SELECT order_id, status FROM orders")
    assert {row[0] for row in rows} == {f"m-{i}" for i in range(total)}
    assert len(rows) == total == sum(committed.values())
    assert scrape.value("offsetkeeper_rows_committed_total") == total
    batches = scrape.value("offsetkeeper_batches_committed_total")
    assert batches is not None
    assert batches >= total / 200
    assert scrape.value("offsetkeeper_batch_records_count") == batches
    assert scrape.value("offsetkeeper_batch_records_sum") == total
    assert scrape.value("offsetkeeper_sink_duration_seconds_count", action="commit") == batches
    assert scrape.value("offsetkeeper_assigned_partitions") == partitions
    assert scrape.value("offsetkeeper_ready") == 1
    assert scrape.value("process_resident_memory_bytes")

    status, body = ops.get("/readyz")
    assert (status, body["lag"], body["partitions"]) == (200, 0, partitions)
    assert ops.get("/healthz")[0] == 200
    assert process.terminate() == 0
    stopped = next(e for e in process.events() if e.get("event") == "consumer_stopped")
    assert (stopped["records"], stopped["batches"]) == (total, batches)


# -- readiness -------------------------------------------------------------------------------


def test_readyz_turns_ready_after_assignment_and_unready_while_the_database_is_down(
    kafka: Service, postgres: Service, tmp_path: Path, consumers: list[ConsumerProcess]
) -> None:
    halt, resume = require_control(postgres, "PostgreSQL")
    dsn = create_database(postgres.address)
    partitions = 2
    topic, group = unique_name("ops-ready"), unique_name("ops-ready")
    create_topic(kafka.address, topic, partitions)
    produce(kafka.address, topic, (chaos_event(i, 100) for i in range(500)))
    process = ConsumerProcess(
        _args(
            "tests.apps.chaos:app",
            kafka,
            group,
            topic,
            dsn,
            "--lag-interval",
            "0.5",
            "--readiness-timeout",
            "2",
            *OPS_ARGS,
        ),
        tmp_path / "consumer.log",
    )
    consumers.append(process)
    ops = ops_endpoint(process)

    _wait_ready(ops, process)
    names = [e.get("event") for e in process.events()]
    assert "partitions_assigned" in names, "ready before its partitions were assigned"
    _wait_caught_up_pg(kafka, topic, partitions, dsn, group)

    halt()
    try:
        # Records arrive while the database is down: their batch cannot commit.
        produce(kafka.address, topic, (chaos_event(i, 100) for i in range(500, 700)))

        def sink_reported() -> bool:
            status, body = ops.get("/readyz")
            reasons = body["reasons"] if status == 503 else []
            return any(r.startswith("the sink has been failing for") for r in reasons)

        # (Its lagging partitions, which commit nothing, may be named first: also true.)
        wait_until(sink_reported, timeout=90, what="/readyz to report the failing sink")
        assert ops.get("/healthz")[0] == 200, "a sink outage is not a dead loop"
        scrape = ops.scrape()
        assert (scrape.value("offsetkeeper_sink_retries_total", action="commit") or 0) > 0
        assert (scrape.value("offsetkeeper_sink_failing_seconds") or 0) >= 2
        assert scrape.value("offsetkeeper_ready") == 0
        assert process.alive()
    finally:
        resume()

    _wait_ready(ops, process, timeout=120)
    _wait_caught_up_pg(kafka, topic, partitions, dsn, group)
    assert ops.scrape().value("offsetkeeper_sink_failing_seconds") == 0
    assert process.terminate() == 0
    assert verify_chaos_sink(kafka.address, topic, partitions, lambda sql: query(dsn, sql)) == {
        "records": 700,
        "writers": 1,
    }


def test_a_member_without_partitions_is_ready_too(
    kafka: Service, tmp_path: Path, consumers: list[ConsumerProcess]
) -> None:
    topic, group = unique_name("ops-standby"), unique_name("ops-standby")
    create_topic(kafka.address, topic, 1)
    produce(kafka.address, topic, [(b"o-1", encode(order_event("o-1", 1)))])
    db = f"sqlite:///{tmp_path / 'orders.db'}"
    members = []
    for name in ("first", "second"):
        member = ConsumerProcess(
            _args("consumer.examples.orders:app", kafka, group, topic, db, *OPS_ARGS),
            tmp_path / f"{name}.log",
        )
        consumers.append(member)
        members.append((member, ops_endpoint(member)))
        _wait_ready(members[-1][1], member)

    owned = sorted(ops.get("/readyz")[1]["partitions"] for _member, ops in members)

    assert owned == [0, 1], "one member owns the partition, the other waits, ready"
    for member, _ops in members:
        assert member.terminate() == 0


# -- graceful shutdown -------------------------------------------------------------------------


def _waiting_on_a_lock(dsn: str) -> bool:
    """A session of this database waits for a lock inside a transaction that wrote rows."""
    rows = query(
        dsn,
        "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
        " AND wait_event_type = 'Lock' AND backend_xid IS NOT NULL",
    )
    return bool(rows and rows[0][0])


def _verify_prefix(kafka: Service, topic: str, partitions: int, dsn: str, group: str) -> int:
    """Row by row: `chaos_events` holds exactly the records below each partition's checkpoint,
    once each, with their content, and nothing at or beyond it. Returns the record count."""
    stored = checkpoints(dsn, group)
    expected = {
        (partition, offset): json.loads(value or b"")
        for partition, records in partition_contents(kafka.address, topic, partitions).items()
        for offset, _key, value in records
        if offset < stored.get(partition, 0)
    }
    rows = query(
        dsn, "SELECT source_partition, source_offset, event_key, version FROM chaos_events"
    )
    seen = [(int(p), int(o)) for p, o, _k, _v in rows]
    assert len(seen) == len(set(seen)), "a record was committed twice"
    assert set(seen) == set(expected), (
        f"rows and checkpoints disagree: {len(set(seen) - set(expected))} rows beyond the "
        f"checkpoints, {len(set(expected) - set(seen))} committed records without a row"
    )
    for p, o, key, version in rows:
        assert expected[(int(p), int(o))] == {"key": key, "version": version}
    return len(seen)


@dataclass
class HeldBatch:
    """A consumer whose next batch waits inside its sink transaction: it wrote its
    chaos_events rows and waits for a lock on chaos_latest that the test holds."""

    process: ConsumerProcess
    ops: OpsEndpoint
    dsn: str
    topic: str
    group: str
    before: dict[int, int]
    locker: psycopg.Connection[Any]


_PARTITIONS = 3


def _hold_a_batch_in_the_sink(
    kafka: Service, dsn: str, tmp_path: Path, consumers: list[ConsumerProcess], deadline_s: float
) -> HeldBatch:
    topic, group = unique_name("ops-term"), unique_name("ops-term")
    create_topic(kafka.address, topic, _PARTITIONS)
    produce(kafka.address, topic, (chaos_event(i, 300) for i in range(1_500)))
    process = ConsumerProcess(
        _args(
            "tests.apps.chaos:app",
            kafka,
            group,
            topic,
            dsn,
            "--batch-max-records",
            "1000",
            "--shutdown-deadline",
            str(deadline_s),
            *OPS_ARGS,
        ),
        tmp_path / "consumer.log",
    )
    consumers.append(process)
    ops = ops_endpoint(process)
    _wait_caught_up_pg(kafka, topic, _PARTITIONS, dsn, group)
    before = checkpoints(dsn, group)
    locker = psycopg.connect(dsn)
    locker.execute("LOCK TABLE chaos_latest IN ACCESS EXCLUSIVE MODE")
    try:
        produce(kafka.address, topic, (chaos_event(i, 300) for i in range(1_500, 2_400)))
        wait_until(lambda: _waiting_on_a_lock(dsn), timeout=60, what="a batch inside the sink")
    except BaseException:
        locker.close()
        raise
    return HeldBatch(process, ops, dsn, topic, group, before, locker)


def _sigterm(held: HeldBatch, how: str, deadline_s: float) -> tuple[int, float]:
    """SIGTERM the held consumer and let it go the `how` way; (exit code, seconds taken)."""
    signalled = time.monotonic()
    held.process.process.send_signal(signal.SIGTERM)
    wait_until(lambda: held.ops.get("/readyz")[0] == 503, timeout=10, what="/readyz: stopping")
    assert held.ops.get("/readyz")[1]["reasons"][0] == "shutting down"
    if how == "graceful":
        time.sleep(1)
        assert held.process.alive(), "it must finish the batch it is in, not drop it"
        held.locker.rollback()  # the batch can commit now
        code = held.process.wait(timeout=deadline_s)
    elif how == "second-signal":
        time.sleep(0.5)
        held.process.process.send_signal(signal.SIGTERM)
        code = held.process.wait(timeout=20)  # the lock is still held: no help from the database
    else:
        code = held.process.wait(timeout=deadline_s + 20)
    return code, time.monotonic() - signalled


@pytest.mark.fault
@pytest.mark.parametrize("how", ["graceful", "second-signal", "deadline"])
def test_sigterm_in_the_middle_of_a_batch(
    how: str, kafka: Service, postgres: Service, tmp_path: Path, consumers: list[ConsumerProcess]
) -> None:
    dsn = create_database(postgres.address)
    deadline_s = 4.0 if how == "deadline" else 30.0
    held = _hold_a_batch_in_the_sink(kafka, dsn, tmp_path, consumers, deadline_s)
    try:
        code, elapsed = _sigterm(held, how, deadline_s)
    finally:
        held.locker.rollback()
        held.locker.close()

    events = held.process.events()
    names = [e.get("event") for e in events]
    after = checkpoints(dsn, held.group)
    committed = _verify_prefix(kafka, held.topic, _PARTITIONS, dsn, held.group)
    print(f"{how}: exit {code} after {elapsed:.1f}s; {sum(held.before.values())} -> {committed}")
    assert "shutdown_requested" in names
    assert "consumer_stopped" in names
    if how == "graceful":
        assert code == 0
        assert elapsed < deadline_s
        assert sum(after.values()) > sum(held.before.values()), "the in-flight batch is lost"
        assert "shutdown_aborted" not in names
    else:
        assert code == 5
        assert after == held.before, "an aborted batch moved checkpoints"
        aborted = next(e for e in events if e.get("event") == "shutdown_aborted")
        assert aborted["reason"] == ("second SIGTERM" if how == "second-signal" else "deadline")
        if how == "deadline":
            assert deadline_s - 0.5 <= elapsed < deadline_s + 10
        else:
            assert elapsed < 10

    # Whatever the way out, a restart finishes the job exactly once.
    restarted = ConsumerProcess(
        _args("tests.apps.chaos:app", kafka, held.group, held.topic, dsn),
        tmp_path / "restarted.log",
    )
    consumers.append(restarted)
    _wait_caught_up_pg(kafka, held.topic, _PARTITIONS, dsn, held.group)
    assert restarted.terminate() == 0
    counts = verify_chaos_sink(kafka.address, held.topic, _PARTITIONS, lambda q: query(dsn, q))
    assert counts["records"] == 2_400


# -- logs ------------------------------------------------------------------------------------

_LEVELS = {"debug", "info", "warning", "error"}


def _json_lines(text: str) -> list[dict[str, Any]]:
    """Every line parsed as one JSON object (a line that is not one fails the test)."""
    events = []
    for line in text.splitlines():
        if not line.strip():
            continue
        try:
            event = json.loads(line)
        except json.JSONDecodeError:
            pytest.fail(f"a log line is not JSON: {line!r}")
        assert isinstance(event, dict), line
        assert {"event", "level", "timestamp"} <= event.keys(), line
        assert event["level"] in _LEVELS, line
        assert datetime.fromisoformat(event["timestamp"]).utcoffset() is not None, line
        events.append(event)
    return events


def _partition_key(text: str, topic: str) -> int:
    name, _, rest = text.rpartition("[")
    assert name == topic, text
    return int(rest.rstrip("]"))


def test_log_lines_are_json_name_their_partitions_and_never_show_the_password(
    kafka: Service, postgres: Service, tmp_path: Path, consumers: list[ConsumerProcess]
) -> None:
    dsn = create_database(postgres.address)
    password = urlsplit(dsn).password
    assert password, "the test database must be reached with a password"
    topic, group = unique_name("ops-logs"), unique_name("ops-logs")
    create_topic(kafka.address, topic, 2)
    good = [chaos_event(i, 200) for i in range(200)]  # 200 distinct keys: one pin each
    pins = {key: i % 2 for i, (key, _value) in enumerate(good)}
    produce(kafka.address, topic, good, partition_of=pins)
    produce(kafka.address, topic, [(b"bad", b"not json")], partition_of={b"bad": 1})
    run = _args("tests.apps.chaos:app", kafka, group, topic, dsn, "--stop-when-idle", "2")

    debug = ConsumerProcess([*run, "--log-level", "debug"], tmp_path / "debug.log")
    consumers.append(debug)
    assert debug.wait(timeout=120) == 2  # partition 1 stopped on the bad record
    text = debug.log_path.read_text()
    # (The test server's password may equal its user name: look for it in DSN form.)
    assert f":{password}@" not in text
    assert "password=" not in text
    events = _json_lines(text)
    by_name: dict[str, list[dict[str, Any]]] = {}
    for event in events:
        by_name.setdefault(event["event"], []).append(event)

    [starting] = by_name["consumer_starting"]
    assert starting["sink"] == mask_url(dsn)
    assert ":***@" in starting["sink"]
    [assigned] = by_name["partitions_assigned"]
    assert {_partition_key(k, topic) for k in assigned["partitions"]} == {0, 1}
    assert all(isinstance(offset, int) for offset in assigned["partitions"].values())
    for batch in by_name["batch_committed"]:
        for key, (first, last) in batch["offsets"].items():
            assert _partition_key(key, topic) in (0, 1)
            assert 0 <= first <= last
    [stopped] = by_name["partition_stopped"]
    assert (stopped["topic"], stopped["partition"], stopped["offset"]) == (topic, 1, 100)
    assert stopped["error_type"] == "DecodeError"
    [revoked] = by_name["partitions_revoked"]  # leaving the group at the end
    assert revoked["next_offsets"] == {f"{topic}[0]": 100, f"{topic}[1]": 100}
    assert by_name["consumer_stopped"][0]["stopped_partitions"] == [f"{topic}[1]"]

    # The level is configurable: at warning, no info or debug line is written.
    quiet = ConsumerProcess([*run, "--log-level", "warning"], tmp_path / "quiet.log")
    consumers.append(quiet)
    assert quiet.wait(timeout=120) == 2
    levels = {e["level"] for e in _json_lines(quiet.log_path.read_text())}
    assert "error" in levels  # the stopped partition, again
    assert levels <= {"warning", "error"}, levels


@pytest.mark.parametrize("failure", ["refused", "rejected"])
def test_connection_failures_are_one_clear_line_and_never_show_the_password(
    failure: str,
    kafka: Service,
    postgres: Service,
    tmp_path: Path,
    consumers: list[ConsumerProcess],
) -> None:
    """Where a DSN leaks most easily: a refused port, a wrong password."""
    dsn = create_database(postgres.address)
    parts = urlsplit(dsn)
    secret = f"pw-{uuid.uuid4().hex}"
    port = parts.port if failure == "rejected" else free_port()
    url = f"postgresql://{parts.username}:{secret}@{parts.hostname}:{port}{parts.path}"
    topic = unique_name("ops-down")
    create_topic(kafka.address, topic, 1)
    failing = ConsumerProcess(
        _args(
            "tests.apps.chaos:app",
            kafka,
            unique_name("ops-down"),
            topic,
            url,
            "--sink-retry-deadline",
            "1",
        ),
        tmp_path / "failing.log",
    )
    consumers.append(failing)

    assert failing.wait(timeout=60) == 1
    output = failing.log_path.read_text()
    assert secret not in output
    plain = [line for line in output.splitlines() if not line.startswith("{")]
    assert len(plain) == 1, output
    assert plain[0].startswith("offsetkeeper: error: cannot connect to PostgreSQL"), plain
    events = _json_lines(output.replace(plain[0], ""))
    retries = [e for e in events if e["event"] == "sink_retry"]
    assert retries, "a sink that is not reachable at start is retried until the deadline"
    assert {e["action"] for e in retries} == {"open"}
    assert all(":***@" in e["error"] for e in retries)
    failed = [e for e in events if e["level"] == "error"]
    assert [e["event"] for e in failed] == ["sink_gave_up", "offsetkeeper_failed"]
    assert ":***@" in failed[-1]["error"], failed[-1]
