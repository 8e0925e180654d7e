"""Exactly once into PostgreSQL under group chaos, zombies, database and broker restarts, and
crashes at the two kill points that matter. Every check is row by row against the topic."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest

from tests.fixtures.chaos import PacedProducer, verify_chaos_sink
from tests.fixtures.control import require_control
from tests.fixtures.kafka_tools import create_topic, end_offsets, produce, unique_name
from tests.fixtures.pg import checkpoints, create_database, query
from tests.fixtures.processes import ConsumerProcess, process_state, run_args, wait_until
from tests.fixtures.services import Service

pytestmark = [pytest.mark.integration, pytest.mark.fault]

BACKENDS = ["confluent", "aiokafka"]


@pytest.fixture
def pg_dsn(postgres: Service) -> str:
    return create_database(postgres.address)


def _args(
    kafka: Service, group: str, topic: str, dsn: str, *extra: str, backend: str = "confluent"
) -> list[str]:
    return [
        "--backend",
        backend,
        *run_args(
            "tests.apps.chaos:app",
            kafka.address,
            group,
            topic,
            dsn,
            "--batch-max-records",
            "500",
            *extra,
        ),
    ]


def _owned_partitions(process: ConsumerProcess) -> set[int]:
    """The partitions a member holds, replayed from its own log events."""
    owned: set[str] = set()
    for event in process.events():
        name = event.get("event")
        if name == "partitions_assigned":
            owned |= set(event["partitions"])
        elif name in ("partitions_revoked", "partitions_lost") or name == "partitions_fenced":
            owned -= set(event["partitions"])
    return {int(tp.rsplit("[", 1)[1].rstrip("]")) for tp in owned}


def _verify(kafka: Service, topic: str, partitions: int, dsn: str, group: str) -> dict[str, int]:
    assert checkpoints(dsn, group) == end_offsets(kafka.address, topic, partitions)
    return verify_chaos_sink(kafka.address, topic, partitions, lambda sql: query(dsn, sql))


def _wait_caught_up(
    kafka: Service, topic: str, partitions: int, dsn: str, group: str, timeout: float
) -> None:
    ends = end_offsets(kafka.address, topic, partitions)
    try:
        wait_until(
            lambda: checkpoints(dsn, group) == ends,
            timeout=timeout,
            what="checkpoints to reach the end offsets",
        )
    except TimeoutError as exc:
        # Which partitions lag, and whether the end offsets read at the start still hold.
        raise TimeoutError(
            f"{exc}: end offsets {ends} (now {end_offsets(kafka.address, topic, partitions)}),"
            f" checkpoints {checkpoints(dsn, group)}"
        ) from exc


@pytest.mark.parametrize(
    ("backend", "assignor"),
    [
        ("confluent", "cooperative-sticky"),
        ("confluent", "range"),
        ("aiokafka", "cooperative-sticky"),
    ],
)
def test_group_chaos_kill_join_and_leave(
    backend: str,
    assignor: str,
    kafka: Service,
    pg_dsn: str,
    tmp_path: Path,
    consumers: list[ConsumerProcess],
) -> None:
    partitions, total = 12, 200_000
    topic, group = unique_name("chaos"), unique_name("chaos-group")
    create_topic(kafka.address, topic, partitions)
    producer = PacedProducer(kafka.address, topic, total=total, rate=8_000).start()
    started = time.monotonic()

    def member(name: str) -> ConsumerProcess:
        # "range" is an eager assignor: every rebalance revokes everything first.
        process = ConsumerProcess(
            _args(
                kafka,
                group,
                topic,
                pg_dsn,
                "-X",
                f"partition.assignment.strategy={assignor}",
                backend=backend,
            ),
            tmp_path / f"{name}.log",
        )
        consumers.append(process)
        return process

    first, second, third = member("c1"), member("c2"), member("c3")
    wait_until(
        lambda: all(_owned_partitions(p) for p in (first, second, third)),
        timeout=60,
        what="3 members assigned",
    )
    time.sleep(3)

    # kill -9 one member, and measure how long its partitions stand still.
    victim_partitions = _owned_partitions(first)
    before = checkpoints(pg_dsn, group)
    first.kill()
    killed_at = time.monotonic()
    wait_until(
        lambda: any(
            checkpoints(pg_dsn, group).get(p, 0) > before.get(p, 0) for p in victim_partitions
        ),
        timeout=90,
        interval=0.1,
        what="a survivor to commit the killed member's partitions",
    )
    takeover_s = time.monotonic() - killed_at

    fourth = member("c4")
    time.sleep(4)
    assert second.terminate() == 0, "SIGTERM must finish the batch, leave the group and exit 0"
    producer.join(timeout=120)
    _wait_caught_up(kafka, topic, partitions, pg_dsn, group, timeout=180)
    caught_up_s = time.monotonic() - started
    assert third.terminate() == 0
    assert fourth.terminate() == 0
    counts = _verify(kafka, topic, partitions, pg_dsn, group)
    assert counts["records"] == total
    busy = [
        e
        for p in (second, third, fourth)
        for e in p.events()
        if e.get("event") == "consumer_stopped"
    ]
    print(
        f"group chaos ({backend}, {assignor}): {total} records over {partitions} partitions "
        f"caught up in {caught_up_s:.1f}s "
        f"(producer paced at 8000/s); takeover after kill -9: {takeover_s:.1f}s; "
        f"member rates: {[e['records_per_s'] for e in busy]} records/s; "
        f"writers: {counts['writers']}"
    )


@pytest.mark.parametrize("backend", BACKENDS)
def test_zombie_member_is_fenced_and_its_stale_batch_never_lands(
    backend: str, kafka: Service, pg_dsn: str, tmp_path: Path, consumers: list[ConsumerProcess]
) -> None:
    partitions = 3
    topic, group = unique_name("zombie"), unique_name("zombie-group")
    create_topic(kafka.address, topic, partitions)
    from tests.fixtures.chaos import chaos_event  # noqa: PLC0415

    produce(kafka.address, topic, (chaos_event(i, 500) for i in range(6_000)))
    # The zombie stops itself while processing partition 0, offset 700: mid-batch, uncommitted.
    zombie = ConsumerProcess(
        _args(kafka, group, topic, pg_dsn, "--batch-max-records", "300", backend=backend),
        tmp_path / "zombie.log",
        env={"CHAOS_SELF_STOP_AT": "0:700"},
    )
    consumers.append(zombie)
    wait_until(
        lambda: process_state(zombie.pid) == "T", timeout=60, what="the zombie to stop itself"
    )
    frozen = checkpoints(pg_dsn, group)
    assert frozen.get(0, 0) <= 700, "offset 700 of partition 0 must not be committed yet"

    successor = ConsumerProcess(
        _args(kafka, group, topic, pg_dsn, backend=backend), tmp_path / "successor.log"
    )
    consumers.append(successor)
    _wait_caught_up(kafka, topic, partitions, pg_dsn, group, timeout=120)
    settled = checkpoints(pg_dsn, group)

    os.kill(zombie.pid, signal.SIGCONT)
    fenced = zombie.wait_for_event(
        "partitions_fenced", timeout=60, what="the zombie's fencing log line"
    )
    assert f"{topic}[0]" in fenced["partitions"]
    time.sleep(2)  # let anything the zombie might still do happen before we look
    assert checkpoints(pg_dsn, group) == settled, "the zombie moved checkpoints"
    zombie_writer_rows = query(
        pg_dsn,
        "SELECT count(*) FROM chaos_events WHERE source_partition = 0 AND source_offset >= %s"
        " AND writer LIKE %s",
        (frozen.get(0, 0), f"{zombie.pid}-%"),
    )
    assert zombie_writer_rows == [(0,)], "rows of the zombie's stale batch landed"
    assert successor.terminate() == 0
    zombie.terminate()
    _verify(kafka, topic, partitions, pg_dsn, group)


@pytest.mark.parametrize("outage", ["postgres", "kafka"])
def test_restart_mid_run_loses_and_repeats_nothing(
    outage: str,
    kafka: Service,
    postgres: Service,
    pg_dsn: str,
    tmp_path: Path,
    consumers: list[ConsumerProcess],
) -> None:
    partitions, total = 6, 60_000
    topic, group = unique_name(f"outage-{outage}"), unique_name("outage")
    create_topic(kafka.address, topic, partitions)
    producer = PacedProducer(kafka.address, topic, total=total, rate=5_000).start()
    process = ConsumerProcess(_args(kafka, group, topic, pg_dsn), tmp_path / "consumer.log")
    consumers.append(process)
    wait_until(
        lambda: sum(checkpoints(pg_dsn, group).values()) > 5_000, timeout=60, what="progress"
    )
    service = postgres if outage == "postgres" else kafka
    at_outage = sum(checkpoints(pg_dsn, group).values()) if outage == "kafka" else None
    halt, resume = require_control(service, outage)
    halt()
    time.sleep(3)
    resume()
    assert process.alive(), "the consumer must ride out the outage"
    producer.join(timeout=180)
    _wait_caught_up(kafka, topic, partitions, pg_dsn, group, timeout=180)
    assert process.terminate() == 0
    _verify(kafka, topic, partitions, pg_dsn, group)
    names = [e.get("event") for e in process.events()]
    if outage == "postgres":
        assert "sink_retry" in names, "the consumer should have retried the sink during the outage"
    print(
        f"{outage} restart: progress at outage {at_outage}; "
        f"events: {sorted(set(filter(None, names)))}"
    )


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("point", ["after-rows", "after-commit"])
def test_crash_at_kill_point_recovers_exactly_once(
    backend: str,
    point: str,
    kafka: Service,
    pg_dsn: str,
    tmp_path: Path,
    consumers: list[ConsumerProcess],
) -> None:
    partitions = 4
    topic, group = unique_name(f"killpoint-{point}"), unique_name("killpoint")
    create_topic(kafka.address, topic, partitions)
    from tests.fixtures.chaos import chaos_event  # noqa: PLC0415

    produce(kafka.address, topic, (chaos_event(i, 1_000) for i in range(8_000)))
    crashing = ConsumerProcess(
        _args(kafka, group, topic, pg_dsn, "--batch-max-records", "400", backend=backend),
        tmp_path / "crashing.log",
        env={"OFFSETKEEPER_TEST_CRASH_POINT": point, "OFFSETKEEPER_TEST_CRASH_AFTER_BATCHES": "3"},
    )
    consumers.append(crashing)
    assert crashing.wait(timeout=120) == -signal.SIGKILL
    rows = query(pg_dsn, "SELECT count(*) FROM chaos_events")[0][0]
    committed = sum(checkpoints(pg_dsn, group).values())
    # Rows and checkpoints moved together: after-rows lost batch 3 whole, after-commit kept it.
    assert rows == committed
    assert committed == (800 if point == "after-rows" else 1200)

    recovering = ConsumerProcess(
        _args(kafka, group, topic, pg_dsn, backend=backend), tmp_path / "recovering.log"
    )
    consumers.append(recovering)
    _wait_caught_up(kafka, topic, partitions, pg_dsn, group, timeout=120)
    assert recovering.terminate() == 0
    counts = _verify(kafka, topic, partitions, pg_dsn, group)
    assert counts["records"] == 8_000


@pytest.mark.parametrize("outage", ["postgres", "kafka"])
def test_gives_up_after_the_deadline_with_a_clear_error(
    outage: str,
    kafka: Service,
    postgres: Service,
    pg_dsn: str,
    tmp_path: Path,
    consumers: list[ConsumerProcess],
) -> None:
    partitions = 2
    topic, group = unique_name(f"giveup-{outage}"), unique_name("giveup")
    create_topic(kafka.address, topic, partitions)
    from tests.fixtures.chaos import chaos_event  # noqa: PLC0415

    produce(kafka.address, topic, (chaos_event(i, 100) for i in range(1_000)))
    process = ConsumerProcess(
        _args(
            kafka,
            group,
            topic,
            pg_dsn,
            "--sink-retry-deadline",
            "4",
            "--broker-retry-deadline",
            "6",
        ),
        tmp_path / "consumer.log",
    )
    consumers.append(process)
    _wait_caught_up(kafka, topic, partitions, pg_dsn, group, timeout=60)
    halt, resume = require_control(postgres if outage == "postgres" else kafka, outage)
    halt()
    try:
        if outage == "postgres":
            # Records arrive while the sink is down: their commit fails until the deadline.
            produce(kafka.address, topic, (chaos_event(i, 100) for i in range(1_000, 1_200)))
        code = process.wait(timeout=60)
    finally:
        resume()
    assert code == 1
    output = process.log_path.read_text()
    expected = "sink_gave_up" if outage == "postgres" else "no Kafka broker reachable"
    assert expected in output
    assert "offsetkeeper: error:" in output, "a one-line error for the operator"
    # Whatever happened, rows and checkpoints are consistent, and a restart finishes the job.
    restarted = ConsumerProcess(_args(kafka, group, topic, pg_dsn), tmp_path / "restarted.log")
    consumers.append(restarted)
    _wait_caught_up(kafka, topic, partitions, pg_dsn, group, timeout=90)
    assert restarted.terminate() == 0
    _verify(kafka, topic, partitions, pg_dsn, group)


def test_async_processor_across_rebalances_loses_and_duplicates_nothing(
    kafka: Service, pg_dsn: str, tmp_path: Path, consumers: list[ConsumerProcess]
) -> None:
    partitions, total = 6, 40_000
    topic, group = unique_name("async"), unique_name("async-group")
    create_topic(kafka.address, topic, partitions)
    producer = PacedProducer(kafka.address, topic, total=total, rate=4_000).start()

    def member(name: str) -> ConsumerProcess:
        args = _args(kafka, group, topic, pg_dsn, "--batch-max-records", "200", backend="aiokafka")
        args[args.index("tests.apps.chaos:app")] = "tests.apps.async_chaos:app"
        process = ConsumerProcess(args, tmp_path / f"{name}.log")
        consumers.append(process)
        return process

    first = member("first")
    wait_until(
        lambda: sum(checkpoints(pg_dsn, group).values()) > 3_000, timeout=60, what="progress"
    )
    second = member("second")  # a rebalance while the first is awaiting inside its batches
    wait_until(
        lambda: bool(_owned_partitions(second)), timeout=60, what="the second member's share"
    )
    time.sleep(2)
    assert first.terminate() == 0  # another rebalance: the second takes everything
    producer.join(timeout=120)
    _wait_caught_up(kafka, topic, partitions, pg_dsn, group, timeout=120)
    assert second.terminate() == 0
    counts = _verify(kafka, topic, partitions, pg_dsn, group)
    assert counts["records"] == total
    revoked = [e for e in first.events() if e.get("event") == "partitions_revoked"]
    assert revoked, "the first member must have given partitions up"


def test_an_async_processor_on_the_confluent_backend_is_a_clear_error(
    kafka: Service, pg_dsn: str, tmp_path: Path, consumers: list[ConsumerProcess]
) -> None:
    topic, group = unique_name("async-wrong"), unique_name("async-wrong")
    create_topic(kafka.address, topic, 1)
    from tests.fixtures.chaos import chaos_event  # noqa: PLC0415

    produce(kafka.address, topic, (chaos_event(i, 10) for i in range(10)))
    args = _args(kafka, group, topic, pg_dsn, "--stop-when-idle", "2")
    args[args.index("tests.apps.chaos:app")] = "tests.apps.async_chaos:app"
    process = ConsumerProcess(args, tmp_path / "wrong.log")
    consumers.append(process)
    assert process.wait(timeout=60) == 1, "a setup error, not a bad record"
    output = process.log_path.read_text()
    assert "async processors need the asyncio driver: use --backend aiokafka" in output
    assert checkpoints(pg_dsn, group) == {}
