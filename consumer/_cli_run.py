"""`offsetkeeper run`: consume topics into a sink as a consumer group member."""

from __future__ import annotations

import argparse
import signal
from types import FrameType
from typing import Any

import structlog

from consumer._app import load_app
from consumer._cli_common import COMMON_SETTINGS, add_common_arguments, cli_values
from consumer._config import RunSettings, load_settings
from consumer._confluent import ConfluentBackend
from consumer._engine import Engine, EngineSettings
from consumer._logging import configure_logging
from sinks import open_sink

log = structlog.get_logger("offsetkeeper.cli")


def add_run_parser(commands: Any) -> None:
    run = commands.add_parser("run", help="consume topics into a sink as a consumer group member")
    add_common_arguments(run)
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

    run.set_defaults(handler=run_command)


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


def run_command(args: argparse.Namespace) -> int:
    stop = _StopOnSignal()
    settings = load_settings(
        RunSettings,
        cli_values(
            args,
            (
                *COMMON_SETTINGS,
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
