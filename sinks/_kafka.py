"""Transactional Kafka sink: `kafka://HOST:PORT[,HOST:PORT]/TOPIC`.

Each batch is one Kafka transaction: the output rows are produced to TOPIC and the consumed
offsets are added with `send_offsets_to_transaction`, so a `read_committed` reader of TOPIC sees a
batch's outputs exactly when the group's offsets moved past the records that made them.

One transactional producer serves the whole process; its transactional.id is random per process
unless the URL sets a stable one (then a restarted process aborts its predecessor's open
transaction at once). Without bound group metadata (`offsetkeeper replay`), the sink builds the
metadata of the job's group itself (a member-less group) and uses the stable transactional.id
`offsetkeeper-<group>`, so a second run of the same job fences the first.

The parts, one module each: the URL and settings (`_kafka_settings`), rows <-> messages
(`_kafka_messages`), checkpoints <-> committed offsets (`_kafka_offsets`), reading groups and
offsets through the admin client (`_kafka_groups`), group membership (`_kafka_membership`),
what a transactional error means (`_kafka_errors`), replay job plans (`_kafka_jobs`); this
module is the transactional writer.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import confluent_kafka
import confluent_kafka.admin
import structlog

from consumer import (
    CURRENT_FORMAT_VERSION,
    Checkpoint,
    ConfigError,
    FencedError,
    RowsOrigin,
    SinkError,
    Table,
    TopicPartition,
    ValueLimits,
)
from sinks._json_rows import JSON_VALUE_LIMITS
from sinks._kafka_errors import TransactionFailure, classify, error_context, kafka_error
from sinks._kafka_groups import (
    committed_checkpoints,
    groups_with_checkpoints,
    require_empty_group,
    topic_names,
)
from sinks._kafka_jobs import KafkaJobStore
from sinks._kafka_membership import GroupMembership, MemberlessGroups, parse_group_metadata
from sinks._kafka_messages import TABLE_HEADER, encode_row
from sinks._kafka_offsets import committed_offset
from sinks._kafka_producer import transactional_id_for, transactional_producer
from sinks._kafka_settings import OPERATION_TIMEOUT_S, KafkaSinkSettings

log = structlog.get_logger("offsetkeeper.sink.kafka")


@dataclass(slots=True)
class _Transaction:
    """The open transaction: which partitions' offsets it carries, and with which metadata."""

    partitions: list[tuple[str, int]] = field(default_factory=list)
    sent_as: GroupMembership | None = None


