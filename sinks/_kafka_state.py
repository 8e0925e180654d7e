"""Keyed processor state of the Kafka sink (`consumer.StateStore`): compacted changelog topics,
the way Kafka Streams keeps its stores.

Layout: one changelog topic per (consumer group, source topic), named

    <state_topic_prefix>.<group>.<source topic>.<hash>

where group and source topic are cut to 60 characters with anything but letters, digits, '_'
and '-' replaced by '_', and <hash> is the first 12 hex digits of SHA-256 over group NUL topic:
any group id gives a valid name, and two groups that read alike after the clean-up still get
topics of their own. It has the source topic's partition count, and the entries of source
partition p live in changelog partition p. It is created (cleanup.policy=compact, the sink's
`state_replication_factor` or the broker's default, `state_min_insync_replicas` when set) on the
first write; an existing one must be compacted only (no retention deleting state) and have at
least the source's partition count, or the sink refuses it (`ConfigError`).

Message of one entry (`encode_change` / `decode_message`):
    key     JSON `[p, "<entry key>"]` in ASCII (any str round-trips; `p` catches a misplaced
            message)
    value   `{"version":N,"value":<the entry's JSON text, byte for byte>}`; a deleted entry is a
            tombstone (no value), which compaction removes in time

A changelog partition is restored by reading it from its beginning to its log end with
isolation.level=read_committed (`ChangelogReader`), so the entries of aborted (or fenced)
transactions are skipped and a transaction still open is waited for until it ends.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import re
import time
import uuid
from collections.abc import Collection, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import confluent_kafka

# These are in confluent_kafka.admin's public API, missing from its type stub's exports.
from confluent_kafka.admin import (  # type: ignore[attr-defined]
    ConfigResource,
    NewTopic,
    OffsetSpec,
    ResourceType,
)

from consumer import ConfigError, SinkError, StateChange, StateEntry, TopicPartition
from sinks._kafka_errors import error_context, kafka_error
from sinks._kafka_settings import OPERATION_TIMEOUT_S, KafkaSinkSettings

_NAME_PART_CHARACTERS = frozenset(
    "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-"
)
_NAME_PART_MAX = 60
_HASH_DIGITS = 12
_VALUE = re.compile(rb'\A\{"version":(-?[0-9]+),"value":(.*)\}\Z', re.DOTALL)
_RESTORE_BATCH = 1000
_KEY_PARTS = 2  # [partition, entry key]
_METADATA_POLL_S = 0.1


def changelog_topic(prefix: str, group: str, topic: str) -> str:
    """The changelog topic of `group`'s state of source `topic` (module docstring)."""
    identity = f"{group}\x00{topic}".encode("utf-8", "surrogatepass")
    digest = hashlib.sha256(identity).hexdigest()[:_HASH_DIGITS]
    return f"{prefix}.{_name_part(group)}.{_name_part(topic)}.{digest}"


def _name_part(text: str) -> str:
    cleaned = "".join(c if c in _NAME_PART_CHARACTERS else "_" for c in text[:_NAME_PART_MAX])
    return cleaned or "_"


def encode_key(partition: int, key: str) -> bytes:
    return json.dumps([partition, key], separators=(",", ":")).encode("ascii")


def encode_change(change: StateChange) -> tuple[bytes, bytes | None]:
    """(key, value) of the changelog message of one change; value None is a tombstone."""
    key = encode_key(change.partition.partition, change.key)
    if change.value is None:
        return key, None
    return key, b'{"version":%d,"value":' % change.version + change.value + b"}"


def decode_message(
    changelog: str, partition: int, key: bytes | None, value: bytes | None
) -> tuple[str, StateEntry | None]:
    """(entry key, entry or None for a tombstone) of a changelog message of `partition`."""
    try:
        decoded = json.loads(key or b"")
    except ValueError:
        decoded = None
    if (
        not isinstance(decoded, list)
        or len(decoded) != _KEY_PARTS
        or decoded[0] != partition
        or not isinstance(decoded[1], str)
    ):
        raise SinkError(
            "a changelog message's key is not an entry key of its partition",
            changelog=changelog,
            partition=partition,
            key=repr((key or b"")[:80]),
        )
    entry_key: str = decoded[1]
    if value is None:
        return entry_key, None
    matched = _VALUE.match(value)
    if matched is None:
        raise SinkError(
            "a changelog message's value is not an offsetkeeper state entry",
            changelog=changelog,
            partition=partition,
            key=entry_key,
        )
    return entry_key, StateEntry(entry_key, matched.group(2), int(matched.group(1)))


