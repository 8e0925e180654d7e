"""Transactional Kafka sink: `kafka://HOST:PORT[,HOST:PORT]/TOPIC`.

Each batch is one Kafka transaction: the output rows are produced to TOPIC and the consumed
offsets are added with `send_offsets_to_transaction`, so a `read_committed` reader of TOPIC sees a
batch's outputs exactly when the group's offsets moved past the records that made them.

Fencing (KIP-447). The engine binds the consumer's group metadata (`GroupBoundSink`); the group
coordinator accepts the transaction's offsets only from the member of the current generation, so
a zombie (a member evicted during a GC pause or a network split) cannot commit. One transactional
producer serves the whole process; its transactional.id is random per process unless the URL sets
a stable one (then a restarted process aborts its predecessor's open transaction at once). Without
bound group metadata (`offsetkeeper replay`), the sink builds the metadata of the job's group
itself (a member-less group) and uses the stable transactional.id `offsetkeeper-<group>`, so a
second run of the same job fences the first.

Message format of an output row (`encode_row` / `decode_row`):
    value   the row as a JSON object (UTF-8), every column of the table; `bytes` columns base64
    key     a JSON object of the table's key columns (so a key always lands on one partition)
    header  `offsetkeeper-table`: the table's name

Checkpoints live in the group's committed offsets; the offset's metadata string carries the rest of
the checkpoint as compact JSON (`encode_checkpoint_metadata`). Offsets without it (committed by a
plain Kafka consumer) read as format-1 checkpoints holding only the offset.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import json
import struct
import time
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import confluent_kafka
import confluent_kafka.admin
import structlog

# NewTopic is in confluent_kafka.admin's public API, missing from its type stub's exports.
from confluent_kafka.admin import NewTopic  # type: ignore[attr-defined]

from consumer import (
    CURRENT_FORMAT_VERSION,
    Checkpoint,
    ConfigError,
    FencedError,
    RowsOrigin,
    SinkError,
    Table,
    TopicPartition,
    decode_checkpoint,
)

log = structlog.get_logger("offsetkeeper.sink.kafka")

TABLE_HEADER = "offsetkeeper-table"
# The broker's default offset.metadata.max.bytes: a longer metadata string fails the commit.
OFFSET_METADATA_MAX_BYTES = 4096
DEFAULT_TRANSACTION_TIMEOUT_MS = 10_000
_MIN_TRANSACTION_TIMEOUT_MS = 1000
JOBS_TOPIC_SUFFIX = ".offsetkeeper-jobs"
# Marks an offset's metadata as an offsetkeeper checkpoint; the value is the format version.
_METADATA_MARK = "offsetkeeper"

_OPERATION_TIMEOUT_S = 30.0
_UNSTABLE_POLL_S = 0.2
# Settings the sink owns: a user value would break the transaction or its fencing.
_RESERVED_CLIENT_KEYS = frozenset(
    {
        "bootstrap.servers",
        "transactional.id",
        "transaction.timeout.ms",
        "enable.idempotence",
        "acks",
        "group.id",
        "isolation.level",
    }
)
_URL_OPTIONS = frozenset({"transactional_id", "transaction_timeout_ms", "jobs_topic"})


# -- URL ---------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class KafkaSinkSettings:
    """What a `kafka://` URL says. `client_config` holds librdkafka keys (they contain a dot)."""

    bootstrap_servers: str
    topic: str
    transactional_id: str | None = None
    transaction_timeout_ms: int = DEFAULT_TRANSACTION_TIMEOUT_MS
    jobs_topic: str | None = None
    client_config: Mapping[str, str] = field(default_factory=dict)

    @property
    def description(self) -> str:
        return f"kafka://{self.bootstrap_servers}/{self.topic}"


def parse_kafka_url(url: str) -> KafkaSinkSettings:
    """`kafka://h:p[,h:p]/TOPIC?transactional_id=..&transaction_timeout_ms=..&jobs_topic=..&
    <librdkafka key>=..`. Unknown options, and librdkafka keys the sink sets itself, are a
    ConfigError."""
    parts = urlsplit(url)
    shown = url.split("?", 1)[0]
    if parts.scheme != "kafka":
        raise ConfigError("not a kafka:// sink URL", sink=shown)
    bootstrap = parts.netloc
    topic = parts.path.removeprefix("/")
    if not bootstrap or "@" in bootstrap:
        raise ConfigError("kafka sink URL needs HOST:PORT[,HOST:PORT] (no user part)", sink=shown)
    if not topic or "/" in topic:
        raise ConfigError(
            "kafka sink URL needs one output topic: kafka://HOST:PORT/TOPIC", sink=shown
        )
    options = dict(parse_qsl(parts.query, keep_blank_values=True, strict_parsing=False))
    client_config = {k: v for k, v in options.items() if "." in k}
    own = {k: v for k, v in options.items() if "." not in k}
    unknown = sorted(set(own) - _URL_OPTIONS)
    if unknown:
        raise ConfigError(
            "unknown kafka sink options",
            options=unknown,
            known=sorted(_URL_OPTIONS),
            hint="librdkafka settings are passed by their dotted name, e.g. linger.ms=20",
        )
    reserved = sorted(set(client_config) & _RESERVED_CLIENT_KEYS)
    if reserved:
        raise ConfigError(
            "the kafka sink sets these client settings itself",
            options=reserved,
            hint="use transactional_id= and transaction_timeout_ms= for the transaction",
        )
    timeout_text = own.get("transaction_timeout_ms", str(DEFAULT_TRANSACTION_TIMEOUT_MS))
    try:
        timeout_ms = int(timeout_text)
    except ValueError:
        raise ConfigError(
            "transaction_timeout_ms must be a whole number of milliseconds", value=timeout_text
        ) from None
    if timeout_ms < _MIN_TRANSACTION_TIMEOUT_MS:
        raise ConfigError(
            "transaction_timeout_ms is too small",
            value=timeout_ms,
            minimum=_MIN_TRANSACTION_TIMEOUT_MS,
        )
    transactional_id = own.get("transactional_id")
    if transactional_id == "":
        raise ConfigError("transactional_id must not be empty")
    jobs_topic = own.get("jobs_topic")
    if jobs_topic == "":
        raise ConfigError("jobs_topic must not be empty")
    return KafkaSinkSettings(
        bootstrap_servers=bootstrap,
        topic=topic,
        transactional_id=transactional_id,
        transaction_timeout_ms=timeout_ms,
        jobs_topic=jobs_topic,
        client_config=client_config,
    )


# -- rows <-> messages -------------------------------------------------------------------------


def _json_bytes(document: Any) -> bytes:
    return json.dumps(document, separators=(",", ":"), ensure_ascii=False).encode()


def _column_value(column_type: str, value: Any) -> Any:
    if column_type == "bytes" and value is not None:
        return base64.b64encode(bytes(value)).decode("ascii")
    return value


def encode_row(table: Table, row: Mapping[str, Any]) -> tuple[bytes, bytes]:
    """(key, value) of the message for one output row. See the module docstring."""
    key = {column: _column_value(table.columns[column], row.get(column)) for column in table.key}
    value = {
        column: _column_value(column_type, row.get(column))
        for column, column_type in table.columns.items()
    }
    try:
        return _json_bytes(key), _json_bytes(value)
    except (TypeError, ValueError) as exc:
        raise SinkError(
            "a row value cannot be written as JSON", table=table.name, reason=str(exc)
        ) from exc


def decode_row(table: Table, value: bytes) -> dict[str, Any]:
    """The row an output message's value holds (`bytes` columns decoded back to bytes)."""
    try:
        document = json.loads(value)
    except ValueError as exc:
        raise SinkError("output message is not JSON", table=table.name, reason=str(exc)) from exc
    if not isinstance(document, dict):
        raise SinkError("output message is not a JSON object", table=table.name)
    try:
        return {
            column: (
                base64.b64decode(document[column], validate=True)
                if column_type == "bytes" and document.get(column) is not None
                else document.get(column)
            )
            for column, column_type in table.columns.items()
        }
    except (TypeError, ValueError, binascii.Error) as exc:
        raise SinkError(
            "a bytes column of the output message is not base64", table=table.name, reason=str(exc)
        ) from exc


