"""Contender "limit": a bare confluent-kafka consumer that reads and decodes every record and
does nothing else: the ceiling for any Python consumer on this machine.

    limit.py --encoding json --bootstrap B --group G --topic T --records N --result FILE
"""

from __future__ import annotations

import argparse
import sys

import kafka_consumer
import msgspec
import workload
from timing import RunClock


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--encoding", choices=["json", "avro"], required=True)
    parser.add_argument("--bootstrap", required=True)
    parser.add_argument("--group", required=True)
    parser.add_argument("--topic", required=True)
    parser.add_argument("--records", type=int, required=True)
    parser.add_argument("--result", required=True)
    parser.add_argument("--latency", action="store_true")
    parser.add_argument(
        "--json-decoder",
        choices=["json", "msgspec"],
        default="json",
        help="json.loads (the limit as defined), or msgspec (offsetkeeper's JSON decoder)",
    )
    args = parser.parse_args(argv)

    clock = RunClock(latency=args.latency)
    json_loads = workload.json_loads
    if args.json_decoder == "msgspec":
        json_loads = msgspec.json.Decoder().decode
    decode = json_loads if args.encoding == "json" else workload.decode_avro
    client = kafka_consumer.consumer(args.bootstrap, args.group)
    try:
        for messages in kafka_consumer.batches(
            client, args.topic, args.records, on_fetch=clock.fetched
        ):
            values = [decode(m.value()) for m in messages]
            clock.committed(len(values), [v["ts_ms"] for v in values] if args.latency else None)
    finally:
        client.close()
    clock.write(args.result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
