"""`offsetkeeper run --workers 2`: two members of one group under one supervisor, against a
real broker and SQLite, checked row by row.

- Both workers join the group (client ids `offsetkeeper-w0`, `-w1`) and share the partitions;
  the supervisor's one endpoint shows both (`worker` label) and answers /healthz and /readyz.
- `kill -9` of a worker in the middle of a paced stream: the supervisor logs `worker_exited`
  and `worker_restarted`, counts the restart, and the chaos app's rows (one per record and
  process) show every record committed exactly once at the end.
- SIGTERM to the supervisor: every worker exits within the deadline, the supervisor exits 0;
  with batches that cannot finish within `--shutdown-deadline`, the workers abort (5) and so
  does the supervisor.
"""

from __future__ import annotations

import json
import os
import signal
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka.admin import AdminClient

from tests.fixtures.chaos import PacedProducer, verify_chaos_sink
from tests.fixtures.kafka_tools import (
    create_topic,
    encode,
    end_offsets,
    order_event,
    partition_contents,
    produce,
    unique_name,
)
from tests.fixtures.ops_http import OPS_ARGS, OpsEndpoint, Scrape, ops_endpoint
from tests.fixtures.processes import ConsumerProcess, run_args, wait_until
from tests.fixtures.services import Service
from tests.integration.conftest import sqlite_checkpoints, sqlite_rows

pytestmark = [pytest.mark.integration, pytest.mark.fault]

PARTITIONS = 4


def _pids(supervisor: ConsumerProcess) -> dict[int, list[int]]:
    """Each worker's pids so far, in start order, from the supervisor's log."""
    pids: dict[int, list[int]] = {}
    for event in supervisor.events():
        if event.get("event") in ("worker_started", "worker_restarted"):
            pids.setdefault(int(event["worker"]), []).append(int(event["pid"]))
    return pids


def _events(supervisor: ConsumerProcess, name: str, **match: Any) -> list[dict[str, Any]]:
    return [
        e
        for e in supervisor.events()
        if e.get("event") == name and all(e.get(k) == v for k, v in match.items())
    ]


def _per_worker(scrape: Scrape, name: str) -> dict[str, float]:
    """A metric's samples summed per worker."""
    totals: dict[str, float] = {}
    for (sample, labels), value in scrape.samples.items():
        worker = dict(labels).get("worker")
        if sample == name and worker is not None:
            totals[worker] = totals.get(worker, 0.0) + value
    return totals


def _shared(ops: OpsEndpoint) -> bool:
    assigned = _per_worker(ops.scrape(), "offsetkeeper_assigned_partitions")
    return (
        len(assigned) == 2
        and all(count >= 1 for count in assigned.values())
        and sum(assigned.values()) == PARTITIONS
    )


def _group_members(bootstrap: str, group: str) -> dict[str, int]:
    """client id -> partitions held, from the broker's description of the group."""
    admin = AdminClient({"bootstrap.servers": bootstrap})
    description = admin.describe_consumer_groups([group])[group].result(timeout=15)
    return {
        member.client_id: len(member.assignment.topic_partitions) for member in description.members
    }


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _at(event: dict[str, Any]) -> float:
    return datetime.fromisoformat(event["timestamp"]).timestamp()


def _start_supervisor(
    kafka: Service,
    tmp_path: Path,
    consumers: list[ConsumerProcess],
    app: str,
    group: str,
    topic: str,
    db: Path,
    *extra: str,
    env: dict[str, str] | None = None,
) -> tuple[ConsumerProcess, OpsEndpoint]:
    """`offsetkeeper run --workers 2` with its endpoint on a free port."""
    args = run_args(app, kafka.address, group, topic, f"sqlite:///{db}", *extra, *OPS_ARGS)
    supervisor = ConsumerProcess([*args, "--workers", "2"], tmp_path / "supervisor.log", env)
    consumers.append(supervisor)
    return supervisor, ops_endpoint(supervisor)


