"""The Kafka sink's replay job plans (`consumer.JobStore`), kept in a topic of their own."""

from __future__ import annotations

import time
import uuid
from collections.abc import Mapping
from typing import Any

import confluent_kafka

# NewTopic is in confluent_kafka.admin's public API, missing from its type stub's exports.
from confluent_kafka.admin import NewTopic  # type: ignore[attr-defined]

from consumer import ConfigError, SinkError
from sinks._kafka_errors import error_context, kafka_error
from sinks._kafka_groups import topic_names
from sinks._kafka_settings import OPERATION_TIMEOUT_S


class KafkaJobStore:
    """Job documents as records of `topic` (created on the first job): one partition, so one
    order of writes; kept forever and not compacted, so the first record of a job id is the
    job and a later duplicate (two runs racing to create it) never replaces it. The admin
    client is the sink's, passed to each call."""

    def __init__(self, client_config: Mapping[str, Any], topic: str, *, sink: str) -> None:
        self._config = dict(client_config)
        self.topic = topic
        self._sink = sink
        self._producer: Any = None

    def create_job(self, admin: Any, job_id: str, document: str) -> str:
        stored = self.load_job(admin, job_id)
        if stored is not None:
            return stored
        if self.topic not in topic_names(admin, sink=self._sink):
            self._create_topic(admin)
        producer = self._ensure_producer()
        delivery: list[BaseException] = []

        def delivered(error: Any, _message: Any) -> None:
            if error is not None:
                delivery.append(confluent_kafka.KafkaException(error))

        producer.produce(
            self.topic, key=job_id.encode(), value=document.encode(), on_delivery=delivered
        )
        if producer.flush(OPERATION_TIMEOUT_S) or delivery:
            raise SinkError(
                "cannot store replay job",
                job=job_id,
                topic=self.topic,
                reason=str(delivery[0]) if delivery else "not delivered in time",
            )
        # Two runs may have raced to create it: the first record in the log is the job.
        first = self.load_job(admin, job_id)
        if first is None:
            raise SinkError("replay job not readable after writing it", job=job_id)
        return first

    def _ensure_producer(self) -> Any:
        if self._producer is None:
            try:
                self._producer = confluent_kafka.Producer(
                    {**self._config, "enable.idempotence": True, "acks": "all"}
                )
            except confluent_kafka.KafkaException as exc:
                raise ConfigError(
                    "invalid kafka sink client settings", sink=self._sink, **error_context(exc)
                ) from exc
        return self._producer

    def _create_topic(self, admin: Any) -> None:
        topic = NewTopic(
            self.topic,
            num_partitions=1,
            replication_factor=-1,
            config={"cleanup.policy": "delete", "retention.ms": "-1", "retention.bytes": "-1"},
        )
        try:
            admin.create_topics([topic])[self.topic].result()
        except confluent_kafka.KafkaException as exc:
            error = kafka_error(exc)
            if error is None or error.code() != confluent_kafka.KafkaError.TOPIC_ALREADY_EXISTS:
                raise SinkError(
                    "cannot create the replay jobs topic", topic=self.topic, **error_context(exc)
                ) from exc

    def load_job(self, admin: Any, job_id: str) -> str | None:
        """The first document stored for `job_id`, read from the start of the topic."""
        if self.topic not in topic_names(admin, sink=self._sink):
            return None
        reader = confluent_kafka.Consumer(
            {
                **self._config,
                "group.id": f"offsetkeeper-jobs-reader-{uuid.uuid4().hex[:8]}",
                "enable.auto.commit": False,
                "enable.auto.offset.store": False,
            }
        )
        try:
            return self._find(reader, job_id.encode())
        except confluent_kafka.KafkaException as exc:
            raise SinkError(
                "cannot read replay job", job=job_id, topic=self.topic, **error_context(exc)
            ) from exc
        finally:
            reader.close()

    def _find(self, reader: Any, key: bytes) -> str | None:
        partition = confluent_kafka.TopicPartition(self.topic, 0)
        watermarks = reader.get_watermark_offsets(partition, timeout=OPERATION_TIMEOUT_S)
        high = int(watermarks[1]) if watermarks else 0
        if high <= 0:
            return None
        reader.assign(
            [confluent_kafka.TopicPartition(self.topic, 0, confluent_kafka.OFFSET_BEGINNING)]
        )
        deadline = time.monotonic() + OPERATION_TIMEOUT_S
        while time.monotonic() < deadline:
            for message in reader.consume(num_messages=500, timeout=1.0):
                if message.error() is not None:
                    continue
                if message.key() == key:
                    return bytes(message.value() or b"").decode()
                if (message.offset() or 0) >= high - 1:
                    return None
        raise SinkError("cannot read the replay jobs topic to its end", topic=self.topic)

    def close(self) -> None:
        if self._producer is not None:
            self._producer.flush(OPERATION_TIMEOUT_S)
            self._producer = None
