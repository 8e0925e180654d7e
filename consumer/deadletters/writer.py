"""Dead letters: records given up on, written to a Kafka topic with headers saying why.

A dead letter keeps the original key, value and headers byte for byte, and adds headers that
name where it came from and what went wrong (`HEADER_*`). The engine writes a batch's dead
letters, and waits until the broker has acknowledged every one, before it commits an offset past
them: a crash in between sends them again on restart (at least once in the topic), never loses
one. `offsetkeeper dlq show|replay` collapse such repeats by their origin (topic, partition,
offset), so each bad record is shown and re-driven once.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import confluent_kafka
import structlog
from confluent_kafka.admin import AdminClient, NewTopic  # type: ignore[attr-defined]

from consumer.core.errors import ConfigError, KafkaError, RecordError
from consumer.core.records import RawRecord
from consumer.engine.batch import DeadLetter

log = structlog.get_logger("offsetkeeper.dead_letters")

HEADER_PREFIX = "offsetkeeper.dlq."
HEADER_TOPIC = HEADER_PREFIX + "topic"
HEADER_PARTITION = HEADER_PREFIX + "partition"
HEADER_OFFSET = HEADER_PREFIX + "offset"
HEADER_TIMESTAMP = HEADER_PREFIX + "timestamp"
HEADER_ERROR_CLASS = HEADER_PREFIX + "error.class"
HEADER_ERROR_MESSAGE = HEADER_PREFIX + "error.message"
HEADER_ERROR_FIELD = HEADER_PREFIX + "error.field"
HEADER_GROUP = HEADER_PREFIX + "group"
HEADER_ATTEMPTS = HEADER_PREFIX + "attempts"
HEADER_FAILED_AT = HEADER_PREFIX + "failed.at"

# Kafka's default max.message.bytes is ~1 MB; an error message is capped well below it.
_MAX_MESSAGE_CHARS = 2000
_DELIVERY_TIMEOUT_MS = 30_000


def error_class(error: RecordError) -> str:
    """The class a user would look for: the processor's own exception (which a plain
    RecordError wraps), else ours (DecodeError, InvalidRecordError)."""
    cause = error.__cause__
    if type(error) is RecordError and cause is not None:
        return type(cause).__name__
    return type(error).__name__


def dead_letter_headers(letter: DeadLetter, group: str) -> list[tuple[str, bytes]]:
    """The original headers, then ours (see the module docstring)."""
    raw = letter.record
    error = letter.error
    headers: list[tuple[str, bytes]] = [
        (name, value if value is not None else b"") for name, value in raw.headers
    ]
    ours: dict[str, str | None] = {
        HEADER_TOPIC: raw.topic,
        HEADER_PARTITION: str(raw.partition),
        HEADER_OFFSET: str(raw.offset),
        HEADER_TIMESTAMP: None if raw.timestamp_ms is None else str(raw.timestamp_ms),
        HEADER_ERROR_CLASS: error_class(error),
        HEADER_ERROR_MESSAGE: str(error)[:_MAX_MESSAGE_CHARS],
        HEADER_ERROR_FIELD: error.field,
        HEADER_GROUP: group,
        HEADER_ATTEMPTS: str(letter.attempts),
        HEADER_FAILED_AT: datetime.now(tz=UTC).isoformat(timespec="milliseconds"),
    }
    headers.extend((name, value.encode()) for name, value in ours.items() if value is not None)
    return headers


@dataclass(frozen=True, slots=True)
class DeadLetterOrigin:
    """Where a dead letter came from and why, read back from its headers."""

    topic: str
    partition: int
    offset: int
    timestamp_ms: int | None
    error_class: str
    error_message: str
    error_field: str | None
    group: str | None
    attempts: int | None

    @classmethod
    def from_headers(cls, headers: Sequence[tuple[str, bytes | None]]) -> DeadLetterOrigin | None:
        """None when the headers are not ours (something else wrote to the topic)."""
        found = {name: (value or b"").decode("utf-8", "replace") for name, value in headers}
        try:
            return cls(
                topic=found[HEADER_TOPIC],
                partition=int(found[HEADER_PARTITION]),
                offset=int(found[HEADER_OFFSET]),
                timestamp_ms=int(found[HEADER_TIMESTAMP]) if HEADER_TIMESTAMP in found else None,
                error_class=found.get(HEADER_ERROR_CLASS, ""),
                error_message=found.get(HEADER_ERROR_MESSAGE, ""),
                error_field=found.get(HEADER_ERROR_FIELD),
                group=found.get(HEADER_GROUP),
                attempts=int(found[HEADER_ATTEMPTS]) if HEADER_ATTEMPTS in found else None,
            )
        except (KeyError, ValueError):
            return None


def original_headers(headers: Sequence[tuple[str, bytes | None]]) -> list[tuple[str, bytes]]:
    """A dead letter's headers without ours: what the original record carried."""
    return [
        (name, value if value is not None else b"")
        for name, value in headers
        if not name.startswith(HEADER_PREFIX)
    ]


def original_record(dead: RawRecord) -> tuple[RawRecord, DeadLetterOrigin] | None:
    """The record as it was on its source topic (None: `dead` is not one of our letters)."""
    origin = DeadLetterOrigin.from_headers(dead.headers)
    if origin is None:
        return None
    original = RawRecord(
        topic=origin.topic,
        partition=origin.partition,
        offset=origin.offset,
        timestamp_ms=origin.timestamp_ms,
        key=dead.key,
        value=dead.value,
        headers=tuple(original_headers(dead.headers)),
    )
    return original, origin


