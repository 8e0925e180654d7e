"""The `offsetkeeper` command line."""

from __future__ import annotations

import argparse
import json
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from types import FrameType
from typing import Any, TextIO

import structlog

from consumer._app import load_app
from consumer._config import CheckpointSettings, RunSettings, load_settings
from consumer._confluent import ConfluentBackend
from consumer._engine import EXIT_FAILED, Engine, EngineSettings
from consumer._errors import KafkaError, OffsetkeeperError
from consumer._logging import configure_logging
from consumer._records import TopicPartition
from sinks import mask_url, open_sink

log = structlog.get_logger("offsetkeeper.cli")


def _key_value(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return key, value


def _add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", type=Path, help="TOML config file (env OFFSETKEEPER_CONFIG)")
    parser.add_argument(
        "--bootstrap-servers", help="Kafka bootstrap servers (default 127.0.0.1:9092)"
    )
    parser.add_argument("--sink", help="sink URL, e.g. sqlite:///out.db or postgresql://...")
    parser.add_argument(
        "-X",
        "--kafka-config",
        dest="kafka_config",
        action="append",
        type=_key_value,
        metavar="KEY=VALUE",
        help="raw librdkafka setting, repeatable (e.g. -X session.timeout.ms=10000)",
    )
    parser.add_argument("--log-level", choices=["debug", "info", "warning", "error"])
    parser.add_argument("--log-format", choices=["auto", "json", "console"])


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="offsetkeeper",
        description="Consume Kafka topics into sinks exactly once in effect.",
    )
    commands = parser.add_subparsers(dest="command", required=True)

    run = commands.add_parser("run", help="consume topics into a sink as a consumer group member")
    _add_common(run)
    run.add_argument(
        "--app", help="the app to run, MODULE:ATTR (e.g. consumer.examples.orders:app)"
    )
    run.add_argument("--group", help="consumer group id")
    run.add_argument(
        "--topic", dest="topics", action="append", help="topic to consume (repeatable)"
    )
    run.add_argument(
        "--reset-policy",
        choices=["earliest", "latest", "error"],
        help="where to start a partition with no stored checkpoint (default earliest)",
    )
    run.add_argument(
        "--batch-max-records", type=int, help="records per batch, at most (default 2000)"
    )
    run.add_argument(
        "--poll-timeout",
        dest="poll_timeout_s",
        type=float,
        help="seconds one poll waits for records (default 0.5)",
    )
    run.add_argument(
        "--stop-when-idle",
        dest="stop_when_idle_s",
        type=float,
        metavar="SECONDS",
        help="exit once no record arrived for SECONDS and every partition is caught up",
    )
    run.add_argument(
        "--sink-retry-deadline",
        dest="sink_retry_deadline_s",
        type=float,
        metavar="SECONDS",
        help="give up after the sink failed this long (default 120)",
    )
    run.add_argument(
        "--broker-retry-deadline",
        dest="broker_retry_deadline_s",
        type=float,
        metavar="SECONDS",
        help="give up after no Kafka broker answered this long (default 300)",
    )

    checkpoint = commands.add_parser("checkpoint", help="inspect stored checkpoints")
    checkpoint_commands = checkpoint.add_subparsers(dest="checkpoint_command", required=True)
    show = checkpoint_commands.add_parser("show", help="stored checkpoints and lag per partition")
    _add_common(show)
    show.add_argument("--group", help="consumer group id")
    show.add_argument("--format", dest="output_format", choices=["table", "json"], default="table")
    return parser


def _cli_values(args: argparse.Namespace, names: Sequence[str]) -> dict[str, Any]:
    values = {name: getattr(args, name, None) for name in names}
    pairs = values.get("kafka_config")
    if pairs is not None:
        values["kafka_config"] = dict(pairs)
    return values


_COMMON = ("bootstrap_servers", "sink", "kafka_config", "log_level", "log_format")


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "run":
            return _run(args)
        return _checkpoint_show(args, sys.stdout)
    except OffsetkeeperError as exc:
        log.error(  # noqa: TRY400 - expected failures get one clear line, not a traceback
            "offsetkeeper_failed", error_type=type(exc).__name__, error=str(exc)
        )
        print(f"offsetkeeper: error: {exc}", file=sys.stderr)
        return EXIT_FAILED


