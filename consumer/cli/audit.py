"""`offsetkeeper audit`: prove that the sink holds what the log says it should."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any, TextIO

from consumer.audit.compare import VERDICTS, Sample, TableReport
from consumer.audit.run import AuditReport, AuditRequest, run_audit
from consumer.cli.common import (
    COMMON_SETTINGS,
    DECODING_SETTINGS,
    add_common_arguments,
    add_decoding_arguments,
    cli_values,
    decode_settings,
)
from consumer.cli.replay import range_reader
from consumer.cli.sinks import checkpoint_admin, open_sink
from consumer.core.app import load_app
from consumer.core.errors import ConfigError
from consumer.core.exit_codes import EXIT_OK, EXIT_PROBLEMS_FOUND
from consumer.core.settings import ReplaySettings, load_settings
from consumer.decoding.topics import TopicDecoders
from consumer.replay.plan import RangeRequest
from consumer.runtime.logs import configure_logging


def add_audit_parser(commands: Any) -> None:
    audit = commands.add_parser(
        "audit",
        help="recompute a range through the app in memory and compare it with the sink "
        "(read-only; safe beside the live group)",
    )
    add_common_arguments(audit)
    add_decoding_arguments(audit)
    audit.add_argument("--app", help="the app that wrote the sink, MODULE:ATTR")
    audit.add_argument("--topic", help="the topic to audit")
    audit.add_argument("--group", required=True, help="the consumer group that wrote the sink")
    audit.add_argument(
        "--partition",
        dest="partitions",
        type=int,
        action="append",
        help="audit only this partition (repeatable; default: all)",
    )
    start = audit.add_mutually_exclusive_group()
    start.add_argument("--from-offset", type=int, metavar="N", help="start at offset N")
    start.add_argument(
        "--from-timestamp", metavar="ISO8601", help="start at the first record at/after this time"
    )
    audit.add_argument(
        "--sample-every",
        type=int,
        default=1,
        metavar="N",
        help="audit one key in N (by a stable hash of the key; default every key)",
    )
    audit.add_argument(
        "--sample-slice",
        type=int,
        default=0,
        metavar="I",
        help="with --sample-every N: the keys whose hash modulo N is I (0..N-1)",
    )
    audit.add_argument(
        "--examples", type=int, default=5, metavar="K", help="examples shown per kind (default 5)"
    )
    audit.add_argument("--format", choices=["text", "json"], default="text")
    audit.add_argument("--batch-max-records", type=int, help="records per batch, at most")
    audit.add_argument(
        "--backend", choices=["confluent", "aiokafka"], help="Kafka client (default confluent)"
    )
    audit.set_defaults(handler=lambda args: audit_command(args, sys.stdout))


def audit_command(args: argparse.Namespace, out: TextIO) -> int:
    names = (*COMMON_SETTINGS, "app", "topic", "partitions", "batch_max_records", "backend")
    settings = load_settings(
        ReplaySettings, cli_values(args, (*names, *DECODING_SETTINGS)), args.config
    )
    configure_logging(settings.log_level, settings.log_format)
    if not args.sample_every >= 1 or not 0 <= args.sample_slice < args.sample_every:
        raise ConfigError(
            "--sample-slice must be within 0..N-1 of --sample-every N",
            sample_every=args.sample_every,
            sample_slice=args.sample_slice,
        )
    app = load_app(settings.app)
    decoders = TopicDecoders(app, decode_settings(settings))
    decoders.check([settings.topic])
    request = AuditRequest(
        topic=settings.topic,
        group=args.group,
        partitions=settings.partitions,
        start=(
            None
            if args.from_offset is None and args.from_timestamp is None
            else RangeRequest(from_offset=args.from_offset, from_timestamp=args.from_timestamp)
        ),
        sample=Sample(args.sample_every, args.sample_slice),
        max_examples=args.examples,
        batch_max_records=settings.batch_max_records,
    )
    sink = open_sink(settings.sink.get_secret_value())
    reader, resolve = range_reader(settings, f"audit-{args.group}")
    try:
        checkpoint_admin(sink).open_existing()  # read-only: creates and migrates nothing
        report = run_audit(app, reader, sink, request, decoders=decoders, resolve=resolve)
    finally:
        reader.close()
        sink.close()
    if args.format == "json":
        out.write(json.dumps(report.to_json(), sort_keys=True, default=str) + "\n")
    else:
        _write_text(out, report)
    return EXIT_OK if report.clean else EXIT_PROBLEMS_FOUND


def _write_text(out: TextIO, report: AuditReport) -> None:
    sampled = (
        ""
        if report.sample.every == 1
        else f", keys sampled 1 in {report.sample.every} (slice {report.sample.slice})"
    )
    out.write(
        f"audit of topic {report.topic} against group {report.group}: "
        f"{report.records} records recomputed{sampled}\n"
    )
    for partition, (start, end) in sorted(report.ranges.items()):
        out.write(f"  partition {partition}: offsets {start}..{end - 1 if end > start else '-'}\n")
    if report.bad_records:
        out.write(
            f"  {len(report.bad_records)} bad record(s) in the range (dead-lettered or stopped "
            "on by the group; no rows expected from them)\n"
        )
    for table in report.tables:
        _write_table(out, table)
    out.write("clean: the sink matches the log\n" if report.clean else "DIFFERENCES FOUND\n")


def _write_table(out: TextIO, table: TableReport) -> None:
    totals = ", ".join(f"{table.total(v)} {v}" for v in VERDICTS)
    out.write(f"table {table.table} ({table.mode}): {totals}")
    out.write(f", {table.out_of_scope} newer outside the range\n" if table.out_of_scope else "\n")
    for partition, counts in sorted(table.partitions.items()):
        line = ", ".join(f"{counts.counts[v]} {v}" for v in VERDICTS)
        out.write(f"  partition {partition}: {line}\n")
        for verdict, examples in sorted(counts.examples.items()):
            for example in examples:
                out.write(f"    {verdict}: {json.dumps(example, default=str, sort_keys=True)}\n")
