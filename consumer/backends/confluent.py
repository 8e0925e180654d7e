"""The confluent-kafka (librdkafka) backend."""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import Any

import confluent_kafka
import confluent_kafka.admin
import structlog

from consumer.core.errors import ConfigError, KafkaError
from consumer.core.records import RawRecord, TopicPartition
from consumer.engine.client import RebalanceListener, StartPosition

log = structlog.get_logger("offsetkeeper.kafka")

_PROBE_INTERVAL_S = 2.0
# Describing a group: how long a coordinator that is not ready yet is waited for.
_COORDINATOR_WAIT_S = 30.0
_COORDINATOR_MOVING = frozenset(
    (
        confluent_kafka.KafkaError.NOT_COORDINATOR,
        confluent_kafka.KafkaError.COORDINATOR_LOAD_IN_PROGRESS,
        confluent_kafka.KafkaError.COORDINATOR_NOT_AVAILABLE,
    )
)
_PROBE_TIMEOUT_S = 1.0
_START = {"earliest": confluent_kafka.OFFSET_BEGINNING, "latest": confluent_kafka.OFFSET_END}


def translate(exc: BaseException, message: str, **context: Any) -> KafkaError:
    """Map a confluent-kafka exception to our `KafkaError`, keeping the broker's error code."""
    retriable = False
    if isinstance(exc, confluent_kafka.KafkaException) and exc.args:
        error = exc.args[0]
        if isinstance(error, confluent_kafka.KafkaError):
            retriable = bool(error.retriable())
            context.setdefault("code", error.name())
            context.setdefault("reason", error.str())
    return KafkaError(message, retriable=retriable, **context)


