"""A stateful test app for the Kafka sink that is NOT idempotent: a count and a sum per key.

Events are the chaos events (tests/fixtures/chaos.py), JSON {"key": str, "version": int}. Each
record adds 1 to its key's count and its version to the key's sum in the keyed state, and
writes the key's new totals as a `kafka_state_chaos` row, with the record's coordinates and the
writing process (`writer`, "<pid>-<random>"): every committed row of a key must hold the totals
of the key's records up to its `source_offset`, and the last one the key's totals. A record
applied twice (a zombie's batch, a replayed batch on top of its own state), or a state change
lost or kept from an aborted batch, shows as a count or sum off from the input's, and the row
names the record and the member that wrote it.

Test hooks (env), each a zombie in the middle of its batch (stopped once):
    CHAOS_SELF_STOP_AT="PARTITION:OFFSET"  SIGSTOP while processing that record: before the
        batch's transaction begins
    CHAOS_SELF_STOP_IN_TRANSACTION="N"     SIGSTOP in the Nth batch with state changes, once its
        rows and state changes are produced (and flushed to the log) in the open transaction,
        before its offsets are added and it commits (the Kafka sink only)
"""

from __future__ import annotations

import os
import signal
import uuid
from typing import Any

from consumer import App, InvalidRecordError, KeyedState, Record, Row, StateSchema, Table
from tests.apps.kafka_state_totals import key_of

WRITER = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"

TOTALS = Table(
    name="kafka_state_chaos",
    columns={
        "event_key": "text",
        "count": "bigint",
        "sum": "bigint",
        "source_partition": "integer",
        "source_offset": "bigint",
        "writer": "text",
    },
    key=("event_key",),
)


app = App(
    name="kafka_state_chaos",
    tables=(TOTALS,),
    decode="json",
    state=StateSchema(version=1),
    state_key=key_of,
)

_stop_at = os.environ.get("CHAOS_SELF_STOP_AT")
_STOP_AT = tuple(int(part) for part in _stop_at.split(":")) if _stop_at else None
_stopped_once: list[bool] = []


def _stop_in_transaction(batch: int) -> None:
    """Wrap the Kafka sink's write_state so the process stops itself after the `batch`th call."""
    from sinks._kafka import KafkaSink  # noqa: PLC0415 - only when the hook is asked for

    write_state = KafkaSink.write_state
    calls: list[int] = []

    def stopping_write_state(self: Any, group: str, changes: Any) -> None:
        write_state(self, group, changes)
        calls.append(1)
        if len(calls) == batch:
            self._producer.flush(30)  # the open transaction's records are in the log
            os.kill(os.getpid(), signal.SIGSTOP)

    KafkaSink.write_state = stopping_write_state  # type: ignore[method-assign]


if os.environ.get("CHAOS_SELF_STOP_IN_TRANSACTION"):
    _stop_in_transaction(int(os.environ["CHAOS_SELF_STOP_IN_TRANSACTION"]))


@app.process
def count_and_sum(record: Record, totals: KeyedState) -> Row:
    event: Any = record.value
    if not isinstance(event, dict) or not isinstance(event.get("key"), str):
        raise InvalidRecordError("chaos event needs a key", field="key")
    version = event.get("version")
    if not isinstance(version, int) or isinstance(version, bool):
        raise InvalidRecordError("chaos event needs an integer version", field="version")
    if (record.partition, record.offset) == _STOP_AT and not _stopped_once:
        _stopped_once.append(True)
        os.kill(os.getpid(), signal.SIGSTOP)  # a zombie in the middle of its batch
    key = event["key"]
    entry = totals.get(key) or {"count": 0, "sum": 0}
    entry = {"count": entry["count"] + 1, "sum": entry["sum"] + version}
    totals[key] = entry
    return Row(
        "kafka_state_chaos",
        {
            "event_key": key,
            **entry,
            "source_partition": record.partition,
            "source_offset": record.offset,
            "writer": WRITER,
        },
    )