@dataclass(slots=True)
class PartitionState:
    """The restored entries of one partition, and the bytes of their values."""

    entries: dict[str, StateEntry] = field(default_factory=dict)
    value_bytes: int = 0

    def put(self, key: str, entry: StateEntry | None) -> None:
        """Set (or with None, delete) the entry of `key`."""
        old = self.entries.pop(key, None)
        if old is not None:
            self.value_bytes -= len(old.value)
        if entry is not None:
            self.entries[key] = entry
            self.value_bytes += len(entry.value)


@dataclass(frozen=True, slots=True)
class ChangelogMessage:
    """One message `write_state` produces in the batch's transaction."""

    topic: str
    partition: int
    key: bytes
    value: bytes | None


class ChangelogReader:
    """Reads changelog partitions from their beginning to their log end, read_committed, with
    one consumer (never in a group, never committing) made on first use."""

    def __init__(self, client_config: Mapping[str, Any], *, sink: str) -> None:
        self._config = {
            **client_config,
            "group.id": f"offsetkeeper-state-restore-{uuid.uuid4().hex[:12]}",
            "isolation.level": "read_committed",
            "enable.auto.commit": False,
            "enable.auto.offset.store": False,
            "auto.offset.reset": "earliest",
        }
        self._sink = sink
        self._consumer: Any = None

    def restore(
        self, admin: Any, changelog: str, partition: int, *, wait_s: float
    ) -> PartitionState:
        """The entries of `changelog`'s `partition`. The end is the log end (read_uncommitted),
        so every transaction open when the restore starts is waited for, up to `wait_s`."""
        state = PartitionState()
        end = _log_end(admin, changelog, partition)
        if end <= 0:
            return state
        consumer = self._ensure_consumer()
        wanted = confluent_kafka.TopicPartition(
            changelog, partition, confluent_kafka.OFFSET_BEGINNING
        )
        try:
            consumer.assign([wanted])
            _read_to(
                consumer, state, changelog, partition, end=end, deadline=time.monotonic() + wait_s
            )
            consumer.unassign()
        except confluent_kafka.KafkaException as exc:
            self.close()  # a consumer in an unknown state is not reused
            raise SinkError(
                "cannot read the state changelog",
                changelog=changelog,
                partition=partition,
                **error_context(exc),
            ) from exc
        except SinkError:
            self.close()
            raise
        return state

    def _ensure_consumer(self) -> Any:
        if self._consumer is None:
            try:
                self._consumer = confluent_kafka.Consumer(dict(self._config))
            except confluent_kafka.KafkaException as exc:
                raise ConfigError(
                    "invalid kafka sink client settings", sink=self._sink, **error_context(exc)
                ) from exc
        return self._consumer

    def close(self) -> None:
        consumer, self._consumer = self._consumer, None
        if consumer is not None:
            with contextlib.suppress(confluent_kafka.KafkaException, RuntimeError):
                consumer.close()


def _read_to(
    consumer: Any,
    state: PartitionState,
    changelog: str,
    partition: int,
    *,
    end: int,
    deadline: float,
) -> None:
    """Apply the messages `consumer` (assigned to the partition) reads until its position
    reaches `end` (read_committed: past the markers of the transactions up to there)."""
    where = [confluent_kafka.TopicPartition(changelog, partition)]
    while True:
        position = consumer.position(where)
        if position and int(position[0].offset) >= end:
            return
        if time.monotonic() > deadline:
            raise SinkError(
                "cannot read the state changelog to its end: a transaction stays open",
                changelog=changelog,
                partition=partition,
                end_offset=end,
            )
        for message in consumer.consume(num_messages=_RESTORE_BATCH, timeout=0.5):
            error = message.error()
            if error is not None:
                raise SinkError(
                    "cannot read the state changelog",
                    changelog=changelog,
                    partition=partition,
                    code=error.name(),
                    reason=error.str(),
                )
            key, entry = decode_message(changelog, partition, message.key(), message.value())
            state.put(key, entry)


def _log_end(admin: Any, changelog: str, partition: int) -> int:
    """The partition's log end offset, open transactions included (read_uncommitted: a
    read_committed query would answer the last stable offset)."""
    latest = OffsetSpec.latest()  # type: ignore[no-untyped-call]
    request = {confluent_kafka.TopicPartition(changelog, partition): latest}
    try:
        futures = admin.list_offsets(
            request,
            isolation_level=confluent_kafka.IsolationLevel.READ_UNCOMMITTED,
            request_timeout=OPERATION_TIMEOUT_S,
        )
        return int(next(iter(futures.values())).result().offset)
    except confluent_kafka.KafkaException as exc:
        raise SinkError(
            "cannot read the end offset of the state changelog",
            changelog=changelog,
            partition=partition,
            **error_context(exc),
        ) from exc


