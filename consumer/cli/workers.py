"""`offsetkeeper run --workers N`: each worker's command line, and handing `run` over to the
supervisor (`consumer.runtime.supervisor`) and its endpoint
(`consumer.runtime.worker_endpoint`).

Worker i runs `python -m consumer.cli.main run` with the supervisor's own arguments (so the same
config file, flags and, inherited, environment), minus `--workers`, plus

    --workers 1                      so a `workers` from the environment or a file cannot recurse
    -X client.id=<base>-w<i>         base: the configured client.id, or "offsetkeeper"
    -X group.instance.id=<id>-w<i>   only with static membership: N members cannot share an id
    --metrics-port P --metrics-host 127.0.0.1
                                     only when the supervisor serves --metrics-port: a free
                                     loopback port, chosen anew at every start

A flag given last wins, and -X settings merge with the last value of a key winning, so these
override whatever the arguments, the environment or the config file said.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

from consumer.core.settings import RunSettings
from consumer.runtime.shutdown import GracefulShutdown
from consumer.runtime.supervisor import Supervisor, WorkerCommand
from consumer.runtime.worker_endpoint import WorkerEndpoint

WORKERS_FLAG = "--workers"
DEFAULT_CLIENT_ID = "offsetkeeper"
WORKER_METRICS_HOST = "127.0.0.1"


def run_arguments(command_line: Sequence[str]) -> list[str]:
    """The arguments of `run` (the command line after the word `run`), without `--workers N`
    and `--workers=N` (an abbreviation of the flag stays, and is overridden)."""
    args = list(command_line)
    if args[:1] == ["run"]:
        args = args[1:]
    kept: list[str] = []
    tokens = iter(args)
    for token in tokens:
        if token == WORKERS_FLAG:
            next(tokens, None)
        elif not token.startswith(f"{WORKERS_FLAG}="):
            kept.append(token)
    return kept


def worker_arguments(
    run_args: Sequence[str],
    *,
    index: int,
    kafka_config: Mapping[str, str],
    metrics_port: int | None,
) -> list[str]:
    """The arguments of worker `index`'s `run` (see the module docstring)."""
    extra = [WORKERS_FLAG, "1", "-X", f"client.id={_worker_id(kafka_config, 'client.id', index)}"]
    if kafka_config.get("group.instance.id"):
        extra += ["-X", f"group.instance.id={_worker_id(kafka_config, 'group.instance.id', index)}"]
    if metrics_port is not None:
        extra += ["--metrics-port", str(metrics_port), "--metrics-host", WORKER_METRICS_HOST]
    return [*run_args, *extra]


def _worker_id(kafka_config: Mapping[str, str], key: str, index: int) -> str:
    return f"{kafka_config.get(key) or DEFAULT_CLIENT_ID}-w{index}"


def python_command(python: str = sys.executable) -> list[str]:
    """How a worker starts `offsetkeeper`. Like the console script, it does not import from
    the working directory (`-P`), unless offsetkeeper itself is found there (a checkout)."""
    here = Path.cwd().resolve()
    package_root = Path(__file__).resolve().parents[2]
    safe_path = [] if package_root == here else ["-P"]
    return [python, *safe_path, "-m", "consumer.cli.main", "run"]


def worker_command(run_args: Sequence[str], kafka_config: Mapping[str, str]) -> WorkerCommand:
    prefix = python_command()
    given = list(run_args)
    config = dict(kafka_config)

    def command(index: int, metrics_port: int | None) -> list[str]:
        arguments = worker_arguments(
            given, index=index, kafka_config=config, metrics_port=metrics_port
        )
        return [*prefix, *arguments]

    return command


def supervise(
    settings: RunSettings, command_line: Sequence[str], shutdown: GracefulShutdown
) -> int:
    """Run `settings.workers` workers until they are stopped; the supervisor's exit code.
    `shutdown` hands its signals over: one that came already is the first stop request."""
    supervisor = Supervisor(
        settings.workers,
        worker_command(run_arguments(command_line), settings.kafka_config),
        deadline_s=settings.shutdown_deadline_s,
        stop_when_idle=settings.stop_when_idle_s is not None,
        metrics_ports=settings.metrics_port is not None,
    )
    supervisor.install_signal_handlers()
    if shutdown.requested:
        supervisor.request_stop()
    shutdown.disarm()
    endpoint = None
    if settings.metrics_port is not None:
        endpoint = WorkerEndpoint(settings.metrics_host, settings.metrics_port, supervisor)
        endpoint.start()
    try:
        return supervisor.run()
    finally:
        if endpoint is not None:
            endpoint.stop()
