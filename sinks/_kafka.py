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
offsets through the admin client (`_kafka_groups`, committed offsets in a child process:
`_kafka_offset_reader`), group membership (`_kafka_membership`),
what a transactional error means (`_kafka_errors`), replay job plans (`_kafka_jobs`), keyed
state in compacted changelog topics (`_kafka_state`); this module is the transactional writer.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import confluent_kafka
import confluent_kafka.admin
import structlog

from consumer import (
    CURRENT_FORMAT_VERSION,
    Checkpoint,
    ConfigError,
    RowsOrigin,
    SinkError,
    StateChange,
    StateEntry,
    Table,
    TopicPartition,
    ValueLimits,
)
from sinks._json_rows import JSON_VALUE_LIMITS
from sinks._kafka_errors import (
    TransactionFailure,
    batch_error,
    classify,
    error_context,
    failure_of,
    kafka_error,
)
from sinks._kafka_groups import (
    committed_checkpoints,
    groups_with_checkpoints,
    require_empty_group,
    topic_names,
)
from sinks._kafka_jobs import KafkaJobStore
from sinks._kafka_membership import (
    GroupMembership,
    MemberlessGroups,
    is_member,
    parse_group_metadata,
    require_member,
)
from sinks._kafka_messages import TABLE_HEADER, encode_row
from sinks._kafka_offset_reader import IsolatedOffsetReader
from sinks._kafka_offsets import committed_offset
from sinks._kafka_producer import produce, transactional_id_for, transactional_producer
from sinks._kafka_settings import OPERATION_TIMEOUT_S, KafkaSinkSettings
from sinks._kafka_state import KafkaStateStore

log = structlog.get_logger("offsetkeeper.sink.kafka")


@dataclass(slots=True)
class _Transaction:
    """The open transaction: which partitions' offsets it carries, with which metadata, and
    the state changes it wrote (applied to the sink's copies only once it commits)."""

    partitions: list[tuple[str, int]] = field(default_factory=list)
    sent_as: GroupMembership | None = None
    state: list[tuple[str, Sequence[StateChange]]] = field(default_factory=list)

    def state_partitions(self) -> set[tuple[str, int]]:
        return {
            (change.partition.topic, change.partition.partition)
            for _, changes in self.state
            for change in changes
        }