def _kill_worker_0(supervisor: ConsumerProcess, ops: OpsEndpoint) -> dict[str, float]:
    """kill -9 worker 0; once restarted, seconds from the kill to each step (log times)."""
    victim = _pids(supervisor)[0][0]
    killed_at = time.time()
    os.kill(victim, signal.SIGKILL)
    wait_until(
        lambda: len(_pids(supervisor).get(0, [])) == 2, timeout=30, what="worker 0's restart"
    )
    [exited] = _events(supervisor, "worker_exited", worker=0)
    assert (exited["pid"], exited["signal"], exited["action"]) == (victim, "SIGKILL", "restart")
    [restarted] = _events(supervisor, "worker_restarted", worker=0)
    assert restarted["restarts"] == 1
    assert ops.scrape().value("offsetkeeper_worker_restarts_total", worker="0") == 1
    assert ops.scrape().value("offsetkeeper_worker_restarts_total", worker="1") == 0
    return {"exited": _at(exited) - killed_at, "restarted": _at(restarted) - killed_at}


def _sigterm(supervisor: ConsumerProcess, timeout: float) -> tuple[int, float]:
    """SIGTERM to the supervisor; (its exit code, seconds to exit)."""
    signalled = time.monotonic()
    supervisor.process.send_signal(signal.SIGTERM)
    code = supervisor.wait(timeout=timeout)
    return code, time.monotonic() - signalled


def test_two_workers_share_the_group_survive_kill_9_and_stop_on_sigterm(
    kafka: Service, tmp_path: Path, consumers: list[ConsumerProcess]
) -> None:
    topic, group = unique_name("workers"), unique_name("workers")
    create_topic(kafka.address, topic, PARTITIONS)
    producer = PacedProducer(kafka.address, topic, total=8_000, rate=400, keys=500).start()
    db = tmp_path / "chaos.db"
    deadline_s = 20
    supervisor, ops = _start_supervisor(
        kafka,
        tmp_path,
        consumers,
        "tests.apps.chaos:app",
        group,
        topic,
        db,
        "--batch-max-records",
        "200",
        "--lag-interval",
        "1",
        "--shutdown-deadline",
        str(deadline_s),
    )

    # Both workers join and Kafka spreads the partitions over them.
    wait_until(lambda: _shared(ops), timeout=60, interval=0.2, what="both workers to own some")
    members = _group_members(kafka.address, group)
    assert sorted(members) == ["offsetkeeper-w0", "offsetkeeper-w1"], members
    assert sum(members.values()) == PARTITIONS
    assert ops.get("/healthz")[0] == 200
    scrape = ops.scrape()
    assert scrape.value("offsetkeeper_workers") == 2
    assert scrape.value("offsetkeeper_worker_up", worker="0") == 1
    assert scrape.value("offsetkeeper_worker_up", worker="1") == 1

    # kill -9 worker 0 in the middle of the stream, once something is committed.
    wait_until(
        lambda: sum(sqlite_checkpoints(db, group).values()) >= 1_000,
        timeout=60,
        what="progress before the kill",
    )
    assert producer.produced < producer.total, "the stream ended before the kill"
    killed_at = time.time()
    timings = _kill_worker_0(supervisor, ops)

    # The stream ends; the restarted worker takes its share again and everything commits.
    producer.join(timeout=120)
    ends = end_offsets(kafka.address, topic, PARTITIONS)
    wait_until(lambda: sqlite_checkpoints(db, group) == ends, timeout=90, what="catch up")
    wait_until(lambda: _shared(ops), timeout=60, interval=0.2, what="the partitions shared again")
    wait_until(lambda: ops.get("/readyz")[0] == 200, timeout=60, what="/readyz 200")
    status, ready = ops.get("/readyz")
    assert (status, ready["partitions"], ready["lag"]) == (200, PARTITIONS, 0), ready
    taken_back = min(
        _at(e)
        for e in supervisor.events()
        if e.get("event") == "partitions_assigned" and e.get("worker") == 0 and _at(e) > killed_at
    )
    timings["partitions_assigned"] = taken_back - killed_at
    print(f"seconds from kill -9 of worker 0: { {k: round(v, 2) for k, v in timings.items()} }")

    # SIGTERM: every worker stops within the deadline and the supervisor exits 0.
    last = [pids[-1] for pids in _pids(supervisor).values()]
    code, took = _sigterm(supervisor, timeout=deadline_s + 15)
    print(f"SIGTERM -> supervisor exit {code} after {took:.2f}s")
    assert code == 0, supervisor.log_path.read_text()[-3000:]
    assert took < deadline_s
    assert not any(_alive(pid) for pid in last)
    stopped = {e["worker"]: e for e in _events(supervisor, "worker_exited", action="stopped")}
    assert {w: (e["pid"], e["exit_code"]) for w, e in stopped.items()} == {
        0: (last[0], 0),
        1: (last[1], 0),
    }
    [done] = _events(supervisor, "supervisor_stopped")
    assert (done["exit_code"], done["restarts"]) == (0, 1)

    counts = verify_chaos_sink(kafka.address, topic, PARTITIONS, lambda sql: sqlite_rows(db, sql))
    print(f"exactly once: {counts}")
    assert counts["records"] == 8_000
    assert counts["writers"] >= 3, "the killed worker, its successor and the other worker"


