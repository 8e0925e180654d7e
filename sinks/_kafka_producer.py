"""The Kafka sink's transactional producer: which transactional.id it takes, making it, and
bounding its blocking calls (`WatchedProducer`)."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Mapping
from typing import Any

import confluent_kafka
import structlog

from consumer import ConfigError, SinkError
from sinks._kafka_errors import error_context
from sinks._kafka_settings import OPERATION_TIMEOUT_S, KafkaSinkSettings

log = structlog.get_logger("offsetkeeper.sink.kafka")

# How much longer than its own timeout a transactional call is waited for before its producer
# is given up as wedged (see WatchedProducer).
WEDGE_MARGIN_S = 5.0
# Producers given up on: never destroyed while a thread may still be blocked inside one.
_ABANDONED: list[Any] = []


def transactional_id_for(settings: KafkaSinkSettings, group: str, *, bound: bool) -> str:
    """The URL's transactional.id if it sets one. Otherwise, `bound` (one member of a live
    group): a random id, as the generation fences zombies; unbound (a replay job): the job's
    own stable id, so a second run fences the first."""
    if settings.transactional_id is not None:
        return settings.transactional_id
    return f"offsetkeeper-{group}-{uuid.uuid4().hex[:12]}" if bound else f"offsetkeeper-{group}"


class WatchedProducer:
    """A transactional confluent-kafka Producer whose blocking calls cannot block for ever.

    librdkafka's transactional calls can outlive the timeout they are given:
    `send_offsets_to_transaction` never returns while its group coordinator request waits on a
    broker that has left the cluster (confluentinc/librdkafka#5456 and #5511: that request's
    timeout is never checked). Seen here when the group coordinator's node was killed: the
    member blocked, max.poll.interval.ms passed and the group went on without it.

    So each blocking call runs on a thread of its own and is waited for `WEDGE_MARGIN_S` longer
    than its timeout. Past that the producer is wedged: the call raises a fatal `_TIMED_OUT`
    (the sink then drops this producer and the next batch makes a new one), and every later
    call raises at once. Its open transaction is never committed: the broker aborts it at the
    transaction timeout, or at once when the new producer takes the same transactional.id."""

    def __init__(self, producer: Any, *, transactional_id: str, sink: str) -> None:
        self._producer = producer
        self._transactional_id = transactional_id
        self._sink = sink
        self.wedged_in: str | None = None

    def produce(self, *args: Any, **kwargs: Any) -> None:
        self._producer.produce(*args, **kwargs)

    def poll(self, timeout: float) -> int:
        return int(self._producer.poll(timeout))

    def flush(self, timeout: float) -> int:
        if self.wedged_in is not None:
            return 0  # its messages belong to a transaction that will never commit
        return int(self._producer.flush(timeout))

    def begin_transaction(self) -> None:
        self._require_usable("begin_transaction")
        self._producer.begin_transaction()  # local state only: it does not block

    def init_transactions(self, timeout: float) -> None:
        self._bounded("init_transactions", timeout, timeout)

    def send_offsets_to_transaction(
        self, offsets: Any, group_metadata: object, timeout: float
    ) -> None:
        self._bounded("send_offsets_to_transaction", timeout, offsets, group_metadata, timeout)

    def commit_transaction(self, timeout: float) -> None:
        self._bounded("commit_transaction", timeout, timeout)

    def abort_transaction(self, timeout: float) -> None:
        self._bounded("abort_transaction", timeout, timeout)

    def _require_usable(self, call: str) -> None:
        if self.wedged_in is not None:
            raise confluent_kafka.KafkaException(
                confluent_kafka.KafkaError(
                    confluent_kafka.KafkaError._FATAL,
                    f"{call} on a producer given up on (wedged in {self.wedged_in})",
                    fatal=True,
                )
            )

    def _bounded(self, call: str, timeout_s: float, *args: Any) -> None:
        """`call` of the producer with `args`, waited for up to `timeout_s` + WEDGE_MARGIN_S."""
        self._require_usable(call)
        run = getattr(self._producer, call)
        outcome: list[tuple[bool, Any]] = []
        done = threading.Event()

        def target() -> None:
            try:
                outcome.append((True, run(*args)))
            except BaseException as exc:  # handed to the caller's thread
                outcome.append((False, exc))
            done.set()

        # A daemon thread: one wedged for good must not hold the process open at exit.
        threading.Thread(target=target, name=f"kafka-sink-{call}", daemon=True).start()
        waited_s = timeout_s + WEDGE_MARGIN_S
        if not done.wait(waited_s):
            self.wedged_in = call
            _ABANDONED.append(self._producer)
            log.error(
                "kafka_sink_producer_wedged",
                call=call,
                waited_s=waited_s,
                transactional_id=self._transactional_id,
                sink=self._sink,
                why="a transactional call outlived its timeout (confluentinc/librdkafka#5456,"
                " #5511); the producer is given up on and the batch retried with a new one",
            )
            raise confluent_kafka.KafkaException(
                confluent_kafka.KafkaError(
                    confluent_kafka.KafkaError._TIMED_OUT,
                    f"{call} did not return in {waited_s:.0f}s; the producer is given up on",
                    fatal=True,
                )
            )
        succeeded, value = outcome[0]
        if not succeeded:
            raise value


def transactional_producer(
    client_config: Mapping[str, Any],
    settings: KafkaSinkSettings,
    transactional_id: str,
    *,
    sink: str,
) -> WatchedProducer:
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
        producer = WatchedProducer(
            confluent_kafka.Producer(config), transactional_id=transactional_id, sink=sink
        )
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