class KafkaSink:
    """A topic written in Kafka transactions, over one transactional confluent-kafka Producer.

    Capabilities: `consumer.Sink`, `consumer.LimitedSink`, `consumer.GroupBoundSink`,
    `consumer.CheckpointAdmin`, `consumer.JobStore`, `consumer.StateStore`.

    Keyed state (`sinks._kafka_state`), as Kafka Streams keeps it: one compacted changelog
    topic per (group, source topic), partition p holding source partition p's entries, written
    by `write_state` in the batch's transaction with the rows and the offsets (a fenced or
    aborted batch leaves no state; `commit` refuses state of a partition whose offsets are not
    in the transaction, as only the offsets are fenced). Memory: unlike the SQL sinks (whose
    state is bounded by the engine's cache), this sink holds the WHOLE state of every partition
    it serves in memory: a partition's changelog is read into memory (read_committed, to its
    end) on its first state access after `acquire`, then kept in step with each commit.
    Rebalance: `acquire` drops the copies of the partitions it is given, so a partition taken
    (again) is restored from its changelog, never served from an earlier ownership's copy.

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

    Failures: what each error of a transactional call means, and what the engine then does,
    is in `sinks._kafka_errors`.
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
        self._offset_reader = IsolatedOffsetReader(self._common, sink=self.description)
        self._jobs = KafkaJobStore(self._common, settings.jobs_topic_name, sink=self.description)
        self._timeout_s = settings.transaction_timeout_ms / 1000
        # A restore waits for transactions left open, like load_checkpoints (see there).
        self._state = KafkaStateStore(
            self._common, settings, sink=self.description, wait_s=self._timeout_s + 60.0
        )

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
        self._offset_reader.close()
        self._state.close()
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
        self._state.forget(group, wanted)  # restored again on first access: a new ownership
        stored = self.load_checkpoints(group, wanted)
        return {tp: (stored[tp].epoch + 1 if tp in stored else 1) for tp in wanted}

    def load_checkpoints(
        self, group: str, partitions: Iterable[TopicPartition] | None = None
    ) -> dict[TopicPartition, Checkpoint]:
        """Committed offsets of `group`; stable for named partitions (`committed_checkpoints`)."""
        wanted = None if partitions is None else list(partitions)
        if wanted is not None and not wanted:
            return {}
        # The broker aborts a timed-out transaction within its cleanup interval (10 s).
        wait_s = self._timeout_s + 20.0
        return committed_checkpoints(self._offset_reader, group, wanted, wait_s=wait_s)

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
        try:
            for row in rows:
                key, value = encode_row(table, row)
                produce(producer, self._settings.topic, key, value, headers=headers)
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
        if self._group_metadata is not None:
            require_member(transaction.sent_as, group, transaction.partitions)
        try:
            producer.send_offsets_to_transaction(offsets, group_metadata, OPERATION_TIMEOUT_S)
        except confluent_kafka.KafkaException as exc:
            self._fail(exc, "cannot add the offsets to the transaction", transaction.partitions)

    def commit(self) -> None:
        producer = self._open_transaction("commit")
        transaction = self._transaction or _Transaction()
        self._require_fenced_state(transaction)
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
                # Committed or not, we cannot be sure: the next read restores what is.
                for group, changes in transaction.state:
                    self._state.forget(group, {change.partition for change in changes})
                self._fail(exc, "commit failed; batch rolled back", transaction.partitions)
        self._transaction = None
        for group, changes in transaction.state:
            self._state.apply(group, changes)

    def _require_fenced_state(self, transaction: _Transaction) -> None:
        """Abort unless every partition with state changes has its offsets in the transaction:
        the group generation fences the offsets, and so only what goes with them."""
        unfenced = sorted(transaction.state_partitions() - set(transaction.partitions))
        if unfenced:
            self._abort_quietly()
            raise SinkError(
                "state written for partitions whose offsets are not in the transaction; "
                "batch aborted",
                partitions=unfenced,
                sink=self.description,
            )

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
        if failure_of(exc) in (TransactionFailure.FATAL, TransactionFailure.PRODUCER_FENCED):
            self._transaction = None
            self._producer = None  # unusable: the next batch makes (and inits) a new one
        else:
            self._abort_quietly()
        raise batch_error(
            exc,
            message,
            partitions,
            stable_transactional_id=self._stable_transactional_id,
            transactional_id=self._transactional_id,
            member_left=self._transaction_member_left,
            context={**context, "group": self._group, "sink": self.description},
        ) from exc

    def _transaction_member_left(self) -> bool:
        """After ILLEGAL_GENERATION: whether the member id we committed as is gone."""
        return self._group_metadata is not None and not is_member(self._group_metadata())

    # -- StateStore: keyed state in changelog topics (class docstring) ----------------------

    def read_state(
        self, group: str, partition: TopicPartition, keys: Collection[str]
    ) -> dict[str, StateEntry]:
        return self._state.read(self._admin_client, group, partition, keys)

    def state_sizes(
        self, group: str, partitions: Iterable[TopicPartition] | None = None
    ) -> dict[TopicPartition, tuple[int, int]]:
        """With `partitions` None: every partition with a committed offset of `group` (state
        is only ever committed with one), or with state in memory; each restored if need be."""
        if partitions is None:
            partitions = sorted({*self.load_checkpoints(group), *self._state.loaded(group)})
        return self._state.sizes(self._admin_client, group, partitions)

    def scan_state(self, group: str, partition: TopicPartition) -> Iterator[StateEntry]:
        return self._state.scan(self._admin_client, group, partition)

    def write_state(self, group: str, changes: Sequence[StateChange]) -> None:
        """Produce each change to its changelog partition inside the open transaction."""
        producer = self._open_transaction("write_state")
        try:
            for m in self._state.messages(self._admin_client, group, changes):
                produce(producer, m.topic, m.key, m.value, partition=m.partition)
        except confluent_kafka.KafkaException as exc:
            self._fail(exc, "cannot produce state changes", partitions=[], group_of_state=group)
        if self._transaction is not None:
            self._transaction.state.append((group, list(changes)))

    # -- tooling: groups, migration, replay jobs -------------------------------------------

    def checkpoint_groups(self) -> list[str]:
        """Groups whose committed offsets carry this sink's checkpoints (scans every group)."""
        reader, topic = self._offset_reader, self._settings.topic
        return groups_with_checkpoints(self._admin_client, reader, topic, sink=self.description)

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
