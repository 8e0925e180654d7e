"""Reading and re-driving a dead-letter topic (`offsetkeeper dlq show|replay`).

A dead-letter topic holds each bad record at least once (see consumer.deadletters.writer); both
commands collapse repeats by origin (source topic, partition, offset), so each bad record is
shown and re-driven once per run.

Re-driving, after the cause is fixed:

- `to_original`: each dead letter's original key, value and headers are produced to its source
  topic and partition, in Kafka transactions that also commit the dead-letter topic position of
  a re-drive consumer group (`send_offsets_to_transaction`). A crash re-drives nothing twice,
  and a second run re-drives only letters that arrived since.
- `to_pipeline`: each original record goes through the app's processor into the sink, with the
  position in the dead-letter topic checkpointed in the same sink transaction (checkpoint group
  `dlq:<dead-letter topic>`). The rows are those the live consumer would have written (append
  tables are keyed by the original topic, partition and offset). A record that still fails
  stops the run there, named, with everything before it committed.
"""

from __future__ import annotations

import contextlib
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import confluent_kafka
import structlog

from consumer.backends.confluent import translate
from consumer.core.app import App
from consumer.core.errors import ConfigError, KafkaError, RecordError
from consumer.core.records import RawRecord, TopicPartition
from consumer.deadletters.writer import DeadLetterOrigin, original_record
from consumer.decoding.decoders import Decoder
from consumer.decoding.topics import TopicDecoders
from consumer.engine.client import PartitionReader
from consumer.engine.loop import BatchLoop
from consumer.engine.planned import PlannedRun
from consumer.engine.sink import Sink

log = structlog.get_logger("offsetkeeper.dlq")

_BATCH = 500
_POLL_TIMEOUT_S = 0.5
_TRANSACTION_TIMEOUT_S = 30.0
_STALL_TIMEOUT_S = 60.0  # no progress towards the end offset for this long: the broker is gone


@dataclass(frozen=True, slots=True)
class DeadLetterEntry:
    """One dead letter as read back: where it sits in the dead-letter topic, and its origin."""

    position: TopicPartition
    offset: int
    origin: DeadLetterOrigin
    original: RawRecord


@dataclass(slots=True)
class DeadLetterScan:
    entries: list[DeadLetterEntry] = field(default_factory=list)
    repeats: int = 0  # copies of an origin already seen (a crash re-sent them)
    foreign: int = 0  # records without our headers (written by something else): left alone


def scan(
    reader: PartitionReader,
    dead_letter_topic: str,
    starts: dict[int, int] | None = None,
    *,
    on_batch: Callable[[int, list[tuple[int, DeadLetterEntry | None]]], None] | None = None,
) -> DeadLetterScan:
    """Read the topic from `starts` (default: the log start) to its end as of now.

    `on_batch(partition, [(offset, entry or None for a repeat/foreign record)])` is called per
    polled batch, in offset order, for callers that act as they read.
    """
    result = DeadLetterScan()
    seen: set[tuple[str, int, int]] = set()
    for partition, records in _read_to_end(reader, dead_letter_topic, starts or {}):
        acted: list[tuple[int, DeadLetterEntry | None]] = []
        for dead in records:
            found = original_record(dead)
            if found is None:
                result.foreign += 1
                acted.append((dead.offset, None))
                continue
            original, origin = found
            identity = (origin.topic, origin.partition, origin.offset)
            if identity in seen:
                result.repeats += 1
                acted.append((dead.offset, None))
                continue
            seen.add(identity)
            entry = DeadLetterEntry(
                position=TopicPartition(dead_letter_topic, partition),
                offset=dead.offset,
                origin=origin,
                original=original,
            )
            result.entries.append(entry)
            acted.append((dead.offset, entry))
        if on_batch is not None and acted:
            on_batch(partition, acted)
    return result


def _read_to_end(
    reader: PartitionReader, topic: str, starts: dict[int, int]
) -> Iterator[tuple[int, list[RawRecord]]]:
    """Per partition, batches of records from its start to the end offset seen at the outset."""
    for partition in reader.partitions(topic):
        tp = TopicPartition(topic, partition)
        low, high = reader.watermarks(tp)
        start = max(starts.get(partition, low), low)
        if start >= high:
            continue
        reader.assign({tp: start})
        position = start
        stalled_since = time.monotonic()
        while position < high:
            records = [
                r for r in reader.poll_batch(_BATCH, _POLL_TIMEOUT_S) if r.partition == partition
            ]
            records = [r for r in records if position <= r.offset < high]
            if records:
                position = records[-1].offset + 1
                stalled_since = time.monotonic()
                yield partition, records
            elif (reader.position(tp) or position) >= high:
                break  # the rest of the range was compacted or aborted transaction markers
            elif time.monotonic() - stalled_since > _STALL_TIMEOUT_S:
                raise KafkaError(
                    "no records arrive from the dead-letter topic",
                    topic=topic,
                    partition=partition,
                    position=position,
                    end=high,
                    waited_s=_STALL_TIMEOUT_S,
                )


