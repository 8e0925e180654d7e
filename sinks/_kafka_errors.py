"""What a failed transactional call of confluent-kafka means for the Kafka sink's batch.

A member that left the group (UNKNOWN_MEMBER_ID, FENCED_INSTANCE_ID, or group metadata with no
member) -> abort, FencedError naming every partition of the batch (the engine drops them; the
group assigns them again and `load_checkpoints` re-seeks). ILLEGAL_GENERATION /
REBALANCE_IN_PROGRESS come only while this member is still in the group (the coordinator checks
the member first) and librdkafka cannot have handed our partitions on before our rebalance
callback ran, which it cannot while we commit: abort, SinkError, the engine retries with the new
generation. A fenced producer: with our random transactional.id only a transaction timeout does
that (SinkError, new producer); with a stable id another process took it over (FencedError).
Other abortable errors -> abort, SinkError; fatal -> the producer is dropped and made again on
the next batch, SinkError.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from enum import Enum
from typing import Any

import confluent_kafka
import structlog

from consumer import FencedError, SinkError

log = structlog.get_logger("offsetkeeper.sink.kafka")


class TransactionFailure(Enum):
    """What a failed transactional call means for the batch."""

    MEMBER_FENCED = "member_fenced"  # this member left the group: its partitions are gone
    GENERATION_MOVED = "generation_moved"  # a rebalance we take part in: retry, new generation
    PRODUCER_FENCED = "producer_fenced"  # our transactional.id's epoch moved on
    FATAL = "fatal"  # the producer is unusable: make a new one
    ABORTABLE = "abortable"  # abort; the batch may be retried
    RETRIABLE = "retriable"  # the same call may be repeated


_MEMBER_FENCED = frozenset(
    {confluent_kafka.KafkaError.UNKNOWN_MEMBER_ID, confluent_kafka.KafkaError.FENCED_INSTANCE_ID}
)
_GENERATION_MOVED = frozenset(
    {
        confluent_kafka.KafkaError.ILLEGAL_GENERATION,
        confluent_kafka.KafkaError.REBALANCE_IN_PROGRESS,
    }
)
_PRODUCER_FENCED = frozenset(
    {
        confluent_kafka.KafkaError._FENCED,
        confluent_kafka.KafkaError.PRODUCER_FENCED,
        confluent_kafka.KafkaError.INVALID_PRODUCER_EPOCH,
    }
)


_BY_CODE = {
    **dict.fromkeys(_MEMBER_FENCED, TransactionFailure.MEMBER_FENCED),
    **dict.fromkeys(_GENERATION_MOVED, TransactionFailure.GENERATION_MOVED),
    **dict.fromkeys(_PRODUCER_FENCED, TransactionFailure.PRODUCER_FENCED),
}


def classify(error: confluent_kafka.KafkaError) -> TransactionFailure:
    """Map a transactional error to what the sink does about it (see `KafkaSink`)."""
    by_code = _BY_CODE.get(error.code())
    if by_code is not None:
        return by_code
    if error.fatal():
        return TransactionFailure.FATAL
    if error.txn_requires_abort():
        return TransactionFailure.ABORTABLE
    if error.retriable():
        return TransactionFailure.RETRIABLE
    return TransactionFailure.ABORTABLE


def kafka_error(exc: BaseException) -> confluent_kafka.KafkaError | None:
    if isinstance(exc, confluent_kafka.KafkaException) and exc.args:
        error = exc.args[0]
        if isinstance(error, confluent_kafka.KafkaError):
            return error
    return None


def error_context(exc: BaseException) -> dict[str, Any]:
    error = kafka_error(exc)
    if error is None:
        return {"reason": str(exc)}
    return {"code": error.name(), "reason": error.str()}


def failure_of(exc: BaseException) -> TransactionFailure:
    """What a failed call's exception means (`ABORTABLE` for one that is not Kafka's)."""
    error = kafka_error(exc)
    return TransactionFailure.ABORTABLE if error is None else classify(error)


def batch_error(
    exc: BaseException,
    message: str,
    partitions: Sequence[tuple[str, int]],
    *,
    stable_transactional_id: bool,
    transactional_id: str | None,
    member_left: Callable[[], bool],
    context: dict[str, Any],
) -> SinkError:
    """The error the engine acts on after a failed transactional call of the batch that
    carries `partitions`' offsets (see `KafkaSink`): `FencedError` when the group or a newer
    producer fenced it, else `SinkError`. `member_left()` tells, after ILLEGAL_GENERATION,
    whether the member id we committed as is gone."""
    failure = failure_of(exc)
    details = {**error_context(exc), **context}
    fenced_member = failure is TransactionFailure.MEMBER_FENCED
    fenced_producer = failure is TransactionFailure.PRODUCER_FENCED and stable_transactional_id
    if (fenced_member or fenced_producer) and partitions:
        log.warning("kafka_commit_fenced", failure=failure.value, partitions=partitions, **details)
        return FencedError(
            "the group or a newer producer fenced this commit; batch aborted",
            partitions=partitions,
            transactional_id=transactional_id,
            **details,
        )
    if failure is TransactionFailure.GENERATION_MOVED and partitions and member_left():
        return FencedError(
            "this consumer left the group while committing; batch aborted",
            partitions=partitions,
            **details,
        )
    return SinkError(message, failure=failure.value, **details)