# -- checkpoints <-> committed offsets ---------------------------------------------------------


def encode_checkpoint_metadata(checkpoint: Checkpoint, *, sink_topic: str) -> str:
    """The committed offset's metadata string: everything of the checkpoint but its offset.

    Raises SinkError naming the partition when it exceeds the broker's 4096-byte limit (a large
    state belongs in an output table, not in the checkpoint)."""
    document = {
        _METADATA_MARK: CURRENT_FORMAT_VERSION,
        "sink": sink_topic,
        "epoch": checkpoint.epoch,
        "leader_epoch": checkpoint.leader_epoch,
        "writer": checkpoint.writer_version,
        "updated_ms": int(checkpoint.updated_at.timestamp() * 1000),
        "state": None
        if checkpoint.state is None
        else base64.b64encode(checkpoint.state).decode("ascii"),
        "state_version": checkpoint.state_version,
    }
    text = json.dumps(document, separators=(",", ":"))
    size = len(text.encode())
    if size > OFFSET_METADATA_MAX_BYTES:
        raise SinkError(
            "checkpoint too large for Kafka offset metadata; keep the partition state small",
            topic=checkpoint.topic,
            partition=checkpoint.partition,
            metadata_bytes=size,
            state_bytes=len(checkpoint.state or b""),
            limit_bytes=OFFSET_METADATA_MAX_BYTES,
        )
    return text


