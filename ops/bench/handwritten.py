"""Contender "hand-written": a consumer the way many services are written. Per record, one
`INSERT ... ON CONFLICT DO UPDATE`; per batch, a database COMMIT and then a synchronous Kafka
offset commit (at-least-once). Batches of up to 2000 records, like offsetkeeper's default.

    handwritten.py --encoding json --dsn DSN --bootstrap B --group G --topic T --records N
                   --result FILE [--latency]
"""

from __future__ import annotations

import argparse
import sys

import kafka_consumer
import psycopg
import workload
from timing import RunClock

_COLUMNS = list(workload.COLUMNS)
UPSERT = (
    f"INSERT INTO {workload.TABLE} ({', '.join(_COLUMNS)})"
    f" VALUES ({', '.join('%s' for _ in _COLUMNS)})"
    f" ON CONFLICT ({workload.KEY_COLUMN}) DO UPDATE SET "
    + ", ".join(f"{c} = EXCLUDED.{c}" for c in _COLUMNS if c != workload.KEY_COLUMN)
)


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
    args = parser.parse_args(argv)

    clock = RunClock(latency=args.latency)
    decode = workload.json_loads if args.encoding == "json" else workload.decode_avro
    client = kafka_consumer.consumer(args.bootstrap, args.group)
    db = psycopg.connect(args.dsn)
    try:
        with db.cursor() as cursor:
            cursor.execute(workload.PG_DDL)  # type: ignore[arg-type]
        db.commit()
        for messages in kafka_consumer.batches(
            client, args.topic, args.records, on_fetch=clock.fetched
        ):
            stamps = []
            with db.cursor() as cursor:
                for message in messages:
                    value = decode(message.value())
                    cursor.execute(UPSERT, [value[c] for c in _COLUMNS])  # type: ignore[arg-type]
                    stamps.append(value["ts_ms"])
            db.commit()
            client.commit(asynchronous=False)
            clock.committed(len(messages), stamps)
    finally:
        client.close()
        db.close()
    clock.write(args.result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
