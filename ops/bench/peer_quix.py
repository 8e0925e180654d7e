"""Contender "peer": Quix Streams consuming the topic into the same PostgreSQL table with its own
PostgreSQL sink (quixstreams.sinks.community.postgresql). Runs in ops/bench/.venv-peer.

Settings: Quix's defaults (commit every 5 s, its own JSON deserializer, at-least-once) except
what the workload needs: upsert on the `id` primary key, no metadata columns, and the table
created up front with the same DDL as every other contender (so no schema auto-update).
Timing is read at the sink: the first record added, and the end of each flush (Quix flushes
the sink, then commits the offsets to Kafka, at every checkpoint).

    peer_quix.py --encoding json --dsn DSN --bootstrap B --group G --topic T --records N
                 --result FILE [--latency]
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Any
from urllib.parse import urlsplit

import psycopg2
import workload
from quixstreams import Application
from quixstreams.models.serializers import Deserializer
from quixstreams.sinks.community.postgresql import PostgreSQLSink
from timing import RunClock


class ConfluentAvroDeserializer(Deserializer):
    """Confluent wire format (magic byte, schema id) + Avro binary; schema parsed once."""

    def __call__(self, value: bytes, ctx: Any) -> Any:
        return workload.decode_avro(value)


class TimedPostgreSQLSink(PostgreSQLSink):
    def __init__(self, clock: RunClock, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._clock = clock
        self._started = False

    def add(  # noqa: PLR0917 - the signature of Quix's BatchingSink.add
        self,
        value: Any,
        key: Any,
        timestamp: int,
        headers: Any,
        topic: str,
        partition: int,
        offset: int,
    ) -> None:
        if not self._started:
            self._started = True
            self._clock.fetched(1)
        super().add(value, key, timestamp, headers, topic, partition, offset)

    def flush(self) -> None:
        records = sum(batch.size for batch in self._batches.values())
        stamps = None
        if self._clock.latency:
            stamps = [item.value["ts_ms"] for batch in self._batches.values() for item in batch]
        super().flush()
        if records:
            self._clock.committed(records, stamps)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--encoding", choices=["json", "avro"], required=True)
    parser.add_argument("--dsn", required=True)
    parser.add_argument("--bootstrap", required=True)
    parser.add_argument("--group", required=True)
    parser.add_argument("--topic", required=True)
    parser.add_argument("--records", type=int, required=True)
    parser.add_argument("--result", required=True)
    parser.add_argument("--latency", action="store_true")
    parser.add_argument("--state-dir", default="state", help="Quix's local state directory")
    args = parser.parse_args(argv)

    dsn = urlsplit(args.dsn)
    with psycopg2.connect(args.dsn) as db, db.cursor() as cursor:
        cursor.execute(workload.PG_DDL)
    clock = RunClock(latency=args.latency)
    sink = TimedPostgreSQLSink(
        clock,
        host=dsn.hostname,
        port=dsn.port,
        dbname=dsn.path.lstrip("/"),
        user=dsn.username,
        password=dsn.password,
        table_name=workload.TABLE,
        schema_auto_update=False,
        primary_key_columns=workload.KEY_COLUMN,
        upsert_on_primary_key=True,
        include_metadata=False,
    )
    app = Application(
        broker_address=args.bootstrap,
        consumer_group=args.group,
        auto_offset_reset="earliest",
        loglevel="WARNING",
        auto_create_topics=False,
        state_dir=args.state_dir,
    )
    deserializer = "json" if args.encoding == "json" else ConfluentAvroDeserializer()
    topic = app.topic(args.topic, value_deserializer=deserializer, key_deserializer="str")
    app.dataframe(topic).sink(sink)
    app.run(count=args.records, collect=False)
    clock.extra["peer"] = "quixstreams"
    clock.write(args.result)
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING)
    sys.exit(main())