def test_batches_longer_than_the_deadline_make_every_worker_and_the_supervisor_exit_5(
    kafka: Service, tmp_path: Path, consumers: list[ConsumerProcess]
) -> None:
    topic, group = unique_name("workers-abort"), unique_name("workers-abort")
    create_topic(kafka.address, topic, PARTITIONS)
    db = tmp_path / "orders.db"
    supervisor, ops = _start_supervisor(
        kafka,
        tmp_path,
        consumers,
        "tests.apps.slow_orders:app",
        group,
        topic,
        db,
        "--batch-max-records",
        "500",
        "--commit-interval",
        "5",
        "--shutdown-deadline",
        "2",
        env={"SLOW_ORDERS_DELAY_S": "0.1"},  # a full batch takes 50 s
    )
    # The records come once both own partitions: no rebalance waits behind a 50 s batch.
    wait_until(lambda: _shared(ops), timeout=60, interval=0.2, what="both workers to own some")
    produce(
        kafka.address,
        topic,
        ((f"o-{i}".encode(), encode(order_event(f"o-{i}", 1))) for i in range(2_000)),
    )

    def both_processing() -> bool:
        consumed = _per_worker(ops.scrape(), "offsetkeeper_records_consumed_total")
        return all(consumed.get(worker, 0) > 0 for worker in ("0", "1"))

    wait_until(both_processing, timeout=60, interval=0.2, what="both workers in a batch")
    code, took = _sigterm(supervisor, timeout=30)
    print(f"SIGTERM with 50 s batches, deadline 2 s -> supervisor exit {code} after {took:.2f}s")
    assert code == 5, supervisor.log_path.read_text()[-3000:]
    assert took < 2 + 10
    stopped = _events(supervisor, "worker_exited", action="stopped")
    assert sorted((e["worker"], e["exit_code"]) for e in stopped) == [(0, 5), (1, 5)]
    aborted = [e for e in supervisor.events() if e.get("event") == "shutdown_aborted"]
    assert sorted(e["worker"] for e in aborted) == [0, 1]
    assert all(e["reason"] == "deadline" for e in aborted)

    # Nothing of an aborted batch is written: the rows are exactly those below the checkpoints.
    checkpoints = sqlite_checkpoints(db, group)
    expected = {
        json.loads(value or b"")["order_id"]
        for partition, records in partition_contents(kafka.address, topic, PARTITIONS).items()
        for offset, _key, value in records
        if offset < checkpoints.get(partition, 0)
    }
    rows = [row[0] for row in sqlite_rows(db, "SELECT order_id FROM orders")]
    assert sorted(rows) == sorted(expected)


def test_the_workers_of_a_killed_supervisor_stop_gracefully_on_their_own(
    kafka: Service, tmp_path: Path, consumers: list[ConsumerProcess]
) -> None:
    topic, group = unique_name("workers-orphan"), unique_name("workers-orphan")
    create_topic(kafka.address, topic, PARTITIONS)
    db = tmp_path / "orders.db"
    supervisor, ops = _start_supervisor(
        kafka, tmp_path, consumers, "consumer.examples.orders:app", group, topic, db
    )
    wait_until(lambda: _shared(ops), timeout=60, interval=0.2, what="both workers to own some")
    workers = [pids[-1] for pids in _pids(supervisor).values()]

    supervisor.kill()  # kill -9: no SIGTERM is forwarded by anyone
    wait_until(lambda: not any(_alive(pid) for pid in workers), timeout=30, what="workers gone")
    gone = [e["worker"] for e in supervisor.events() if e.get("event") == "supervisor_gone"]
    stopped = [e["worker"] for e in supervisor.events() if e.get("event") == "consumer_stopped"]
    assert sorted(gone) == sorted(stopped) == [0, 1], "each stopped as on SIGTERM"