def redrive_group(dead_letter_topic: str) -> str:
    """The consumer group whose committed offsets say how far `to_original` has re-driven."""
    return f"offsetkeeper-dlq-redrive.{dead_letter_topic}"


@dataclass(frozen=True, slots=True)
class RedriveSummary:
    redriven: int
    repeats: int
    foreign: int
    stopped: RecordError | None = None


def to_original(
    reader: PartitionReader,
    *,
    bootstrap_servers: str,
    dead_letter_topic: str,
    client_config: dict[str, str],
    dry_run: bool = False,
) -> RedriveSummary:
    """Produce each dead letter's original record back to its source topic (see the module
    docstring); with dry_run, only count what would be re-driven."""
    group = redrive_group(dead_letter_topic)
    starts = {
        tp.partition: offset
        for tp, offset in reader.committed_offsets(group).items()
        if tp.topic == dead_letter_topic
    }
    if dry_run:
        scanned = scan(reader, dead_letter_topic, starts)
        return RedriveSummary(len(scanned.entries), scanned.repeats, scanned.foreign)
    redriver = _TransactionalRedriver(bootstrap_servers, group, dead_letter_topic, client_config)
    try:
        scanned = scan(reader, dead_letter_topic, starts, on_batch=redriver.redrive)
    finally:
        redriver.close()
    return RedriveSummary(len(scanned.entries), scanned.repeats, scanned.foreign)


class _TransactionalRedriver:
    """One Kafka transaction per dead-letter batch: the originals plus the group's position."""

    def __init__(
        self, bootstrap: str, group: str, topic: str, client_config: dict[str, str]
    ) -> None:
        self._topic = topic
        common = {"bootstrap.servers": bootstrap, **client_config}
        try:
            self._producer: Any = confluent_kafka.Producer(
                {
                    **common,
                    "transactional.id": f"{group}-{uuid.uuid4().hex[:12]}",
                    "enable.idempotence": True,
                    "acks": "all",
                }
            )
            # Never subscribes: its group metadata (no generation) commits for a memberless
            # group, which is what this re-drive group is.
            self._group_client: Any = confluent_kafka.Consumer(
                {**common, "group.id": group, "enable.auto.commit": False}
            )
            self._producer.init_transactions(_TRANSACTION_TIMEOUT_S)
        except confluent_kafka.KafkaException as exc:
            raise translate(exc, "cannot start the re-drive producer") from exc
        self._group = group

    def redrive(self, partition: int, acted: list[tuple[int, DeadLetterEntry | None]]) -> None:
        try:
            self._producer.begin_transaction()
            for _offset, entry in acted:
                if entry is None:
                    continue  # a repeat or a foreign record: only the position moves past it
                original = entry.original
                self._producer.produce(
                    original.topic,
                    key=original.key,
                    value=original.value,
                    headers=list(original.headers),
                    partition=original.partition,
                )
            next_offset = acted[-1][0] + 1
            self._producer.send_offsets_to_transaction(
                [confluent_kafka.TopicPartition(self._topic, partition, next_offset)],
                self._group_client.consumer_group_metadata(),
                _TRANSACTION_TIMEOUT_S,
            )
            self._producer.commit_transaction(_TRANSACTION_TIMEOUT_S)
        except confluent_kafka.KafkaException as exc:
            # The transaction is gone either way; the position was not moved.
            with contextlib.suppress(confluent_kafka.KafkaException):
                self._producer.abort_transaction(_TRANSACTION_TIMEOUT_S)
            raise translate(exc, "re-drive transaction failed; nothing of it was committed") from (
                exc
            )
        log.info(
            "dead_letters_redriven",
            dead_letter_partition=partition,
            records=sum(1 for _o, e in acted if e is not None),
            next_offset=next_offset,
        )

    def close(self) -> None:
        self._producer.flush(10)
        self._group_client.close()


