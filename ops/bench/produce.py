"""Topics, the workload producer (bulk or at a fixed rate), and consumer-group readiness."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable
from typing import Any

import confluent_kafka
import workload
from confluent_kafka.admin import AdminClient, NewTopic


def create_topic(bootstrap: str, name: str, partitions: int = workload.PARTITIONS) -> None:
    admin = AdminClient({"bootstrap.servers": bootstrap})
    futures = admin.create_topics([NewTopic(name, partitions, 1)], operation_timeout=30)
    futures[name].result(timeout=60)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:  # metadata propagates asynchronously
        topic = admin.list_topics(name, timeout=10).topics.get(name)
        if topic is not None and topic.error is None and len(topic.partitions) == partitions:
            return
        time.sleep(0.2)
    raise RuntimeError(f"topic {name} did not appear with {partitions} partitions")


def _producer(bootstrap: str, *, linger_ms: int) -> Any:
    return confluent_kafka.Producer(
        {
            "bootstrap.servers": bootstrap,
            "enable.idempotence": True,  # per-partition order = send order, no duplicates
            "acks": "all",
            "linger.ms": linger_ms,
            "batch.num.messages": 10000,
            "queue.buffering.max.messages": 200_000,
        }
    )


def _send(producer: Any, topic: str, partition: int, key: str, value: bytes) -> None:
    while True:
        try:
            producer.produce(topic, value=value, key=key.encode(), partition=partition)
        except BufferError:
            producer.poll(0.05)
        else:
            return


def produce_all(bootstrap: str, topic: str, n: int, encoding: str) -> None:
    """The whole workload as fast as the producer goes (ts_ms: the time it was sent)."""
    producer = _producer(bootstrap, linger_ms=20)
    ids = workload.key_ids(n)
    for seq, (partition, key, value) in enumerate(workload.records(n, encoding, ids)):
        value["ts_ms"] = int(time.time() * 1000)
        _send(producer, topic, partition, key, workload.encode(value, encoding))
        if seq % 1000 == 0:
            producer.poll(0)
    if producer.flush(120):
        raise RuntimeError(f"producer could not deliver every record to {topic}")


def produce_items(bootstrap: str, topic: str, items: Iterable[tuple[int, str, bytes]]) -> int:
    """Send ready-made (partition, key, value) records as fast as the producer goes (the
    keyed-state bench's workload); returns how many were sent."""
    producer = _producer(bootstrap, linger_ms=20)
    sent = 0
    for partition, key, value in items:
        _send(producer, topic, partition, key, value)
        sent += 1
        if sent % 1000 == 0:
            producer.poll(0)
    if producer.flush(120):
        raise RuntimeError(f"producer could not deliver every record to {topic}")
    return sent


class RateProducer(threading.Thread):
    """Sends the workload at a fixed rate, in 10 ms ticks, until `n` records or stop()."""

    def __init__(self, bootstrap: str, topic: str, encoding: str, rate: int, n: int) -> None:
        super().__init__(daemon=True)
        self.topic, self.encoding, self.rate, self.n = topic, encoding, rate, n
        self._producer = _producer(bootstrap, linger_ms=1)
        self._stop_event = threading.Event()
        self.sent = 0

    def stop(self) -> None:
        self._stop_event.set()

    def run(self) -> None:
        ids = workload.key_ids(self.n)
        source = workload.records(self.n, self.encoding, ids)
        started = time.monotonic()
        tick = 0.01
        for partition, key, value in source:
            if self._stop_event.is_set():
                break
            due = started + self.sent / self.rate
            now = time.monotonic()
            if due > now:
                self._producer.poll(0)
                time.sleep(max(min(due - now, tick), 0))
            value["ts_ms"] = int(time.time() * 1000)
            _send(self._producer, self.topic, partition, key, workload.encode(value, self.encoding))
            self.sent += 1
        self._producer.flush(60)


def end_offsets(bootstrap: str, topic: str) -> dict[int, int]:
    client = confluent_kafka.Consumer({"bootstrap.servers": bootstrap, "group.id": "okbench-probe"})
    try:
        return {
            p: int(
                client.get_watermark_offsets(
                    confluent_kafka.TopicPartition(topic, p), timeout=10, cached=False
                )[1]
            )
            for p in range(workload.PARTITIONS)
        }
    finally:
        client.close()


def group_ready(bootstrap: str, group: str, partitions: int = workload.PARTITIONS) -> bool:
    """The group is Stable and its members hold every partition between them."""
    admin = AdminClient({"bootstrap.servers": bootstrap})
    try:
        description = admin.describe_consumer_groups([group], request_timeout=5)[group].result()
    except confluent_kafka.KafkaException:
        return False
    if description.state != confluent_kafka.ConsumerGroupState.STABLE:
        return False
    held = sum(
        len(member.assignment.topic_partitions)
        for member in description.members
        if member.assignment is not None
    )
    return held >= partitions


def wait_group_ready(bootstrap: str, group: str, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if group_ready(bootstrap, group):
            return
        time.sleep(0.2)
    raise TimeoutError(f"consumer group {group} did not become ready in {timeout_s}s")
