"""The Kafka sink's transactional producer: which transactional.id it takes, and making it."""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from typing import Any

import confluent_kafka

from consumer import ConfigError, SinkError
from sinks._kafka_errors import error_context
from sinks._kafka_settings import OPERATION_TIMEOUT_S, KafkaSinkSettings


def transactional_id_for(settings: KafkaSinkSettings, group: str, *, bound: bool) -> str:
    """The URL's transactional.id if it sets one. Otherwise, `bound` (one member of a live
    group): a random id, as the generation fences zombies; unbound (a replay job): the job's
    own stable id, so a second run fences the first."""
    if settings.transactional_id is not None:
        return settings.transactional_id
    return f"offsetkeeper-{group}-{uuid.uuid4().hex[:12]}" if bound else f"offsetkeeper-{group}"


def transactional_producer(
    client_config: Mapping[str, Any],
    settings: KafkaSinkSettings,
    transactional_id: str,
    *,
    sink: str,
) -> Any:
    """A confluent-kafka Producer with `transactional_id`, its transactions initialised (which
    aborts an open transaction of an earlier producer with the same id)."""
    config = {
        **client_config,
        "transactional.id": transactional_id,
        "transaction.timeout.ms": settings.transaction_timeout_ms,
        "enable.idempotence": True,
        "acks": "all",
    }
    try:
        producer = confluent_kafka.Producer(config)
    except confluent_kafka.KafkaException as exc:
        raise ConfigError(
            "invalid kafka sink client settings", sink=sink, **error_context(exc)
        ) from exc
    try:
        producer.init_transactions(OPERATION_TIMEOUT_S)
    except confluent_kafka.KafkaException as exc:
        raise SinkError(
            "cannot initialise the transactional producer",
            sink=sink,
            transactional_id=transactional_id,
            **error_context(exc),
        ) from exc
    return producer


def produce(producer: Any, topic: str, key: bytes, value: bytes | None, **extra: Any) -> None:
    """Produce one message, waiting while the producer's local queue is full (`extra`: the
    partition or headers)."""
    while True:
        try:
            producer.produce(topic, value=value, key=key, **extra)
            break
        except BufferError:
            producer.poll(0.1)  # the local queue is full: let deliveries drain
    producer.poll(0)