class Changelogs:
    """Names the changelog topics, creates them on the first write and checks existing ones
    (once per sink instance and topic)."""

    def __init__(self, settings: KafkaSinkSettings, *, sink: str) -> None:
        self._settings = settings
        self._sink = sink
        self._checked: dict[str, int] = {}  # changelog -> its partition count, checked

    def name(self, group: str, topic: str) -> str:
        return changelog_topic(self._settings.state_topic_prefix, group, topic)

    def existing(self, admin: Any, group: str, partition: TopicPartition) -> str | None:
        """The changelog holding `partition`'s state, checked; None when there is none yet."""
        return self._checked_changelog(admin, group, partition, create=False)

    def for_writing(self, admin: Any, group: str, partition: TopicPartition) -> str:
        """The changelog to write `partition`'s state to, created if need be, checked."""
        changelog = self._checked_changelog(admin, group, partition, create=True)
        if changelog is None:  # pragma: no cover - create=True makes it or raises
            raise SinkError("state changelog missing after creating it", sink=self._sink)
        return changelog

    def _checked_changelog(
        self, admin: Any, group: str, partition: TopicPartition, *, create: bool
    ) -> str | None:
        changelog = self.name(group, partition.topic)
        if self._checked.get(changelog, 0) > partition.partition:
            return changelog
        topics = _topic_metadata(admin, sink=self._sink)
        source = topics.get(partition.topic)
        needed = max(partition.partition + 1, 0 if source is None else len(source.partitions))
        found = topics.get(changelog)
        if found is None and not create:
            return None
        if found is None and self._create(admin, changelog, needed, partition.topic):
            self._checked[changelog] = needed
            return changelog
        if found is None:  # another member created it first: wait until the metadata shows it
            found = self._created_elsewhere(admin, changelog)
        count = 0 if found is None else len(found.partitions)
        self._require(admin, changelog, count, needed, group=group, topic=partition.topic)
        self._checked[changelog] = count
        return changelog

    def _created_elsewhere(self, admin: Any, changelog: str) -> Any:
        """The metadata of `changelog`, which a concurrent creator (another member's first
        batch) just made: the broker's metadata may not show it, or its partitions, yet. An
        answer without them is not "fewer partitions" (a ConfigError that stops the member)
        but a moment too early: asked again until the deadline, then a retriable SinkError."""
        deadline = time.monotonic() + OPERATION_TIMEOUT_S
        while True:
            found = _topic_metadata(admin, sink=self._sink).get(changelog)
            if found is not None and found.error is None and found.partitions:
                return found
            if time.monotonic() > deadline:
                raise SinkError(
                    "the state changelog topic exists but its metadata does not show it yet",
                    changelog=changelog,
                    sink=self._sink,
                )
            time.sleep(_METADATA_POLL_S)

    def _create(self, admin: Any, changelog: str, partitions: int, source: str) -> bool:
        """Create `changelog`; False when it already existed."""
        config = {"cleanup.policy": "compact"}
        if self._settings.state_min_insync_replicas is not None:
            config["min.insync.replicas"] = str(self._settings.state_min_insync_replicas)
        new_topic = NewTopic(
            changelog,
            num_partitions=partitions,
            replication_factor=self._settings.state_replication_factor or -1,
            config=config,
        )
        try:
            admin.create_topics([new_topic], request_timeout=OPERATION_TIMEOUT_S)[
                changelog
            ].result()
        except confluent_kafka.KafkaException as exc:
            error = kafka_error(exc)
            if (
                error is not None
                and error.code() == confluent_kafka.KafkaError.TOPIC_ALREADY_EXISTS
            ):
                return False
            raise SinkError(
                "cannot create the state changelog topic",
                changelog=changelog,
                source_topic=source,
                partitions=partitions,
                **error_context(exc),
            ) from exc
        return True

    def _require(
        self, admin: Any, changelog: str, count: int, needed: int, *, group: str, topic: str
    ) -> None:
        """ConfigError unless `changelog` is compacted only and has `needed` partitions."""
        if count < needed:
            raise ConfigError(
                "the state changelog topic has fewer partitions than its source topic; "
                "add partitions to it (partition p holds source partition p's state)",
                changelog=changelog,
                partitions=count,
                needed=needed,
                group=group,
                source_topic=topic,
            )
        policy = _cleanup_policy(admin, changelog)
        if policy != "compact":
            raise ConfigError(
                "the state changelog topic must have cleanup.policy=compact (and only that: "
                "retention would delete state)",
                changelog=changelog,
                cleanup_policy=policy,
                group=group,
                source_topic=topic,
            )