class ConfluentBackend:
    """`ClientBackend` over confluent_kafka.Consumer. Offsets are never auto-committed."""

    def __init__(
        self,
        *,
        bootstrap_servers: str,
        group: str,
        client_config: Mapping[str, str] | None = None,
        unreachable_deadline_s: float = 300.0,
    ) -> None:
        config: dict[str, Any] = {
            "bootstrap.servers": bootstrap_servers,
            "group.id": group,
            # The sink holds the real offsets; Kafka's copy is written by us, after the sink.
            "enable.auto.commit": False,
            "enable.auto.offset.store": False,
            "partition.assignment.strategy": "cooperative-sticky",
            # Bounded prefetch: while the sink is down we stop polling, and at most this much
            # waits in memory per consumer (librdkafka's default is 64 MiB).
            "queued.max.messages.kbytes": 32768,
            # How long the broker may hold a fetch that found nothing new. With librdkafka's
            # 500 ms, records of a slow stream reached us 26 ms after they were produced (p50;
            # p90 690 ms) on the bench box; with 100 ms, 5 ms (p90 13 ms). An idle member
            # then asks five times a second instead of twice.
            "fetch.wait.max.ms": 100,
            "error_cb": self._on_client_error,
        }
        config.update(client_config or {})
        # Never jump on our own: a position outside the log (records deleted by retention
        # before they were read) is reported to the listener, which decides (data_loss).
        config["auto.offset.reset"] = "error"
        self._group = group
        # librdkafka's cooperative protocols hand out increments; eager ones whole assignments.
        self._cooperative = (
            "cooperative" in str(config["partition.assignment.strategy"])
            or str(config.get("group.protocol", "classic")) == "consumer"
        )
        self._listener: RebalanceListener | None = None
        # Partitions a rebalance callback moved during the current consume() call.
        self._moved: set[tuple[str, int]] = set()
        self._closed = False
        self._unreachable_deadline_s = unreachable_deadline_s
        self._down_since: float | None = None
        self._last_probe = 0.0
        try:
            self._consumer = confluent_kafka.Consumer(config)
        except confluent_kafka.KafkaException as exc:
            raise translate(exc, "cannot create Kafka consumer", group=group) from exc

    def _on_client_error(self, error: confluent_kafka.KafkaError) -> None:
        # librdkafka reconnects by itself; we only note since when no broker answers, so that
        # poll_batch can give up after the deadline instead of waiting forever.
        if (
            error.code() == confluent_kafka.KafkaError._ALL_BROKERS_DOWN
            and self._down_since is None
        ):
            self._down_since = time.monotonic()
        log.warning(
            "kafka_client_error", code=error.name(), reason=error.str(), fatal=error.fatal()
        )

    def _check_reachable(self) -> None:
        """While brokers are down: probe now and then; past the deadline, give up."""
        if self._down_since is None:
            return
        now = time.monotonic()
        if now - self._last_probe < _PROBE_INTERVAL_S:
            return
        self._last_probe = now
        try:
            self._consumer.list_topics(timeout=_PROBE_TIMEOUT_S)
        except confluent_kafka.KafkaException:
            down_for = now - self._down_since
            if down_for > self._unreachable_deadline_s:
                raise KafkaError(
                    "no Kafka broker reachable within the deadline; giving up",
                    retriable=False,
                    group=self._group,
                    down_for_s=round(down_for, 1),
                    deadline_s=self._unreachable_deadline_s,
                ) from None
            return
        log.info("kafka_reachable_again", down_for_s=round(now - self._down_since, 1))
        self._down_since = None

    def subscribe(self, topics: Sequence[str], listener: RebalanceListener) -> None:
        self._listener = listener
        try:
            self._consumer.subscribe(
                list(topics),
                on_assign=self._on_assign,
                on_revoke=self._on_revoke,
                on_lost=self._on_lost,
            )
        except confluent_kafka.KafkaException as exc:
            raise translate(exc, "cannot subscribe", topics=list(topics)) from exc

    def _require_listener(self) -> RebalanceListener:
        if self._listener is None:
            raise KafkaError("rebalance callback before subscribe()", group=self._group)
        return self._listener

    def _on_assign(self, consumer: Any, partitions: list[confluent_kafka.TopicPartition]) -> None:
        listener = self._require_listener()
        self._moved.update((p.topic, p.partition) for p in partitions)
        tps = [TopicPartition(p.topic, p.partition) for p in partitions]
        starts = listener.on_assigned(tps)  # also when empty: the member has joined
        positioned = [
            confluent_kafka.TopicPartition(tp.topic, tp.partition, _offset(starts[tp]))
            for tp in tps
        ]
        if self._cooperative:
            consumer.incremental_assign(positioned)
        else:
            consumer.assign(positioned)
        held = [p for p in positioned if starts[TopicPartition(p.topic, p.partition)] is None]
        fetching = [p for p in positioned if p not in held]
        if fetching:
            # A partition we paused (fenced, or stopped on a bad record) and lost comes back
            # fresh: it must fetch again.
            consumer.resume(fetching)
        if held:
            consumer.pause(held)  # stopped by the engine at assignment: assigned, not fetched

    def _on_revoke(self, consumer: Any, partitions: list[confluent_kafka.TopicPartition]) -> None:
        listener = self._require_listener()
        self._moved.update((p.topic, p.partition) for p in partitions)
        tps = [TopicPartition(p.topic, p.partition) for p in partitions]
        if tps:
            listener.on_revoked(tps)
        if self._cooperative:
            consumer.incremental_unassign(partitions)
        else:
            consumer.unassign()

    def _on_lost(self, consumer: Any, partitions: list[confluent_kafka.TopicPartition]) -> None:
        listener = self._require_listener()
        self._moved.update((p.topic, p.partition) for p in partitions)
        tps = [TopicPartition(p.topic, p.partition) for p in partitions]
        if tps:
            listener.on_lost(tps)
        if self._cooperative:
            consumer.incremental_unassign(partitions)
        else:
            consumer.unassign()

    def _consume(self, gathered: list[Any], count: int, timeout_s: float) -> list[Any]:
        """One consume() call added to `gathered`; messages gathered before a rebalance
        callback in it that moved their partition are dropped (fetched again after it)."""
        self._moved.clear()
        try:
            messages = self._consumer.consume(num_messages=count, timeout=timeout_s)
        except confluent_kafka.KafkaException as exc:
            raise translate(exc, "poll failed", group=self._group) from exc
        if self._moved and gathered:
            moved = self._moved
            gathered = [m for m in gathered if (m.topic(), m.partition()) not in moved]
        return gathered + messages if gathered else messages

    def poll_batch(
        self, max_records: int, timeout_s: float, fill_s: float = 0.0
    ) -> list[RawRecord]:
        # What the client holds, at once; wait only when it holds nothing. A batch then fills
        # for fill_s at most (the commit interval).
        messages = self._consume([], max_records, 0.0)
        if not messages and timeout_s > 0:
            messages = self._consume(messages, 1, timeout_s)
            if messages and len(messages) < max_records:
                messages = self._consume(messages, max_records - len(messages), fill_s)
        elif messages and fill_s > 0 and len(messages) < max_records:
            messages = self._consume(messages, max_records - len(messages), fill_s)
        if messages:
            self._down_since = None
        else:
            self._check_reachable()
        records: list[RawRecord] = []
        out_of_range: list[TopicPartition] = []
        for message in messages:
            error = message.error()
            if error is not None:
                if error.code() == confluent_kafka.KafkaError._PARTITION_EOF:
                    continue
                outside = _outside_the_log(message)
                if outside is not None:
                    out_of_range.append(outside)
                    continue
                if error.fatal():
                    raise KafkaError(
                        "fatal consumer error",
                        code=error.name(),
                        reason=error.str(),
                        topic=message.topic(),
                        partition=message.partition(),
                    )
                log.warning(
                    "kafka_fetch_error",
                    code=error.name(),
                    reason=error.str(),
                    topic=message.topic(),
                    partition=message.partition(),
                )
                continue
            records.append(_raw_record(message))
        if out_of_range:
            self._reposition(sorted(set(out_of_range)))
        return records

    def _reposition(self, partitions: Sequence[TopicPartition]) -> None:
        """Ask the listener where partitions whose fetch position fell outside the log go on;
        seek those, pause the rest."""
        go_on = self._require_listener().on_out_of_range(partitions)
        try:
            for tp, offset in go_on.items():
                self._consumer.seek(confluent_kafka.TopicPartition(tp.topic, tp.partition, offset))
        except confluent_kafka.KafkaException as exc:
            raise translate(exc, "cannot seek after an out-of-range fetch") from exc
        self.pause([tp for tp in partitions if tp not in go_on])

    def pause(self, partitions: Sequence[TopicPartition]) -> None:
        if partitions:
            self._consumer.pause(
                [confluent_kafka.TopicPartition(p.topic, p.partition) for p in partitions]
            )

    def resume(self, partitions: Sequence[TopicPartition]) -> None:
        if partitions:
            self._consumer.resume(
                [confluent_kafka.TopicPartition(p.topic, p.partition) for p in partitions]
            )

    def commit_advisory(self, next_offsets: Mapping[TopicPartition, int]) -> None:
        if not next_offsets:
            return
        offsets = [
            confluent_kafka.TopicPartition(tp.topic, tp.partition, offset)
            for tp, offset in next_offsets.items()
        ]
        try:
            self._consumer.commit(offsets=offsets, asynchronous=True)
        except confluent_kafka.KafkaException as exc:
            # Advisory only: the sink already holds the truth. Lag tools lag a little longer.
            log.info("advisory_commit_failed", error=str(translate(exc, "commit failed")))

    def watermarks(self, partition: TopicPartition, timeout_s: float = 10.0) -> tuple[int, int]:
        return _watermarks(self._consumer, partition, timeout_s)

    def group_metadata(self) -> object:
        return self._consumer.consumer_group_metadata()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            self._consumer.close()
        except (confluent_kafka.KafkaException, RuntimeError) as exc:
            log.warning("kafka_close_failed", error=str(exc))


