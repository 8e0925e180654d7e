"""Records lost to retention are never skipped silently.

A partition's next offset is compared with its log whenever the engine (re)positions it: at
assignment, at the start of a planned run, and when the client reports a fetch outside the log.
Below the log start, the records in between were deleted before they were read; beyond the log
end, the topic was probably deleted and recreated. `DataLossPolicy` decides:

- "stop" (the default): the partition stops there, like a bad record (exit code 2), with an
  error naming the topic, partition, checkpoint, log start and how many records are gone;
- "skip": the partition goes on from the log start, and the loss is a structured
  `records_lost` event and the `offsetkeeper_records_lost_total` metric.
"""

from __future__ import annotations

from typing import Literal

import structlog

from consumer.core.errors import RecordsLostError
from consumer.core.records import TopicPartition
from consumer.engine.observer import EngineObserver

log = structlog.get_logger("offsetkeeper.engine")

DataLossPolicy = Literal["stop", "skip"]


def lost_records(
    tp: TopicPartition, next_offset: int, log_start: int, log_end: int
) -> RecordsLostError | None:
    """The loss, if `next_offset` is outside the log [log_start, log_end]; None if it fits."""
    if next_offset < log_start:
        return RecordsLostError(
            "records were deleted by retention before they were read",
            topic=tp.topic,
            partition=tp.partition,
            offset=next_offset,
            log_start=log_start,
            log_end=log_end,
            lost=log_start - next_offset,
        )
    if next_offset > log_end:
        return RecordsLostError(
            "the checkpoint is beyond the log end: the topic was probably deleted and recreated",
            topic=tp.topic,
            partition=tp.partition,
            offset=next_offset,
            log_start=log_start,
            log_end=log_end,
            lost=None,
        )
    return None


def skip_loss(loss: RecordsLostError, observer: EngineObserver, *, group: str) -> int:
    """Under "skip": report the loss (event and metric) and return where to go on."""
    tp = TopicPartition(loss.topic or "", loss.partition or 0)
    log.error(
        "records_lost",
        group=group,
        topic=tp.topic,
        partition=tp.partition,
        checkpoint=loss.offset,
        log_start=loss.log_start,
        log_end=loss.log_end,
        lost=loss.lost,
        reason=loss.message,
        action="skipped to the log start",
    )
    observer.records_lost(tp, loss.lost or 0)
    return loss.log_start