def _own_metadata(metadata: str | None) -> dict[str, Any] | None:
    if not metadata:
        return None
    try:
        document = json.loads(metadata)
    except ValueError:
        return None
    if isinstance(document, dict) and isinstance(document.get(_METADATA_MARK), int):
        return document
    return None


def decode_committed_offset(
    group: str, topic: str, partition: int, offset: int, metadata: str | None
) -> Checkpoint:
    """The checkpoint a committed offset stands for (format 1 when it has no offsetkeeper
    metadata: a plain Kafka consumer's offset, adopted as it is)."""
    document = _own_metadata(metadata)
    if document is None:
        # A plain commit says nothing of when it was made: the epoch start says "unknown".
        return decode_checkpoint(
            {
                "format_version": 1,
                "group": group,
                "topic": topic,
                "partition": partition,
                "next_offset": offset,
                "updated_at": 0,
            }
        )
    state = document.get("state")
    return decode_checkpoint(
        {
            "format_version": document[_METADATA_MARK],
            "group": group,
            "topic": topic,
            "partition": partition,
            "next_offset": offset,
            "updated_at": document.get("updated_ms", 0),
            "epoch": document.get("epoch", 0),
            "leader_epoch": document.get("leader_epoch"),
            "writer_version": document.get("writer", "unknown"),
            "state": None if state is None else base64.b64decode(state),
            "state_version": document.get("state_version"),
        }
    )


def _committed_offset(checkpoint: Checkpoint, *, sink_topic: str) -> Any:
    """The confluent TopicPartition that commits `checkpoint` (the leader epoch only when known:
    the client takes no None for it)."""
    extra: dict[str, Any] = {}
    if checkpoint.leader_epoch is not None:
        extra["leader_epoch"] = checkpoint.leader_epoch
    return confluent_kafka.TopicPartition(
        checkpoint.topic,
        checkpoint.partition,
        checkpoint.next_offset,
        metadata=encode_checkpoint_metadata(checkpoint, sink_topic=sink_topic),
        **extra,
    )


# -- group metadata and errors -----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class GroupMembership:
    """What librdkafka's serialized `ConsumerGroupMetadata` says about the member."""

    group: str
    generation: int
    member_id: str

    @property
    def is_member(self) -> bool:
        return self.generation >= 0 and bool(self.member_id)


_GROUP_METADATA_MAGIC = b"CGMDv2:"


def parse_group_metadata(metadata: object) -> GroupMembership | None:
    """Member id and generation from librdkafka's serialization (`CGMDv2:`, int32 generation in
    host byte order, then NUL-terminated group id and member id). None for anything else."""
    try:
        raw = bytes(metadata)  # type: ignore[call-overload]
    except TypeError:
        return None
    if not raw.startswith(_GROUP_METADATA_MAGIC) or len(raw) < len(_GROUP_METADATA_MAGIC) + 4:
        return None
    start = len(_GROUP_METADATA_MAGIC)
    (generation,) = struct.unpack("=i", raw[start : start + 4])
    group, _, rest = raw[start + 4 :].partition(b"\x00")
    member_id, terminated, _ = rest.partition(b"\x00")
    if not terminated:
        return None
    return GroupMembership(
        group=group.decode(errors="replace"),
        generation=int(generation),
        member_id=member_id.decode(errors="replace"),
    )


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


def _kafka_error(exc: BaseException) -> confluent_kafka.KafkaError | None:
    if isinstance(exc, confluent_kafka.KafkaException) and exc.args:
        error = exc.args[0]
        if isinstance(error, confluent_kafka.KafkaError):
            return error
    return None


