"""A backfill beside the live group (issue: position-guarded upserts), on the real broker and
both SQL sinks, row by row: the live group keeps updating keys while `offsetkeeper replay`
rewrites an older window; no row ever goes back to an older value, also with the replay and the
live member killed (-9) during the overlap and a rebalance; afterwards every row holds its
newest record and the audit is clean. `--overwrite-newer` overwrites exactly as many rows as
its dry run counted."""

from __future__ import annotations

import re
import threading
import time
from datetime import UTC, datetime
from pathlib import Path

import pytest
from confluent_kafka import Producer

from tests.fixtures.kafka_tools import (
    create_topic,
    encode,
    end_offsets,
    order_event,
    partition_contents,
    produce,
    unique_name,
)
from tests.fixtures.processes import ConsumerProcess, run_args, wait_until
from tests.fixtures.services import Service
from tests.integration.conftest import SinkUnderTest
from tests.integration.test_audit import offsetkeeper

pytestmark = pytest.mark.integration

APP = "consumer.examples.orders:app"
PARTITIONS = 3


def _wave(keys: range, version: int) -> list[tuple[bytes, bytes]]:
    return [(f"k-{i}".encode(), encode(order_event(f"k-{i}", version))) for i in keys]


def _versions(sink: SinkUnderTest) -> dict[str, int]:
    # amount_cents is 100 * version + len(order_id) (tests.fixtures.kafka_tools.order_event).
    rows = sink.query("SELECT order_id, amount_cents FROM orders")
    return {str(order_id): int(amount) // 100 for order_id, amount in rows}  # type: ignore[call-overload]


class RegressionWatch:
    """Reads the table over and over while the test runs: a key whose version ever goes down
    was regressed by the backfill, even if a later live write repaired it."""

    def __init__(self, sink: SinkUnderTest) -> None:
        self._sink = sink
        self.highest: dict[str, int] = {}
        self.regressions: list[tuple[str, int, int]] = []
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()

    def _watch(self) -> None:
        while not self._stop.is_set():
            for key, version in _versions(self._sink).items():
                highest = self.highest.get(key, 0)
                if version < highest:
                    self.regressions.append((key, highest, version))
                self.highest[key] = max(highest, version)
            self.samples += 1
            self._stop.wait(0.1)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=30)


def _replay_args(kafka: Service, sink: SinkUnderTest, until: str, job: str) -> list[str]:
    return [
        "replay",
        "--app",
        APP,
        "--topic",
        "TOPIC",
        "--from-offset",
        "0",
        "--to-timestamp",
        until,
        "--sink",
        sink.url,
        "--job-id",
        job,
        "--batch-max-records",
        "50",
    ]


def _produce_slowly(bootstrap: str, topic: str, messages: list[tuple[bytes, bytes]]) -> None:
    producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": 5})
    for index, (key, value) in enumerate(messages):
        producer.produce(topic, key=key, value=value)
        if index % 20 == 0:
            producer.poll(0)
            time.sleep(0.01)
    assert producer.flush(30) == 0