def _topic_metadata(admin: Any, *, sink: str) -> dict[str, Any]:
    try:
        return dict(admin.list_topics(timeout=OPERATION_TIMEOUT_S).topics)
    except confluent_kafka.KafkaException as exc:
        raise SinkError("cannot reach the Kafka cluster", sink=sink, **error_context(exc)) from exc


def _cleanup_policy(admin: Any, changelog: str) -> str:
    resource = ConfigResource(ResourceType.TOPIC, changelog)
    try:
        described = admin.describe_configs([resource], request_timeout=OPERATION_TIMEOUT_S)
        entries = next(iter(described.values())).result()
    except confluent_kafka.KafkaException as exc:
        raise SinkError(
            "cannot read the state changelog's configuration",
            changelog=changelog,
            **error_context(exc),
        ) from exc
    entry = entries.get("cleanup.policy")
    return "" if entry is None or entry.value is None else str(entry.value).replace(" ", "")


class KafkaStateStore:
    """The Kafka sink's keyed state, served from memory: the whole state of each partition in
    use is restored from its changelog partition on first access (`ChangelogReader`) and then
    kept in step with what this process commits. The sink calls `forget` on each assignment,
    so a partition taken again is restored anew, never served from an earlier ownership's copy.

    `messages` turns a batch's changes into changelog messages (the sink produces them in its
    transaction); after the commit, `apply` brings the copies in step; an aborted batch
    changes nothing here; after a commit whose outcome is unknown, `forget` makes the next
    read restore the truth from the changelog."""

    def __init__(
        self,
        client_config: Mapping[str, Any],
        settings: KafkaSinkSettings,
        *,
        sink: str,
        wait_s: float,
    ) -> None:
        self.changelogs = Changelogs(settings, sink=sink)
        self._reader = ChangelogReader(client_config, sink=sink)
        self._copies: dict[tuple[str, TopicPartition], PartitionState] = {}
        self._wait_s = wait_s

    def forget(self, group: str, partitions: Iterable[TopicPartition]) -> None:
        for partition in partitions:
            self._copies.pop((group, partition), None)

    def read(
        self, admin: Any, group: str, partition: TopicPartition, keys: Collection[str]
    ) -> dict[str, StateEntry]:
        entries = self._copy(admin, group, partition).entries
        return {key: entries[key] for key in keys if key in entries}

    def sizes(
        self, admin: Any, group: str, partitions: Iterable[TopicPartition]
    ) -> dict[TopicPartition, tuple[int, int]]:
        sizes = {}
        for partition in partitions:
            copy = self._copy(admin, group, partition)
            if copy.entries:
                sizes[partition] = (len(copy.entries), copy.value_bytes)
        return sizes

    def loaded(self, group: str) -> list[TopicPartition]:
        """The partitions of `group` whose state is in memory."""
        return [partition for (owner, partition) in self._copies if owner == group]

    def scan(self, admin: Any, group: str, partition: TopicPartition) -> Iterator[StateEntry]:
        entries = self._copy(admin, group, partition).entries
        return iter([entries[key] for key in sorted(entries)])

    def messages(
        self, admin: Any, group: str, changes: Sequence[StateChange]
    ) -> list[ChangelogMessage]:
        """The changelog messages of `changes` (creating a changelog topic on first need)."""
        messages = []
        for change in changes:
            changelog = self.changelogs.for_writing(admin, group, change.partition)
            key, value = encode_change(change)
            messages.append(ChangelogMessage(changelog, change.partition.partition, key, value))
        return messages

    def apply(self, group: str, changes: Sequence[StateChange]) -> None:
        """Bring the copies in memory in step with committed `changes` (a partition not in
        memory is restored with them when it is next read)."""
        for change in changes:
            copy = self._copies.get((group, change.partition))
            if copy is not None:
                entry = (
                    None
                    if change.value is None
                    else StateEntry(change.key, change.value, change.version)
                )
                copy.put(change.key, entry)

    def _copy(self, admin: Any, group: str, partition: TopicPartition) -> PartitionState:
        copy = self._copies.get((group, partition))
        if copy is None:
            changelog = self.changelogs.existing(admin, group, partition)
            copy = (
                PartitionState()
                if changelog is None
                else self._reader.restore(
                    admin, changelog, partition.partition, wait_s=self._wait_s
                )
            )
            self._copies[(group, partition)] = copy
        return copy

    def close(self) -> None:
        self._reader.close()
        self._copies.clear()
