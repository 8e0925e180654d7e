"""What the cluster says about topics and consumer groups, read through the Kafka sink's admin
client: topic names, a group's committed offsets as checkpoints (waiting out a transaction
still open), the groups holding this sink's checkpoints, and whether a group has members.
Committed offsets are read by an admin client in a child process (`_kafka_offset_reader`: a
librdkafka crash)."""

from __future__ import annotations

import time
from typing import Any

import confluent_kafka

from consumer import Checkpoint, ConfigError, SinkError, TopicPartition
from sinks._kafka_errors import error_context, kafka_error
from sinks._kafka_offset_reader import IsolatedOffsetReader, OffsetAnswer, OffsetReaderCrashedError
from sinks._kafka_offsets import decode_committed_offset, own_metadata
from sinks._kafka_settings import OPERATION_TIMEOUT_S

_UNSTABLE_POLL_S = 0.2
# The group coordinator is loading its offsets (a broker just started, or the coordinator moved):
# retriable, waited out like an offset still in an open transaction.
_COORDINATOR_BUSY = frozenset(
    {
        confluent_kafka.KafkaError.COORDINATOR_LOAD_IN_PROGRESS,
        confluent_kafka.KafkaError.COORDINATOR_NOT_AVAILABLE,
        confluent_kafka.KafkaError.NOT_COORDINATOR,
    }
)


def topic_names(admin: Any, *, sink: str) -> set[str]:
    try:
        metadata = admin.list_topics(timeout=OPERATION_TIMEOUT_S)
    except confluent_kafka.KafkaException as exc:
        raise SinkError("cannot reach the Kafka cluster", sink=sink, **error_context(exc)) from exc
    return set(metadata.topics)


def list_offsets(
    reader: IsolatedOffsetReader,
    group: str,
    partitions: list[TopicPartition] | None,
    *,
    require_stable: bool,
) -> list[OffsetAnswer]:
    """The committed offsets of `group` (all of its partitions when `partitions` is None)."""
    try:
        return reader.list_offsets(
            group,
            None if partitions is None else [(tp.topic, tp.partition) for tp in partitions],
            require_stable=require_stable,
            timeout_s=OPERATION_TIMEOUT_S,
        )
    except (confluent_kafka.KafkaException, OffsetReaderCrashedError) as exc:
        raise SinkError(
            "cannot read the group's committed offsets", group=group, **error_context(exc)
        ) from exc


def committed_checkpoints(
    reader: IsolatedOffsetReader,
    group: str,
    partitions: list[TopicPartition] | None,
    *,
    wait_s: float,
) -> dict[TopicPartition, Checkpoint]:
    """Committed offsets of `group` as checkpoints (all of its partitions when `partitions` is
    None). For named partitions the read is stable: an offset in a transaction still open (a
    predecessor killed mid-commit) is waited for, up to `wait_s`, until that transaction
    commits or the broker aborts it at its timeout; so is a coordinator still loading."""
    deadline = time.monotonic() + wait_s
    while True:
        try:
            answers = list_offsets(reader, group, partitions, require_stable=partitions is not None)
        except SinkError as exc:
            cause = exc.__cause__
            error = kafka_error(cause) if cause is not None else None
            # The reader's child crashing is librdkafka meeting a moving coordinator: busy too.
            busy = isinstance(cause, OffsetReaderCrashedError) or (
                error is not None and error.code() in _COORDINATOR_BUSY
            )
            if not busy or time.monotonic() > deadline:
                raise
            time.sleep(_UNSTABLE_POLL_S)
            continue
        unstable = [
            answer
            for answer in answers
            if answer.error is not None
            and (
                answer.error.code() == confluent_kafka.KafkaError.UNSTABLE_OFFSET_COMMIT
                or answer.error.code() in _COORDINATOR_BUSY
            )
        ]
        if not unstable:
            break
        if time.monotonic() > deadline:
            raise SinkError(
                "a transaction holding the group's offsets is still open",
                group=group,
                partitions=sorted((a.topic, a.partition) for a in unstable),
            )
        time.sleep(_UNSTABLE_POLL_S)
    return _checkpoints(group, answers)


def _checkpoints(group: str, answers: list[OffsetAnswer]) -> dict[TopicPartition, Checkpoint]:
    checkpoints: dict[TopicPartition, Checkpoint] = {}
    for answer in answers:
        if answer.error is not None:
            raise SinkError(
                "cannot read the group's committed offset",
                group=group,
                topic=answer.topic,
                partition=answer.partition,
                code=answer.error.name(),
                reason=answer.error.str(),
            )
        if answer.offset < 0:
            continue  # nothing committed for this partition
        checkpoints[TopicPartition(answer.topic, answer.partition)] = decode_committed_offset(
            group, answer.topic, answer.partition, int(answer.offset), answer.metadata
        )
    return checkpoints


def groups_with_checkpoints(
    admin: Any, reader: IsolatedOffsetReader, sink_topic: str, *, sink: str
) -> list[str]:
    """Groups whose committed offsets carry checkpoints of the sink writing to `sink_topic`
    (scans every group)."""
    try:
        listed = admin.list_consumer_groups(request_timeout=OPERATION_TIMEOUT_S).result()
    except confluent_kafka.KafkaException as exc:
        raise SinkError("cannot list consumer groups", sink=sink, **error_context(exc)) from exc
    groups = []
    for listing in listed.valid:
        answers = list_offsets(reader, listing.group_id, None, require_stable=False)
        if any(
            (document := own_metadata(answer.metadata)) is not None
            and document.get("sink") == sink_topic
            for answer in answers
        ):
            groups.append(listing.group_id)
    return sorted(groups)


def require_empty_group(admin: Any, group: str) -> None:
    """ConfigError unless `group` has no members (a Kafka group cannot be locked otherwise)."""
    try:
        description = admin.describe_consumer_groups([group], request_timeout=OPERATION_TIMEOUT_S)[
            group
        ].result()
    except confluent_kafka.KafkaException as exc:
        raise SinkError(
            "cannot describe consumer group", group=group, **error_context(exc)
        ) from exc
    if description.members:
        raise ConfigError(
            "stop the group's consumers before migrating its checkpoints in Kafka",
            group=group,
            members=len(description.members),
        )
