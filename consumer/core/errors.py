"""The exception tree. Every error offsetkeeper raises derives from `OffsetkeeperError`.

    OffsetkeeperError
     +-- ConfigError                 bad settings, unknown app, unparsable sink URL
     +-- KafkaError                  the broker or client failed (backend errors are mapped here)
     +-- SchemaRegistryError         the schema registry is unreachable, slow or failing (retried)
     +-- SinkError                   the sink failed to open, write or commit
     |    +-- FencedError            a newer owner took the partition; this consumer must drop it
     |    +-- RowsRefusedError       the sink refused values of the batch (not retried: split)
     |    +-- SinkFullError          no space left on the sink's disk (retried until there is)
     +-- CheckpointError             a stored checkpoint cannot be read
     |    +-- CheckpointFormatError  its format is newer than this code knows
     +-- RecordError                 one record cannot be decoded or processed
          +-- DecodeError            its bytes are not what the app declared
          +-- InvalidRecordError     it decoded, but a field is missing or wrong
          +-- RecordsLostError       records at the checkpoint are gone from the log (retention)

Errors carry what they are about (topic, partition, offset, field) as keyword context, so that
both the message and structured logs name the exact record.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any


class OffsetkeeperError(Exception):
    """Root of every error offsetkeeper raises."""

    def __init__(self, message: str, **context: Any) -> None:
        self.message = message
        self.context: dict[str, Any] = {k: v for k, v in context.items() if v is not None}
        super().__init__(message)

    def __str__(self) -> str:
        if not self.context:
            return self.message
        details = ", ".join(f"{key}={value!r}" for key, value in self.context.items())
        return f"{self.message} ({details})"


class ConfigError(OffsetkeeperError):
    """Settings, the app reference or the sink URL are invalid."""


class KafkaError(OffsetkeeperError):
    """The Kafka client or broker failed. `retriable` says whether trying again may help."""

    def __init__(self, message: str, *, retriable: bool = False, **context: Any) -> None:
        super().__init__(message, **context)
        self.retriable = retriable


class SchemaRegistryError(OffsetkeeperError):
    """The schema registry could not be asked: unreachable, timed out, or answered 5xx.

    Not a bad record: the same record decodes once the registry is back, so the engine retries
    instead of dead-lettering. (A 404 for an unknown schema id is a `DecodeError`.)
    """


class SinkError(OffsetkeeperError):
    """The sink failed to open, write, or commit. The transaction was rolled back."""


class RowsRefusedError(SinkError):
    """The sink refused the batch's rows for a data reason (a value it cannot store, a violated
    constraint), so retrying the same batch cannot help. The transaction was rolled back; the
    engine finds the records responsible by splitting the batch, and the bad-record policy
    handles them. `field` names the column, where the sink said which."""


class SinkFullError(SinkError):
    """The sink's storage has no space left: ENOSPC or EDQUOT from its file system, SQLite's
    SQLITE_FULL. Transient, like any `SinkError`: the batch was rolled back, nothing of it is
    visible, and the engine retries it until space returns or `sink_retry_deadline_s` passes.
    Its message starts with "disk full"; `sink` names where the sink writes."""


class FencedError(SinkError):
    """The partitions were taken over by a newer owner: their epoch in the sink moved on.

    The commit was rolled back; the consumer must stop processing these partitions.
    """

    def __init__(self, message: str, *, partitions: Iterable[tuple[str, int]], **context: Any):
        self.partitions: frozenset[tuple[str, int]] = frozenset(partitions)
        super().__init__(message, partitions=sorted(self.partitions), **context)


class CheckpointError(OffsetkeeperError):
    """A stored checkpoint cannot be read or is inconsistent."""


class CheckpointFormatError(CheckpointError):
    """A checkpoint's format version is unknown to this code (newer than it, or never released)."""


class RecordError(OffsetkeeperError):
    """One record cannot be handled. Always names topic, partition and offset."""

    def __init__(
        self,
        message: str,
        *,
        topic: str | None = None,
        partition: int | None = None,
        offset: int | None = None,
        field: str | None = None,
        **context: Any,
    ) -> None:
        self.topic = topic
        self.partition = partition
        self.offset = offset
        self.field = field
        super().__init__(
            message, topic=topic, partition=partition, offset=offset, field=field, **context
        )

    def located(self, *, topic: str, partition: int, offset: int) -> RecordError:
        """Return a copy of this error that names the record it is about."""
        context = {k: v for k, v in self.context.items() if k not in _LOCATION_KEYS}
        located = type(self).__new__(type(self))
        RecordError.__init__(
            located,
            self.message,
            topic=topic,
            partition=partition,
            offset=offset,
            field=self.field,
            **context,
        )
        located.__cause__ = self.__cause__
        return located


_LOCATION_KEYS = frozenset({"topic", "partition", "offset", "field"})


class DecodeError(RecordError):
    """A record's bytes do not decode as the app declared (bad JSON, wrong Avro, ...)."""


class InvalidRecordError(RecordError):
    """A record decoded, but a field is missing or has the wrong type. Raise it from processors."""


class RecordsLostError(RecordError):
    """Records a partition's checkpoint points at are gone from the log: deleted by retention
    before they were read (`lost` of them, from `offset` = the checkpoint up to `log_start`),
    or the checkpoint is beyond the log's end (the topic was deleted and recreated; `lost` is
    unknown). By default the partition stops here; it is never skipped silently."""

    def __init__(
        self,
        message: str,
        *,
        topic: str,
        partition: int,
        offset: int,
        log_start: int,
        log_end: int,
        lost: int | None,
        **context: Any,
    ) -> None:
        self.log_start = log_start
        self.log_end = log_end
        self.lost = lost
        super().__init__(
            message,
            topic=topic,
            partition=partition,
            offset=offset,
            log_start=log_start,
            log_end=log_end,
            lost=lost,
            **context,
        )