def pipeline_group(dead_letter_topic: str) -> str:
    """The sink checkpoint group of `to_pipeline` runs over this dead-letter topic."""
    return f"dlq:{dead_letter_topic}"


def to_pipeline(
    app: App,
    reader: PartitionReader,
    sink: Sink,
    decoders: TopicDecoders,
    *,
    dead_letter_topic: str,
) -> RedriveSummary:
    """Run each dead letter's original record through the app into the sink (module docstring),
    through the engine's one loop: the dead-letter topic's positions are the checkpoints, and
    each letter is unwrapped into its original record before processing."""
    if app.state is not None:
        raise ConfigError(
            "dead letters of a stateful app cannot skip ahead of its state: re-drive them "
            "with --to original",
            app=app.name,
        )
    ranges: dict[TopicPartition, tuple[int, int]] = {}
    for partition in reader.partitions(dead_letter_topic):
        tp = TopicPartition(dead_letter_topic, partition)
        ranges[tp] = reader.watermarks(tp)  # [log start, end as of now)
    letters = _Letters(decoders)
    loop = BatchLoop(
        app,
        sink,
        group=pipeline_group(dead_letter_topic),
        decoders=decoders,
        pause=reader.pause,
        unwrap=letters.unwrap,
    )
    summary = PlannedRun(
        loop,
        reader,
        ranges,
        batch_max_records=_BATCH,
        poll_timeout_s=_POLL_TIMEOUT_S,
        stall_timeout_s=_STALL_TIMEOUT_S,
    ).run()
    # Only what was committed counts: a partition stopped at a letter keeps the rest for later.
    committed = {
        tp: position.next_offset for tp, position in loop.positions.items() if position.next_offset
    }
    counts = letters.committed(committed)
    stopped = min(summary.stopped.values(), key=lambda e: e.offset or 0, default=None)
    if stopped is not None:
        log.error(
            "dead_letter_still_bad",
            topic=stopped.topic,
            partition=stopped.partition,
            offset=stopped.offset,
            field=stopped.field,
            error=str(stopped),
        )
    return RedriveSummary(
        redriven=counts["letter"],
        repeats=counts["repeat"],
        foreign=counts["foreign"],
        stopped=stopped,
    )


class _Letters:
    """Unwraps dead letters into their original records for the loop, and remembers what each
    dead-letter position held: a letter, a repeat of an origin seen earlier in this run, or a
    foreign record. Idempotent per position (the loop may process a batch again)."""

    def __init__(self, decoders: TopicDecoders) -> None:
        self._decoders = decoders
        self._claimed: dict[tuple[str, int, int], tuple[int, int]] = {}
        self._kinds: dict[tuple[int, int], str] = {}

    def unwrap(self, dead: RawRecord) -> tuple[RawRecord, Decoder] | None:
        position = (dead.partition, dead.offset)
        found = original_record(dead)
        if found is None:
            self._kinds[position] = "foreign"
            return None
        original, origin = found
        claimant = self._claimed.setdefault(
            (origin.topic, origin.partition, origin.offset), position
        )
        if claimant != position:
            self._kinds[position] = "repeat"
            return None
        self._kinds[position] = "letter"
        return original, self._decoders.for_topic(original.topic)

    def committed(self, next_offsets: dict[TopicPartition, int]) -> dict[str, int]:
        """How many letters, repeats and foreign records lie below the committed positions."""
        counts = {"letter": 0, "repeat": 0, "foreign": 0}
        ends = {tp.partition: offset for tp, offset in next_offsets.items()}
        for (partition, offset), kind in self._kinds.items():
            if offset < ends.get(partition, 0):
                counts[kind] += 1
        return counts


def describe(entries: Sequence[DeadLetterEntry]) -> list[dict[str, Any]]:
    """Plain values per entry, for JSON output and the text table."""
    return [
        {
            "topic": e.origin.topic,
            "partition": e.origin.partition,
            "offset": e.origin.offset,
            "timestamp_ms": e.origin.timestamp_ms,
            "error_class": e.origin.error_class,
            "error": e.origin.error_message,
            "field": e.origin.error_field,
            "group": e.origin.group,
            "attempts": e.origin.attempts,
            "key": None if e.original.key is None else e.original.key.decode("utf-8", "replace"),
            "value_bytes": None if e.original.value is None else len(e.original.value),
            "dead_letter_partition": e.position.partition,
            "dead_letter_offset": e.offset,
        }
        for e in entries
    ]