def _watermarks(consumer: Any, partition: TopicPartition, timeout_s: float) -> tuple[int, int]:
    try:
        low, high = consumer.get_watermark_offsets(
            confluent_kafka.TopicPartition(partition.topic, partition.partition),
            timeout=timeout_s,
            cached=False,
        )
    except confluent_kafka.KafkaException as exc:
        raise translate(
            exc, "cannot read watermarks", topic=partition.topic, partition=partition.partition
        ) from exc
    return int(low), int(high)


_NO_TIMESTAMP = confluent_kafka.TIMESTAMP_NOT_AVAILABLE


def _raw_record(message: Any) -> RawRecord:
    # Positional, straight from the message: this runs once per record fetched.
    timestamp_type, timestamp = message.timestamp()
    headers = message.headers()
    return RawRecord(
        message.topic(),
        message.partition(),
        message.offset(),
        None if timestamp_type == _NO_TIMESTAMP else timestamp,
        message.key(),
        message.value(),
        () if headers is None else tuple(headers),
        message.leader_epoch(),
    )


def _outside_the_log(message: Any) -> TopicPartition | None:
    """The partition of an error message saying its fetch position is outside the log (with
    no automatic offset reset, librdkafka reports instead of jumping); None for other errors."""
    topic, partition = message.topic(), message.partition()
    if (
        message.error().code() == confluent_kafka.KafkaError._AUTO_OFFSET_RESET
        and topic is not None
        and partition is not None
    ):
        return TopicPartition(topic, partition)
    return None