@pytest.mark.parametrize("faults", ["none", "kill-9"])
def test_a_backfill_beside_the_live_group_never_regresses_a_row(
    kafka: Service,
    sink: SinkUnderTest,
    tmp_path: Path,
    consumers: list[ConsumerProcess],
    faults: str,
) -> None:
    topic, group = unique_name("backfill"), unique_name("live")
    create_topic(kafka.address, topic, PARTITIONS)
    produce(kafka.address, topic, _wave(range(1200), 1))
    time.sleep(1.1)
    window_end = datetime.now(tz=UTC).isoformat()  # the replayed window: wave 1 only
    time.sleep(1.1)

    def member(name: str) -> ConsumerProcess:
        args = run_args(APP, kafka.address, group, topic, sink.url, "--batch-max-records", "100")
        started = ConsumerProcess(args, tmp_path / f"{name}.log")
        consumers.append(started)
        return started

    def caught_up() -> bool:
        return sink.checkpoints(group) == end_offsets(kafka.address, topic, PARTITIONS)

    live = member("live-1")
    wait_until(caught_up, timeout=120, what="the live group to read wave 1")
    produce(kafka.address, topic, _wave(range(800), 2))
    wait_until(caught_up, timeout=120, what="the live group to read wave 2")

    watch = RegressionWatch(sink)
    wave3 = threading.Thread(
        target=_produce_slowly, args=(kafka.address, topic, _wave(range(400), 3))
    )
    wave3.start()
    args = [a.replace("TOPIC", topic) for a in _replay_args(kafka, sink, window_end, "fix-1")]
    if faults == "kill-9":
        crash = {
            "OFFSETKEEPER_TEST_CRASH_POINT": "after-rows",
            "OFFSETKEEPER_TEST_CRASH_AFTER_BATCHES": "4",
        }
        crashed = offsetkeeper(kafka, *args, env=crash)
        assert crashed.returncode == -9, crashed.stderr[-2000:]
        live.kill()  # the live member dies mid-batch, during the overlap
        member("live-2")
        member("live-3")  # a second member: the group rebalances while the replay resumes
    replayed = offsetkeeper(kafka, *args)
    assert replayed.returncode == 0, replayed.stderr[-3000:]
    assert re.search(r"\d+ records, \d+ rows written", replayed.stdout), replayed.stdout
    wave3.join(timeout=120)
    wait_until(caught_up, timeout=180, what="the live group to reach the end")
    watch.stop()
    for running in consumers:
        if running.alive():
            assert running.terminate() == 0

    assert watch.samples > 5
    assert watch.regressions == [], f"rows went back to older versions: {watch.regressions[:5]}"
    expected = {f"k-{i}": 3 if i < 400 else 2 if i < 800 else 1 for i in range(1200)}
    assert _versions(sink) == expected
    assert sink.checkpoints("replay:fix-1") == {
        p: offset for p, offset in _window_ends(kafka, topic).items()
    }
    # Each row carries the position of its key's newest record.
    newest: dict[str, tuple[int, int]] = {}
    for partition, records in partition_contents(kafka.address, topic, PARTITIONS).items():
        for offset, key, _value in records:
            newest[(key or b"").decode()] = (partition, offset)
    stored = sink.query("SELECT order_id, offsetkeeper_partition, offsetkeeper_offset FROM orders")
    assert {str(k): (int(p), int(o)) for k, p, o in stored} == newest  # type: ignore[call-overload]

    audited = offsetkeeper(
        kafka, "audit", "--app", APP, "--topic", topic, "--group", group, "--sink", sink.url
    )
    assert audited.returncode == 0, audited.stdout + audited.stderr[-2000:]
    assert "clean: the sink matches the log" in audited.stdout


def _window_ends(kafka: Service, topic: str) -> dict[int, int]:
    """Per partition, the end of wave 1 (its 1200 records are the first of the topic)."""
    firsts: dict[int, int] = {}
    for partition, records in partition_contents(kafka.address, topic, PARTITIONS).items():
        firsts[partition] = sum(
            1 for _offset, _key, value in records if value is not None and b'"status-1"' in value
        )
    return firsts


def test_overwrite_newer_overwrites_exactly_what_its_dry_run_counted(
    kafka: Service, sink: SinkUnderTest, tmp_path: Path
) -> None:
    topic, group = unique_name("overwrite"), unique_name("live")
    create_topic(kafka.address, topic, PARTITIONS)
    produce(kafka.address, topic, _wave(range(300), 1))
    time.sleep(1.1)
    window_end = datetime.now(tz=UTC).isoformat()
    time.sleep(1.1)
    produce(kafka.address, topic, _wave(range(200), 2))
    live = ConsumerProcess(
        run_args(APP, kafka.address, group, topic, sink.url, "--stop-when-idle", "2"),
        tmp_path / "live.log",
    )
    assert live.wait(timeout=120) == 0
    args = [a.replace("TOPIC", topic) for a in _replay_args(kafka, sink, window_end, "recompute")]

    guarded = offsetkeeper(kafka, *args, "--dry-run")
    assert guarded.returncode == 0, guarded.stderr[-2000:]
    assert "would overwrite" not in guarded.stdout
    counted = offsetkeeper(kafka, *args, "--overwrite-newer", "--dry-run")
    assert counted.returncode == 0, counted.stderr[-2000:]
    found = re.search(r"would overwrite (\d+) row\(s\)", counted.stdout)
    assert found, counted.stdout
    assert int(found[1]) == 200
    assert "  orders: 200" in counted.stdout
    before = _versions(sink)

    overwritten = offsetkeeper(kafka, *args, "--overwrite-newer")
    assert overwritten.returncode == 0, overwritten.stderr[-2000:]
    after = _versions(sink)
    regressed = [key for key in before if after[key] < before[key]]
    assert len(regressed) == int(found[1])
    assert after == {f"k-{i}": 1 for i in range(300)}, "the fix won everywhere, as asked"