class KafkaSink:
    """A topic written in Kafka transactions, over one transactional confluent-kafka Producer.

    Capabilities: `consumer.Sink`, `consumer.LimitedSink`, `consumer.GroupBoundSink`,
    `consumer.CheckpointAdmin`, `consumer.JobStore`.

    Values: messages are strict JSON (`sinks._kafka_messages`), so `value_limits` refuses NaN
    and infinities; a row `write_rows` still cannot write as JSON is a
    `consumer.RowsRefusedError` naming the table and column (the engine aborts the
    transaction and isolates the record).

    Fencing, this sink's own guarantee: it keeps no epochs. There is no lease record to bump
    or compare; the fence is the consumer group's generation (KIP-447). Through
    `GroupBoundSink.bind_group_metadata` the engine hands over the consumer's group metadata,
    which goes with each transaction's offsets; the group coordinator accepts them only from
    the member of the current generation, so a zombie (a member evicted during a GC pause or a
    network split) cannot commit, and for a stable transactional.id the broker also refuses
    the older producer epoch. `acquire` therefore takes no ownership: it returns, per
    partition, the epoch found in the stored checkpoint's metadata plus one (1 when there is
    none), which the engine writes into the next checkpoints for the logs and
    `checkpoint show`. The `epochs` that `save_checkpoints` receives are compared with nothing
    and `consumer.check_epochs` is not called: the generation moves on at every rebalance by
    itself, and the coordinator checks it at the commit, where it counts.

    Lifecycle: `open` checks that TOPIC exists (it is never created: its partition count and
    replication are the operator's choice). The producer is made (`init_transactions`) on the
    first `acquire`, when the group is known. `begin` -> begin_transaction, `write_rows` -> one
    message per row, `save_checkpoints` -> send_offsets_to_transaction, `commit` ->
    commit_transaction, `rollback` -> abort_transaction.

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
        self._memberless = MemberlessGroups(self._common, sink=settings.description)
        self._jobs = KafkaJobStore(self._common, settings.jobs_topic_name, sink=self.description)
        self._timeout_s = settings.transaction_timeout_ms / 1000

    @property
    def description(self) -> str:
        return self._settings.description

    @property
    def jobs_topic(self) -> str:
        return self._settings.jobs_topic_name

    @property
    def value_limits(self) -> ValueLimits:
        return JSON_VALUE_LIMITS

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
        if self._settings.topic not in topic_names(self._admin_client, sink=self.description):
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
                "invalid kafka sink client settings", sink=self.description, **error_context(exc)
            ) from exc

    def close(self) -> None:
        if self._producer is not None:
            if self._transaction is not None:
                self._abort_quietly()
            self._producer.flush(OPERATION_TIMEOUT_S)
            self._producer = None
        self._jobs.close()
        self._memberless.close()
        self._admin = None

    @property
    def _admin_client(self) -> Any:
        if self._admin is None:
            raise SinkError("sink is not open", sink=self.description)
        return self._admin

    # -- the producer ----------------------------------------------------------------------

    def _ensure_producer(self, group: str) -> Any:
        if self._group is None:
            self._group = group
        if self._producer is not None:
            return self._producer
        transactional_id = transactional_id_for(
            self._settings, group, bound=self._group_metadata is not None
        )
        producer = transactional_producer(
            self._common, self._settings, transactional_id, sink=self.description
        )
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
        """No ownership is taken here (see the class docstring): the epochs returned count
        takeovers for the logs; the group generation is the fence."""
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
        # The broker aborts a timed-out transaction within its cleanup interval (10 s).
        return committed_checkpoints(
            self._admin_client, group, wanted, wait_s=self._timeout_s + 20.0
        )

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
        """Add the offsets to the transaction with the group metadata; `epochs` is compared
        with nothing (the generation is the fence: see the class docstring)."""
        producer = self._open_transaction("save_checkpoints")
        transaction = self._transaction
        if transaction is None or not checkpoints:
            return
        offsets = [committed_offset(cp, sink_topic=self._settings.topic) for cp in checkpoints]
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
            producer.send_offsets_to_transaction(offsets, group_metadata, OPERATION_TIMEOUT_S)
        except confluent_kafka.KafkaException as exc:
            self._fail(exc, "cannot add the offsets to the transaction", transaction.partitions)

    def commit(self) -> None:
        producer = self._open_transaction("commit")
        partitions = self._transaction.partitions if self._transaction is not None else []
        deadline = time.monotonic() + OPERATION_TIMEOUT_S
        while True:
            try:
                producer.commit_transaction(OPERATION_TIMEOUT_S)
                break
            except confluent_kafka.KafkaException as exc:
                error = kafka_error(exc)
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
        return self._memberless.metadata(group)

    def _abort_quietly(self) -> None:
        producer, self._transaction = self._producer, None
        if producer is None:
            return
        try:
            producer.abort_transaction(OPERATION_TIMEOUT_S)
        except confluent_kafka.KafkaException as exc:
            error = kafka_error(exc)
            if error is not None and error.code() == confluent_kafka.KafkaError._STATE:
                return  # no transaction in progress: nothing to abort
            # The broker aborts it at its timeout; a producer that cannot abort is made anew.
            log.warning("kafka_abort_failed", **error_context(exc))
            self._producer = None

    def _fail(
        self,
        exc: BaseException,
        message: str,
        partitions: Sequence[tuple[str, int]],
        **context: Any,
    ) -> None:
        """Abort what can be aborted and raise the error the engine acts on (class docstring)."""
        error = kafka_error(exc)
        failure = TransactionFailure.ABORTABLE if error is None else classify(error)
        details = {**error_context(exc), **context, "group": self._group}
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
        return groups_with_checkpoints(
            self._admin_client, sink_topic=self._settings.topic, sink=self.description
        )

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
            require_empty_group(self._admin_client, group)
            self._ensure_producer(group)
            self.begin()
            try:
                self.save_checkpoints(group, checkpoints, {})
                self.commit()
            except BaseException:
                self.rollback()
                raise
        return older

    def create_job(self, job_id: str, document: str) -> str:
        return self._jobs.create_job(self._admin_client, job_id, document)

    def load_job(self, job_id: str) -> str | None:
        return self._jobs.load_job(self._admin_client, job_id)
