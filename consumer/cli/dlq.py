"""`offsetkeeper dlq show|replay`: list dead letters, and re-drive them after a fix."""

from __future__ import annotations

import argparse
import json
import sys
from datetime import UTC, datetime
from typing import Any, TextIO

import structlog

from consumer.backends.confluent import ConfluentReader
from consumer.cli.common import (
    COMMON_SETTINGS,
    DECODING_SETTINGS,
    add_common_arguments,
    add_decoding_arguments,
    cli_values,
    decode_settings,
)
from consumer.cli.sinks import open_sink
from consumer.core.app import load_app
from consumer.core.errors import ConfigError
from consumer.core.exit_codes import EXIT_OK, EXIT_PARTITIONS_STOPPED
from consumer.core.settings import DeadLetterSettings, load_settings
from consumer.deadletters.redrive import RedriveSummary, describe, scan, to_original, to_pipeline
from consumer.decoding.topics import TopicDecoders
from consumer.runtime.logs import configure_logging

log = structlog.get_logger("offsetkeeper.cli")

_SETTINGS = (*COMMON_SETTINGS, *DECODING_SETTINGS, "dead_letter_topic", "app")


def add_dlq_parser(commands: Any) -> None:
    dlq = commands.add_parser("dlq", help="list dead letters, and re-drive them after a fix")
    sub = dlq.add_subparsers(dest="dlq_command", required=True)

    show = sub.add_parser("show", help="the dead letters of a topic, each bad record once")
    _common(show)
    show.add_argument("--format", dest="output_format", choices=["table", "json"], default="table")
    show.add_argument("--limit", type=int, help="show at most this many (the oldest first)")
    show.set_defaults(handler=lambda args: dlq_show(args, sys.stdout))

    replay = sub.add_parser(
        "replay", help="re-drive dead letters into their source topic or through the pipeline"
    )
    _common(replay)
    add_decoding_arguments(replay)
    replay.add_argument(
        "--to",
        dest="target",
        choices=["original", "pipeline"],
        required=True,
        help="original: produce them back to their source topic and partition (transactional); "
        "pipeline: run them through --app into --sink",
    )
    replay.add_argument("--app", help="the app for --to pipeline, MODULE:ATTR")
    replay.add_argument(
        "--dry-run", action="store_true", help="count what would be re-driven; change nothing"
    )
    replay.set_defaults(handler=lambda args: dlq_replay(args, sys.stdout))


def _common(parser: argparse.ArgumentParser) -> None:
    add_common_arguments(parser)
    parser.add_argument(
        "--dead-letter-topic", metavar="NAME", help="the dead-letter topic (e.g. GROUP.dlq)"
    )


def _settings(args: argparse.Namespace) -> DeadLetterSettings:
    settings = load_settings(DeadLetterSettings, cli_values(args, _SETTINGS), args.config)
    configure_logging(settings.log_level, settings.log_format)
    return settings


def _reader(settings: DeadLetterSettings, purpose: str) -> ConfluentReader:
    return ConfluentReader(
        bootstrap_servers=settings.bootstrap_servers,
        client_id=f"offsetkeeper-dlq-{purpose}",
        client_config=settings.kafka_config,
    )


def dlq_show(args: argparse.Namespace, out: TextIO) -> int:
    settings = _settings(args)
    reader = _reader(settings, "show")
    try:
        scanned = scan(reader, settings.dead_letter_topic)
    finally:
        reader.close()
    entries = describe(scanned.entries[: args.limit] if args.limit else scanned.entries)
    if args.output_format == "json":
        for entry in entries:
            out.write(json.dumps(entry, sort_keys=True) + "\n")
        return EXIT_OK
    out.write(
        f"{len(scanned.entries)} dead letter(s) in {settings.dead_letter_topic}"
        f" ({scanned.repeats} repeat(s) collapsed, {scanned.foreign} foreign record(s) ignored)\n"
    )
    for entry in entries:
        out.write(_line(entry) + "\n")
    return EXIT_OK


def _line(entry: dict[str, Any]) -> str:
    when = (
        "-"
        if entry["timestamp_ms"] is None
        else datetime.fromtimestamp(entry["timestamp_ms"] / 1000, tz=UTC).isoformat(
            timespec="seconds"
        )
    )
    field = f" field={entry['field']}" if entry["field"] else ""
    return (
        f"{entry['topic']}[{entry['partition']}]@{entry['offset']}  {when}  "
        f"{entry['error_class']}{field}  key={entry['key']!r}  {entry['error']}"
    )


def dlq_replay(args: argparse.Namespace, out: TextIO) -> int:
    settings = _settings(args)
    reader = _reader(settings, "replay")
    try:
        if args.target == "original":
            summary = to_original(
                reader,
                bootstrap_servers=settings.bootstrap_servers,
                dead_letter_topic=settings.dead_letter_topic,
                client_config=settings.kafka_config,
                dry_run=args.dry_run,
            )
        else:
            summary = _to_pipeline(settings, reader, dry_run=args.dry_run)
    finally:
        reader.close()
    return _report(out, summary, args.target, dry_run=args.dry_run)


def _to_pipeline(
    settings: DeadLetterSettings, reader: ConfluentReader, *, dry_run: bool
) -> RedriveSummary:
    if settings.app is None:
        raise ConfigError("--to pipeline needs --app (the fixed app) and --sink")
    app = load_app(settings.app)
    decoders = TopicDecoders(app, decode_settings(settings))
    if dry_run:
        scanned = scan(reader, settings.dead_letter_topic)
        decoders.check({e.origin.topic for e in scanned.entries})
        return RedriveSummary(len(scanned.entries), scanned.repeats, scanned.foreign)
    sink = open_sink(settings.sink.get_secret_value())
    try:
        sink.open(app.tables)
        return to_pipeline(
            app, reader, sink, decoders, dead_letter_topic=settings.dead_letter_topic
        )
    finally:
        sink.close()


def _report(out: TextIO, summary: RedriveSummary, target: str, *, dry_run: bool) -> int:
    verb = "would re-drive" if dry_run else "re-drove"
    out.write(
        f"{verb} {summary.redriven} dead letter(s) to {target}"
        f" ({summary.repeats} repeat(s) skipped, {summary.foreign} foreign record(s) ignored)\n"
    )
    if summary.stopped is not None:
        out.write(f"stopped: still bad: {summary.stopped}\n")
        return EXIT_PARTITIONS_STOPPED
    return EXIT_OK