class _StopOnSignal:
    """SIGTERM/SIGINT handling, installed before anything slow so no signal is ever lost:
    the first asks the engine to commit its batch and leave; a second aborts at once."""

    def __init__(self) -> None:
        self.requested = False
        self.engine: Engine | None = None
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)

    def _on_signal(self, signum: int, _frame: FrameType | None) -> None:
        if self.requested:
            # Second signal: abort now; the open transaction is rolled back on the way out.
            raise SystemExit(128 + signum)
        self.requested = True
        log.info("shutdown_requested", signal=signal.Signals(signum).name)
        if self.engine is not None:
            self.engine.request_stop()


def _run(args: argparse.Namespace) -> int:
    stop = _StopOnSignal()
    settings = load_settings(
        RunSettings,
        _cli_values(
            args,
            (
                *_COMMON,
                "app",
                "group",
                "topics",
                "reset_policy",
                "batch_max_records",
                "poll_timeout_s",
                "stop_when_idle_s",
                "sink_retry_deadline_s",
                "broker_retry_deadline_s",
            ),
        ),
        args.config,
    )
    configure_logging(settings.log_level, settings.log_format)
    app = load_app(settings.app)
    sink = open_sink(settings.sink.get_secret_value())
    backend = ConfluentBackend(
        bootstrap_servers=settings.bootstrap_servers,
        group=settings.group,
        client_config=settings.kafka_config,
        unreachable_deadline_s=settings.broker_retry_deadline_s,
    )
    engine = Engine(
        app,
        EngineSettings(
            group=settings.group,
            topics=tuple(settings.topics),
            reset_policy=settings.reset_policy,
            batch_max_records=settings.batch_max_records,
            poll_timeout_s=settings.poll_timeout_s,
            stop_when_idle_s=settings.stop_when_idle_s,
            sink_retry_deadline_s=settings.sink_retry_deadline_s,
        ),
        backend,
        sink,
    )
    stop.engine = engine
    if stop.requested:  # a signal that came before the engine existed
        engine.request_stop()
    return engine.run()


def _checkpoint_show(args: argparse.Namespace, out: TextIO) -> int:
    settings = load_settings(
        CheckpointSettings, _cli_values(args, (*_COMMON, "group")), args.config
    )
    configure_logging(settings.log_level, settings.log_format)
    sink_url = settings.sink.get_secret_value()
    sink = open_sink(sink_url)
    sink.open(())
    try:
        checkpoints = sink.load_checkpoints(settings.group)
    finally:
        sink.close()
    ends: dict[TopicPartition, int | None] = {}
    backend = ConfluentBackend(
        bootstrap_servers=settings.bootstrap_servers,
        group=f"{settings.group}.offsetkeeper-inspect",
        client_config={"socket.timeout.ms": "10000", **settings.kafka_config},
    )
    try:
        for tp in checkpoints:
            try:
                ends[tp] = backend.watermarks(tp, timeout_s=10.0)[1]
            except KafkaError as exc:
                log.warning(
                    "end_offset_unknown", topic=tp.topic, partition=tp.partition, error=str(exc)
                )
                ends[tp] = None
    finally:
        backend.close()
    rows = []
    for tp in sorted(checkpoints):
        checkpoint = checkpoints[tp]
        end = ends.get(tp)
        rows.append(
            {
                "topic": tp.topic,
                "partition": tp.partition,
                "next_offset": checkpoint.next_offset,
                "end_offset": end,
                "lag": None if end is None else max(end - checkpoint.next_offset, 0),
                "updated_at": checkpoint.updated_at.isoformat(),
            }
        )
    if args.output_format == "json":
        json.dump(
            {"group": settings.group, "sink": mask_url(sink_url), "checkpoints": rows},
            out,
            indent=2,
        )
        out.write("\n")
        return 0
    out.write(f"group {settings.group} in {mask_url(sink_url)}: {len(rows)} partition(s)\n")
    header = ("topic", "partition", "next_offset", "end_offset", "lag", "updated_at")
    table = [header] + [tuple("?" if r[h] is None else str(r[h]) for h in header) for r in rows]
    widths = [max(len(line[i]) for line in table) for i in range(len(header))]
    for line in table:
        out.write(
            "  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True)).rstrip()
            + "\n"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
