"""`offsetkeeper run`: consume topics into a sink as a consumer group member."""

from __future__ import annotations

import argparse
import os
import signal
from typing import Any

from consumer.cli.common import (
    BAD_RECORD_SETTINGS,
    COMMON_SETTINGS,
    DECODING_SETTINGS,
    add_bad_record_arguments,
    add_common_arguments,
    add_decoding_arguments,
    cli_values,
)
from consumer.cli.workers import supervise
from consumer.core.app import load_app
from consumer.core.errors import ConfigError
from consumer.core.settings import RunSettings, load_settings
from consumer.runner.run import consume
from consumer.runtime.logs import configure_logging
from consumer.runtime.shutdown import GracefulShutdown
from consumer.runtime.supervisor import WORKER_ENV, watch_supervisor

# The settings `run` takes from its flags (each flag's dest is the setting's name).
RUN_SETTINGS = (
    *COMMON_SETTINGS,
    "app",
    "group",
    "topics",
    "reset_policy",
    "batch_max_records",
    "poll_timeout_s",
    "commit_interval_s",
    "stop_when_idle_s",
    "sink_retry_deadline_s",
    "broker_retry_deadline_s",
    "backend",
    "metrics_port",
    "metrics_host",
    "shutdown_deadline_s",
    "lag_interval_s",
    "readiness_timeout_s",
    "liveness_timeout_s",
    "workers",
    *BAD_RECORD_SETTINGS,
    *DECODING_SETTINGS,
)


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
    _add_batch_arguments(run)
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
    run.add_argument(
        "--backend",
        choices=["confluent", "aiokafka"],
        help="Kafka client: confluent (librdkafka, default) or aiokafka (asyncio)",
    )
    add_decoding_arguments(run)
    add_bad_record_arguments(run)
    _add_operations_arguments(run)
    run.set_defaults(handler=run_command)


def _add_batch_arguments(run: argparse.ArgumentParser) -> None:
    batches = run.add_argument_group("batches and commits (README: Commit cadence)")
    batches.add_argument(
        "--batch-max-records", type=int, help="records per batch, at most (default 2000)"
    )
    batches.add_argument(
        "--poll-timeout",
        dest="poll_timeout_s",
        type=float,
        help="seconds a poll waits when no record is there (default 0.5)",
    )
    batches.add_argument(
        "--commit-interval",
        dest="commit_interval_s",
        type=float,
        metavar="SECONDS",
        help="once a batch has a record, wait up to this long for it to fill to "
        "--batch-max-records before it commits (default 0: commit what is there)",
    )


def _add_operations_arguments(run: argparse.ArgumentParser) -> None:
    ops = run.add_argument_group("operations (README: Deploying)")
    ops.add_argument(
        "--metrics-port",
        type=int,
        metavar="PORT",
        help="serve /metrics, /healthz and /readyz on this port (0: any free port; default off)",
    )
    ops.add_argument("--metrics-host", metavar="ADDRESS", help="bind address (default 127.0.0.1)")
    ops.add_argument(
        "--shutdown-deadline",
        dest="shutdown_deadline_s",
        type=float,
        metavar="SECONDS",
        help="after SIGTERM, abort the in-flight batch and exit 5 if not done by then (default 30)",
    )
    ops.add_argument(
        "--lag-interval",
        dest="lag_interval_s",
        type=float,
        metavar="SECONDS",
        help="how often partition end offsets are sampled for the lag metric (default 10)",
    )
    ops.add_argument(
        "--readiness-timeout",
        dest="readiness_timeout_s",
        type=float,
        metavar="SECONDS",
        help="not ready once the sink failed, or a lagging partition committed nothing, this "
        "long (default 30)",
    )
    ops.add_argument(
        "--liveness-timeout",
        dest="liveness_timeout_s",
        type=float,
        metavar="SECONDS",
        help="not alive once the partition loop has not run this long (default 120)",
    )
    ops.add_argument(
        "--workers",
        type=int,
        metavar="N",
        help="run N members of the group as child processes of one supervisor, which restarts "
        "them, forwards SIGTERM and serves one endpoint for all (default 1: this process is "
        "the member)",
    )


def run_command(args: argparse.Namespace) -> int:
    # First, before anything slow: no SIGTERM is lost while the process starts.
    shutdown = GracefulShutdown()
    settings = load_settings(RunSettings, cli_values(args, RUN_SETTINGS), args.config)
    shutdown.deadline_s = settings.shutdown_deadline_s
    worker = os.environ.get(WORKER_ENV)
    context = None if worker is None else {"worker": int(worker) if worker.isdigit() else worker}
    configure_logging(settings.log_level, settings.log_format, context=context)
    if settings.workers > 1:
        command_line = getattr(args, "command_line", None)
        if command_line is None:
            raise ConfigError("--workers needs the command line (run it through main())")
        return supervise(settings, command_line, shutdown)
    # A worker of a supervisor that died without stopping it stops as on SIGTERM.
    watch_supervisor(lambda: os.kill(os.getpid(), signal.SIGTERM))
    return _consume(settings, shutdown)


def _consume(settings: RunSettings, shutdown: GracefulShutdown) -> int:
    """Run this process as one member of the group until it stops; the exit code. The Python
    API's composition root does the work (`consumer.runner.run.consume`); an error that ended
    the run is raised again, for `main` to report."""
    result = consume(load_app(settings.app), settings, shutdown=shutdown)
    if result.error is not None:
        raise result.error
    return result.exit_code