def _error_context(exc: BaseException) -> dict[str, Any]:
    error = _kafka_error(exc)
    if error is None:
        return {"reason": str(exc)}
    return {"code": error.name(), "reason": error.str()}


# -- the sink ----------------------------------------------------------------------------------


@dataclass(slots=True)
class _Transaction:
    """The open transaction: which partitions' offsets it carries, and with which metadata."""

    partitions: list[tuple[str, int]] = field(default_factory=list)
    sent_as: GroupMembership | None = None


class KafkaSink:
    """`Sink` + `GroupBoundSink` over one transactional confluent-kafka Producer.

    Lifecycle: `open` checks that TOPIC exists (it is never created: its partition count and
    replication are the operator's choice). The producer is made (`init_transactions`) on the
    first `acquire`, when the group is known. `begin` -> begin_transaction, `write_rows` -> one
    message per row, `save_checkpoints` -> send_offsets_to_transaction, `commit` ->
    commit_transaction, `rollback` -> abort_transaction.

    Epochs: `acquire` returns the stored epoch + 1 per partition and records it in the
    checkpoint metadata, for the logs and `checkpoint show`. The fencing itself is the group
    coordinator's generation check on the transaction's offsets (and, for a stable
    transactional.id, the producer epoch); the `epochs` argument of `save_checkpoints` is not
    compared with anything.

    Failures: a member that left the group (UNKNOWN_MEMBER_ID, FENCED_INSTANCE_ID, or group
    metadata with no member) -> abort, FencedError naming every partition of the batch (the
    engine drops them; the group assigns them again and `load_checkpoints` re-seeks).
    ILLEGAL_GENERATION / REBALANCE_IN_PROGRESS come only while this member is still in the group
    (the coordinator checks the member first) and librdkafka cannot have handed our partitions
    on before our rebalance callback ran, which it cannot while we commit: abort, SinkError, the
    engine retries with the new generation. A fenced producer: with our random transactional.id
    only a transaction timeout does that (SinkError, new producer); with a stable id another
    process took it over (FencedError). Other abortable errors -> abort, SinkError; fatal ->
    the producer is dropped and made again on the next batch, SinkError.
    """

    writes_per_partition = False

    def __init__(self, settings: KafkaSinkSettings) -> None:
        self._settings = settings
        self._common: dict[str, Any] = {
            "bootstrap.servers": settings.bootstrap_servers,
            **settings.client_config,
        }
        self._group_metadata: Callable[[], object] | None = None
        self._admin: Any = None
        self._producer: Any = None
        self._group: str | None = None
        self._transactional_id: str | None = None
        self._transaction: _Transaction | None = None
        # Clients of a member-less group (replay jobs): one per group, never subscribed.
        self._group_clients: dict[str, Any] = {}
        self._jobs_producer: Any = None
        self._timeout_s = settings.transaction_timeout_ms / 1000

    @property
    def description(self) -> str:
        return self._settings.description

    @property
    def jobs_topic(self) -> str:
        return self._settings.jobs_topic or f"{self._settings.topic}{JOBS_TOPIC_SUFFIX}"

    # -- GroupBoundSink --------------------------------------------------------------------

    def bind_group_metadata(self, group_metadata: Callable[[], object]) -> None:
        self._group_metadata = group_metadata

    # -- open / close ----------------------------------------------------------------------

    def open(self, tables: Sequence[Table]) -> None:
        self.open_existing()
        if (
            self._group_metadata is not None
            and parse_group_metadata(self._group_metadata()) is None
        ):
            # Without reading the membership, an evicted member could commit (see
            # save_checkpoints): refuse now, clearly, rather than fence every batch later.
            raise ConfigError(
                "cannot read the consumer's group membership from this confluent-kafka "
                "version's group metadata; the kafka sink cannot fence zombies with it",
                confluent_kafka=confluent_kafka.version()[0],
                librdkafka=confluent_kafka.libversion()[0],
            )
        topics = self._topic_names()
        if self._settings.topic not in topics:
            raise ConfigError(
                "the kafka sink's output topic does not exist; create it first",
                topic=self._settings.topic,
                sink=self.description,
            )
        log.info(
            "kafka_sink_opened",
            topic=self._settings.topic,
            tables=[table.name for table in tables],
            transaction_timeout_ms=self._settings.transaction_timeout_ms,
        )

    def open_existing(self) -> None:
        if self._admin is not None:
            return
        try:
            self._admin = confluent_kafka.admin.AdminClient(dict(self._common))
        except confluent_kafka.KafkaException as exc:
            raise ConfigError(
                "invalid kafka sink client settings", sink=self.description, **_error_context(exc)
            ) from exc

    def close(self) -> None:
        if self._producer is not None:
            if self._transaction is not None:
                self._abort_quietly()
            self._producer.flush(_OPERATION_TIMEOUT_S)
            self._producer = None
        if self._jobs_producer is not None:
            self._jobs_producer.flush(_OPERATION_TIMEOUT_S)
            self._jobs_producer = None
        for client in self._group_clients.values():
            with contextlib.suppress(confluent_kafka.KafkaException, RuntimeError):
                client.close()
        self._group_clients.clear()
        self._admin = None

    @property
    def _admin_client(self) -> Any:
        if self._admin is None:
            raise SinkError("sink is not open", sink=self.description)
        return self._admin

    def _topic_names(self) -> set[str]:
        try:
            metadata = self._admin_client.list_topics(timeout=_OPERATION_TIMEOUT_S)
        except confluent_kafka.KafkaException as exc:
            raise SinkError(
                "cannot reach the Kafka cluster", sink=self.description, **_error_context(exc)
            ) from exc
        return set(metadata.topics)

    # -- the producer ----------------------------------------------------------------------

    def _ensure_producer(self, group: str) -> Any:
        if self._group is None:
            self._group = group
        if self._producer is not None:
            return self._producer
        transactional_id = self._settings.transactional_id
        if transactional_id is None:
            # Bound: one member of a live group, a random id (the generation fences zombies).
            # Unbound (a replay job): the job's own stable id, so a second run fences the first.
            transactional_id = (
                f"offsetkeeper-{group}-{uuid.uuid4().hex[:12]}"
                if self._group_metadata is not None
                else f"offsetkeeper-{group}"
            )
        config = {
            **self._common,
            "transactional.id": transactional_id,
            "transaction.timeout.ms": self._settings.transaction_timeout_ms,
            "enable.idempotence": True,
            "acks": "all",
        }
        try:
            producer = confluent_kafka.Producer(config)
        except confluent_kafka.KafkaException as exc:
            raise ConfigError(
                "invalid kafka sink client settings", sink=self.description, **_error_context(exc)
            ) from exc
        try:
            producer.init_transactions(_OPERATION_TIMEOUT_S)
        except confluent_kafka.KafkaException as exc:
            raise SinkError(
                "cannot initialise the transactional producer",
                sink=self.description,
                transactional_id=transactional_id,
                **_error_context(exc),
            ) from exc
        self._producer = producer
        self._transactional_id = transactional_id
        log.info("kafka_sink_producer_ready", transactional_id=transactional_id, group=group)
        return producer

    @property
    def _stable_transactional_id(self) -> bool:
        return self._settings.transactional_id is not None or self._group_metadata is None

    # -- assignment ------------------------------------------------------------------------

    def acquire(
        self, group: str, partitions: Iterable[TopicPartition]
    ) -> dict[TopicPartition, int]:
        wanted = list(partitions)
        self._ensure_producer(group)
        stored = self.load_checkpoints(group, wanted)
        return {tp: (stored[tp].epoch + 1 if tp in stored else 1) for tp in wanted}

    def load_checkpoints(
        self, group: str, partitions: Iterable[TopicPartition] | None = None
    ) -> dict[TopicPartition, Checkpoint]:
        """Committed offsets of `group`. For named partitions the read is stable: an offset in
        a transaction still open (a predecessor killed mid-commit) is waited for until that
        transaction commits or the broker aborts it at its timeout."""
        wanted = None if partitions is None else list(partitions)
        if wanted is not None and not wanted:
            return {}
        request = confluent_kafka.ConsumerGroupTopicPartitions(
            group,
            None
            if wanted is None
            else [confluent_kafka.TopicPartition(tp.topic, tp.partition) for tp in wanted],
        )
        # The broker aborts a timed-out transaction within its cleanup interval (10 s).
        deadline = time.monotonic() + self._timeout_s + 20.0
        while True:
            answers = self._list_offsets(request, require_stable=wanted is not None)
            unstable = [
                answer
                for answer in answers
                if answer.error is not None
                and answer.error.code() == confluent_kafka.KafkaError.UNSTABLE_OFFSET_COMMIT
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

    def _list_offsets(self, request: Any, *, require_stable: bool) -> list[Any]:
        try:
            future = self._admin_client.list_consumer_group_offsets(
                [request], require_stable=require_stable, request_timeout=_OPERATION_TIMEOUT_S
            )[request.group_id]
            return list(future.result().topic_partitions or [])
        except confluent_kafka.KafkaException as exc:
            raise SinkError(
                "cannot read the group's committed offsets",
                group=request.group_id,
                **_error_context(exc),
            ) from exc

    # -- the batch -------------------------------------------------------------------------

    def begin(self) -> None:
        if self._group is None:
            raise SinkError(
                "begin() before acquire(): no group to commit for", sink=self.description
            )
        producer = self._ensure_producer(self._group)
        try:
            producer.begin_transaction()
        except confluent_kafka.KafkaException as exc:
            self._fail(exc, "cannot begin a Kafka transaction", partitions=[])
        self._transaction = _Transaction()

    def write_rows(
        self, table: Table, rows: Sequence[Mapping[str, Any]], origin: RowsOrigin | None = None
    ) -> None:
        producer = self._open_transaction("write_rows")
        headers = [(TABLE_HEADER, table.name.encode())]
        topic = self._settings.topic
        try:
            for row in rows:
                key, value = encode_row(table, row)
                while True:
                    try:
                        producer.produce(topic, value=value, key=key, headers=headers)
                        break
                    except BufferError:
                        producer.poll(0.1)  # the local queue is full: let deliveries drain
                producer.poll(0)
        except confluent_kafka.KafkaException as exc:
            self._fail(exc, "cannot produce output rows", partitions=[], table=table.name)

    def save_checkpoints(
        self,
        group: str,
        checkpoints: Sequence[Checkpoint],
        epochs: Mapping[TopicPartition, int],
    ) -> None:
        producer = self._open_transaction("save_checkpoints")
        transaction = self._transaction
        if transaction is None or not checkpoints:
            return
        offsets = [_committed_offset(cp, sink_topic=self._settings.topic) for cp in checkpoints]
        transaction.partitions = sorted({(cp.topic, cp.partition) for cp in checkpoints})
        group_metadata = self._metadata_for(group)
        transaction.sent_as = parse_group_metadata(group_metadata)
        if self._group_metadata is not None and (
            transaction.sent_as is None or not transaction.sent_as.is_member
        ):
            # A member-less commit would be accepted even for a live group: a consumer that was
            # evicted (librdkafka reset its membership) must not commit anything.
            log.warning(
                "kafka_commit_fenced",
                reason="not a member of the group",
                generation=None if transaction.sent_as is None else transaction.sent_as.generation,
                partitions=transaction.partitions,
            )
            raise FencedError(
                "this consumer is not a member of the group; its partitions are gone",
                partitions=transaction.partitions,
                group=group,
            )
        try:
            producer.send_offsets_to_transaction(offsets, group_metadata, _OPERATION_TIMEOUT_S)
        except confluent_kafka.KafkaException as exc:
            self._fail(exc, "cannot add the offsets to the transaction", transaction.partitions)

    def commit(self) -> None:
        producer = self._open_transaction("commit")
        partitions = self._transaction.partitions if self._transaction is not None else []
        deadline = time.monotonic() + _OPERATION_TIMEOUT_S
        while True:
            try:
                producer.commit_transaction(_OPERATION_TIMEOUT_S)
                break
            except confluent_kafka.KafkaException as exc:
                error = _kafka_error(exc)
                if (
                    error is not None
                    and classify(error) is TransactionFailure.RETRIABLE
                    and time.monotonic() < deadline
                ):
                    continue  # librdkafka: a retriable commit failure may be retried as it is
                self._fail(exc, "commit failed; batch rolled back", partitions)
        self._transaction = None

    def rollback(self) -> None:
        if self._transaction is not None:
            self._abort_quietly()

    def _open_transaction(self, what: str) -> Any:
        if self._producer is None or self._transaction is None:
            raise SinkError(f"{what} outside a transaction", sink=self.description)
        return self._producer

    def _metadata_for(self, group: str) -> object:
        if self._group_metadata is not None:
            return self._group_metadata()
        return self._memberless_group_metadata(group)

    def _memberless_group_metadata(self, group: str) -> object:
        """Metadata of a group this process never joins (replay jobs, migrations): the
        coordinator takes a transaction's offsets for it with no generation check."""
        client = self._group_clients.get(group)
        if client is None:
            try:
                client = confluent_kafka.Consumer(
                    {**self._common, "group.id": group, "enable.auto.commit": False}
                )
            except confluent_kafka.KafkaException as exc:
                raise ConfigError(
                    "invalid kafka sink client settings",
                    sink=self.description,
                    **_error_context(exc),
                ) from exc
            self._group_clients[group] = client
        return client.consumer_group_metadata()

    def _abort_quietly(self) -> None:
        producer, self._transaction = self._producer, None
        if producer is None:
            return
        try:
            producer.abort_transaction(_OPERATION_TIMEOUT_S)
        except confluent_kafka.KafkaException as exc:
            error = _kafka_error(exc)
            if error is not None and error.code() == confluent_kafka.KafkaError._STATE:
                return  # no transaction in progress: nothing to abort
            # The broker aborts it at its timeout; a producer that cannot abort is made anew.
            log.warning("kafka_abort_failed", **_error_context(exc))
            self._producer = None

    def _fail(
        self,
        exc: BaseException,
        message: str,
        partitions: Sequence[tuple[str, int]],
        **context: Any,
    ) -> None:
        """Abort what can be aborted and raise the error the engine acts on (class docstring)."""
        error = _kafka_error(exc)
        failure = TransactionFailure.ABORTABLE if error is None else classify(error)
        details = {**_error_context(exc), **context, "group": self._group}
        if failure in (TransactionFailure.FATAL, TransactionFailure.PRODUCER_FENCED):
            self._transaction = None
            self._producer = None  # unusable: the next batch makes (and inits) a new one
        else:
            self._abort_quietly()
        fenced_member = failure is TransactionFailure.MEMBER_FENCED
        fenced_producer = (
            failure is TransactionFailure.PRODUCER_FENCED and self._stable_transactional_id
        )
        if (fenced_member or fenced_producer) and partitions:
            log.warning(
                "kafka_commit_fenced", failure=failure.value, partitions=partitions, **details
            )
            raise FencedError(
                "the group or a newer producer fenced this commit; batch aborted",
                partitions=partitions,
                transactional_id=self._transactional_id,
                **details,
            ) from exc
        if (
            failure is TransactionFailure.GENERATION_MOVED
            and self._transaction_member_left()
            and partitions
        ):
            raise FencedError(
                "this consumer left the group while committing; batch aborted",
                partitions=partitions,
                **details,
            ) from exc
        raise SinkError(message, failure=failure.value, sink=self.description, **details) from exc

    def _transaction_member_left(self) -> bool:
        """After ILLEGAL_GENERATION: True when the member id we committed as is no longer ours
        (then the partitions are gone, not merely in a new generation)."""
        if self._group_metadata is None:
            return False
        now = parse_group_metadata(self._group_metadata())
        return now is None or not now.is_member

    # -- tooling: groups, migration, replay jobs -------------------------------------------

    def checkpoint_groups(self) -> list[str]:
        """Groups whose committed offsets carry this sink's checkpoints (scans every group)."""
        try:
            listed = self._admin_client.list_consumer_groups(
                request_timeout=_OPERATION_TIMEOUT_S
            ).result()
        except confluent_kafka.KafkaException as exc:
            raise SinkError(
                "cannot list consumer groups", sink=self.description, **_error_context(exc)
            ) from exc
        groups = []
        for listing in listed.valid:
            request = confluent_kafka.ConsumerGroupTopicPartitions(listing.group_id)
            answers = self._list_offsets(request, require_stable=False)
            if any(
                (document := _own_metadata(answer.metadata)) is not None
                and document.get("sink") == self._settings.topic
                for answer in answers
            ):
                groups.append(listing.group_id)
        return sorted(groups)

    def migrate_checkpoints(self, *, dry_run: bool = False) -> list[Checkpoint]:
        """Offsets without offsetkeeper metadata in this sink's groups, rewritten with it. A
        Kafka group cannot be locked: the rewrite needs the group to have no members."""
        older = [
            checkpoint
            for group in self.checkpoint_groups()
            for checkpoint in self.load_checkpoints(group).values()
            if (checkpoint.read_from_format or CURRENT_FORMAT_VERSION) < CURRENT_FORMAT_VERSION
        ]
        if dry_run or not older:
            return older
        by_group: dict[str, list[Checkpoint]] = {}
        for checkpoint in older:
            by_group.setdefault(checkpoint.group, []).append(checkpoint)
        for group, checkpoints in by_group.items():
            self._require_empty_group(group)
            self._ensure_producer(group)
            self.begin()
            try:
                self.save_checkpoints(group, checkpoints, {})
                self.commit()
            except BaseException:
                self.rollback()
                raise
        return older

    def _require_empty_group(self, group: str) -> None:
        try:
            description = self._admin_client.describe_consumer_groups(
                [group], request_timeout=_OPERATION_TIMEOUT_S
            )[group].result()
        except confluent_kafka.KafkaException as exc:
            raise SinkError(
                "cannot describe consumer group", group=group, **_error_context(exc)
            ) from exc
        if description.members:
            raise ConfigError(
                "stop the group's consumers before migrating its checkpoints in Kafka",
                group=group,
                members=len(description.members),
            )

    def create_job(self, job_id: str, document: str) -> str:
        stored = self.load_job(job_id)
        if stored is not None:
            return stored
        if self.jobs_topic not in self._topic_names():
            self._create_jobs_topic()
        if self._jobs_producer is None:
            try:
                self._jobs_producer = confluent_kafka.Producer(
                    {**self._common, "enable.idempotence": True, "acks": "all"}
                )
            except confluent_kafka.KafkaException as exc:
                raise ConfigError(
                    "invalid kafka sink client settings",
                    sink=self.description,
                    **_error_context(exc),
                ) from exc
        delivery: list[BaseException] = []

        def delivered(error: Any, _message: Any) -> None:
            if error is not None:
                delivery.append(confluent_kafka.KafkaException(error))

        self._jobs_producer.produce(
            self.jobs_topic, key=job_id.encode(), value=document.encode(), on_delivery=delivered
        )
        if self._jobs_producer.flush(_OPERATION_TIMEOUT_S) or delivery:
            raise SinkError(
                "cannot store replay job",
                job=job_id,
                topic=self.jobs_topic,
                reason=str(delivery[0]) if delivery else "not delivered in time",
            )
        # Two runs may have raced to create it: the first record in the log is the job.
        first = self.load_job(job_id)
        if first is None:
            raise SinkError("replay job not readable after writing it", job=job_id)
        return first

    def _create_jobs_topic(self) -> None:
        # One partition (one order of writes), kept forever and not compacted: the first
        # document of a job id is the job, so a later duplicate must not replace it.
        topic = NewTopic(
            self.jobs_topic,
            num_partitions=1,
            replication_factor=-1,
            config={"cleanup.policy": "delete", "retention.ms": "-1", "retention.bytes": "-1"},
        )
        try:
            self._admin_client.create_topics([topic])[self.jobs_topic].result()
        except confluent_kafka.KafkaException as exc:
            error = _kafka_error(exc)
            if error is None or error.code() != confluent_kafka.KafkaError.TOPIC_ALREADY_EXISTS:
                raise SinkError(
                    "cannot create the replay jobs topic",
                    topic=self.jobs_topic,
                    **_error_context(exc),
                ) from exc

    def load_job(self, job_id: str) -> str | None:
        if self.jobs_topic not in self._topic_names():
            return None
        reader = confluent_kafka.Consumer(
            {
                **self._common,
                "group.id": f"offsetkeeper-jobs-reader-{uuid.uuid4().hex[:8]}",
                "enable.auto.commit": False,
                "enable.auto.offset.store": False,
            }
        )
        wanted = job_id.encode()
        try:
            partition = confluent_kafka.TopicPartition(self.jobs_topic, 0)
            watermarks = reader.get_watermark_offsets(partition, timeout=_OPERATION_TIMEOUT_S)
            high = int(watermarks[1]) if watermarks else 0
            if high <= 0:
                return None
            reader.assign(
                [
                    confluent_kafka.TopicPartition(
                        self.jobs_topic, 0, confluent_kafka.OFFSET_BEGINNING
                    )
                ]
            )
            deadline = time.monotonic() + _OPERATION_TIMEOUT_S
            while time.monotonic() < deadline:
                for message in reader.consume(num_messages=500, timeout=1.0):
                    if message.error() is not None:
                        continue
                    if message.key() == wanted:
                        return bytes(message.value() or b"").decode()
                    if (message.offset() or 0) >= high - 1:
                        return None
            raise SinkError("cannot read the replay jobs topic to its end", topic=self.jobs_topic)
        except confluent_kafka.KafkaException as exc:
            raise SinkError(
                "cannot read replay job", job=job_id, topic=self.jobs_topic, **_error_context(exc)
            ) from exc
        finally:
            reader.close()