def resolve_topic(template: str, *, group: str, source_topic: str) -> str:
    """`template` with `{group}` and `{topic}` filled in."""
    try:
        return template.format(group=group, topic=source_topic)
    except (KeyError, IndexError, ValueError) as exc:
        raise ConfigError(
            "dead-letter topic template may only use {group} and {topic}",
            dead_letter_topic=template,
        ) from exc


class KafkaDeadLetterWriter:
    """Writes dead letters with an idempotent confluent-kafka producer (acks=all)."""

    def __init__(
        self,
        *,
        bootstrap_servers: str,
        group: str,
        topic_template: str,
        client_config: Mapping[str, str] | None = None,
    ) -> None:
        self._group = group
        self._template = topic_template
        self._bootstrap = bootstrap_servers
        self._client_config = _producer_settings(client_config or {})
        self._producer: Any = None

    def topic_for(self, source_topic: str) -> str:
        return resolve_topic(self._template, group=self._group, source_topic=source_topic)

    def prepare(self, source_topics: Sequence[str]) -> None:
        wanted = sorted({self.topic_for(topic) for topic in source_topics})
        admin = AdminClient({"bootstrap.servers": self._bootstrap, **self._client_config})
        try:
            existing = admin.list_topics(timeout=10).topics
        except confluent_kafka.KafkaException as exc:
            raise KafkaError("cannot list topics to check the dead-letter topic") from exc
        missing = [topic for topic in wanted if topic not in existing]
        if missing:
            # The broker's default partition count and replication factor (-1: its defaults).
            futures = admin.create_topics(
                [NewTopic(topic, num_partitions=-1, replication_factor=-1) for topic in missing]
            )
            for topic, future in futures.items():
                try:
                    future.result(timeout=30)
                except confluent_kafka.KafkaException as exc:
                    if exc.args[0].code() != confluent_kafka.KafkaError.TOPIC_ALREADY_EXISTS:
                        raise KafkaError(
                            "cannot create the dead-letter topic", dead_letter_topic=topic
                        ) from exc
            log.info("dead_letter_topics_created", topics=missing)
        log.info("dead_letters_enabled", topics=wanted)

    def write(self, letters: Sequence[DeadLetter]) -> None:
        if not letters:
            return
        producer = self._producer_instance()
        failures: list[str] = []

        def delivered(error: Any, message: Any) -> None:
            if error is not None:
                failures.append(f"{message.topic()}: {error}")

        for letter in letters:
            raw = letter.record
            message = {
                "key": raw.key,
                "value": raw.value,
                "headers": dead_letter_headers(letter, self._group),
                "on_delivery": delivered,
            }
            try:
                try:
                    producer.produce(self.topic_for(raw.topic), **message)
                except BufferError:  # the local queue is full: drain it, then send this one
                    producer.flush(_DELIVERY_TIMEOUT_MS / 1000)
                    producer.produce(self.topic_for(raw.topic), **message)
            except confluent_kafka.KafkaException as exc:
                raise KafkaError(
                    "cannot send a dead letter",
                    topic=raw.topic,
                    partition=raw.partition,
                    offset=raw.offset,
                ) from exc
        remaining = producer.flush(_DELIVERY_TIMEOUT_MS / 1000 + 5)
        if remaining or failures:
            raise KafkaError(
                "dead letters were not acknowledged by the broker; nothing past them is committed",
                unacknowledged=remaining,
                failures=failures[:3],
                retriable=True,
            )
        for letter in letters:
            raw = letter.record
            log.warning(
                "record_dead_lettered",
                topic=raw.topic,
                partition=raw.partition,
                offset=raw.offset,
                dead_letter_topic=self.topic_for(raw.topic),
                error_class=error_class(letter.error),
                error=str(letter.error),
                attempts=letter.attempts,
            )

    def _producer_instance(self) -> Any:
        if self._producer is None:
            self._producer = confluent_kafka.Producer(
                {
                    "bootstrap.servers": self._bootstrap,
                    **self._client_config,
                    "enable.idempotence": True,
                    "acks": "all",
                    "linger.ms": 5,
                    "delivery.timeout.ms": _DELIVERY_TIMEOUT_MS,
                }
            )
        return self._producer

    def close(self) -> None:
        if self._producer is not None:
            self._producer.flush(10)
            self._producer = None


# librdkafka settings a consumer takes that a producer would refuse or ignore noisily.
_CONSUMER_ONLY_PREFIXES = (
    "group.",
    "session.",
    "heartbeat.",
    "partition.assignment",
    "enable.auto",
    "auto.",
    "fetch.",
    "max.poll",
    "isolation.",
    "queued.",
    "enable.partition.eof",
    "check.crcs",
)


# Settings the writer sets itself, acks under both its librdkafka names. A user's value is
# dropped, not merged: librdkafka applies settings in order, and a user's `acks` would keep its
# early place in the merged dict, so a later `request.required.acks` would undo acks=all.
_WRITER_OWNED = frozenset({"acks", "request.required.acks", "enable.idempotence"})


def _producer_settings(client_config: Mapping[str, str]) -> dict[str, str]:
    """The `-X` settings that also concern a producer (security, client id, timeouts...)."""
    return {
        key: value
        for key, value in client_config.items()
        if not key.startswith(_CONSUMER_ONLY_PREFIXES) and key not in _WRITER_OWNED
    }