def _offset(position: StartPosition | None) -> int:
    if isinstance(position, int):
        return position
    if position is None:  # held (paused at once): no position is fetched from
        return int(confluent_kafka.OFFSET_INVALID)
    return int(_START[position])


class ConfluentReader:
    """`PartitionReader` over confluent_kafka: manual assignment, never joins or commits."""

    def __init__(
        self,
        *,
        bootstrap_servers: str,
        client_id: str,
        client_config: Mapping[str, str] | None = None,
    ) -> None:
        config: dict[str, Any] = {
            "bootstrap.servers": bootstrap_servers,
            # librdkafka wants a group id; assign() without subscribe() never joins it and we
            # never commit, so the name only shows up in broker logs.
            "group.id": client_id,
            "client.id": client_id,
            "enable.auto.commit": False,
            "enable.auto.offset.store": False,
            "enable.partition.eof": False,
            "queued.max.messages.kbytes": 32768,
        }
        config.update(client_config or {})
        # A position outside the log is reported (out_of_range), never silently reset.
        config["auto.offset.reset"] = "error"
        self._out_of_range: set[TopicPartition] = set()
        self._bootstrap = bootstrap_servers
        self._client_config = dict(client_config or {})
        self._closed = False
        try:
            self._consumer = confluent_kafka.Consumer(config)
        except confluent_kafka.KafkaException as exc:
            raise translate(exc, "cannot create Kafka reader") from exc

    def partitions(self, topic: str) -> list[int]:
        try:
            metadata = self._consumer.list_topics(topic, timeout=15)
        except confluent_kafka.KafkaException as exc:
            raise translate(exc, "cannot read topic metadata", topic=topic) from exc
        found = metadata.topics.get(topic)
        if found is None or found.error is not None or not found.partitions:
            raise ConfigError("unknown topic", topic=topic)
        return sorted(found.partitions)

    def watermarks(self, partition: TopicPartition, timeout_s: float = 10.0) -> tuple[int, int]:
        return _watermarks(self._consumer, partition, timeout_s)

    def offsets_for_time(
        self, partitions: Sequence[TopicPartition], timestamp_ms: int
    ) -> dict[TopicPartition, int | None]:
        query = [
            confluent_kafka.TopicPartition(p.topic, p.partition, timestamp_ms) for p in partitions
        ]
        try:
            answers = self._consumer.offsets_for_times(query, timeout=15)
        except confluent_kafka.KafkaException as exc:
            raise translate(
                exc, "cannot look up offsets by time", timestamp_ms=timestamp_ms
            ) from exc
        found: dict[TopicPartition, int | None] = {}
        for answer in answers:
            if answer.error is not None:
                raise KafkaError(
                    "offset lookup by time failed",
                    topic=answer.topic,
                    partition=answer.partition,
                    reason=str(answer.error),
                )
            found[TopicPartition(answer.topic, answer.partition)] = (
                int(answer.offset) if answer.offset >= 0 else None
            )
        return found

    def assign(self, positions: Mapping[TopicPartition, int]) -> None:
        try:
            self._consumer.assign(
                [
                    confluent_kafka.TopicPartition(tp.topic, tp.partition, o)
                    for tp, o in positions.items()
                ]
            )
        except confluent_kafka.KafkaException as exc:
            raise translate(exc, "cannot assign partitions") from exc

    def poll_batch(self, max_records: int, timeout_s: float) -> list[RawRecord]:
        try:
            messages = self._consumer.consume(num_messages=max_records, timeout=timeout_s)
        except confluent_kafka.KafkaException as exc:
            raise translate(exc, "poll failed") from exc
        records = []
        for message in messages:
            error = message.error()
            if error is None:
                records.append(_raw_record(message))
            elif error.fatal():
                raise KafkaError("fatal consumer error", code=error.name(), reason=error.str())
            elif (outside := _outside_the_log(message)) is not None:
                self._out_of_range.add(outside)
            else:
                log.warning(
                    "kafka_fetch_error",
                    code=error.name(),
                    reason=error.str(),
                    topic=message.topic(),
                    partition=message.partition(),
                )
        return records

    def out_of_range(self) -> list[TopicPartition]:
        found, self._out_of_range = sorted(self._out_of_range), set()
        return found

    def pause(self, partitions: Sequence[TopicPartition]) -> None:
        if partitions:
            self._consumer.pause(
                [confluent_kafka.TopicPartition(p.topic, p.partition) for p in partitions]
            )

    def position(self, partition: TopicPartition) -> int | None:
        try:
            (answer,) = self._consumer.position(
                [confluent_kafka.TopicPartition(partition.topic, partition.partition)]
            )
        except confluent_kafka.KafkaException as exc:
            raise translate(exc, "cannot read position", topic=partition.topic) from exc
        return int(answer.offset) if answer.offset >= 0 else None

    def group_members(self, group: str) -> list[str]:
        admin = confluent_kafka.admin.AdminClient(
            {"bootstrap.servers": self._bootstrap, **self._client_config}
        )
        deadline = time.monotonic() + _COORDINATOR_WAIT_S
        while True:
            try:
                description = admin.describe_consumer_groups([group], request_timeout=15)[
                    group
                ].result()
                break
            except confluent_kafka.KafkaException as exc:
                # A broker just started (or a coordinator moving) answers NOT_COORDINATOR or
                # COORDINATOR_LOAD_IN_PROGRESS for a while: ask again, to a deadline.
                if exc.args[0].code() not in _COORDINATOR_MOVING or time.monotonic() > deadline:
                    raise translate(exc, "cannot describe consumer group", group=group) from exc
                time.sleep(0.5)
        return [member.client_id for member in description.members]

    def committed_offsets(self, group: str) -> dict[TopicPartition, int]:
        admin = confluent_kafka.admin.AdminClient(
            {"bootstrap.servers": self._bootstrap, **self._client_config}
        )
        request = confluent_kafka.ConsumerGroupTopicPartitions(group)
        try:
            answer = admin.list_consumer_group_offsets([request], request_timeout=15)[group]
            result = answer.result()
        except confluent_kafka.KafkaException as exc:
            raise translate(exc, "cannot list the group's committed offsets", group=group) from exc
        return {
            TopicPartition(tp.topic, tp.partition): int(tp.offset)
            for tp in result.topic_partitions
            if tp.offset >= 0 and tp.error is None
        }

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._consumer.close()
