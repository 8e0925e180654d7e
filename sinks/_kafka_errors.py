"""What a failed transactional call of confluent-kafka means for the Kafka sink's batch."""

from __future__ import annotations

from enum import Enum
from typing import Any

import confluent_kafka


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
