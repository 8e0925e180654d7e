"""`consumer.run(app, ...)` and `consumer.Runner`: one member of a consumer group, run from
Python with the settings of `offsetkeeper run`, until it is idle, signalled or stopped.

`consume` is the composition root both share with the command line: settings -> sink (by URL
scheme), client backend, decoders, dead-letter writer, metrics -> `Engine`, and the run's end
-> `RunResult`.
"""

from __future__ import annotations

import asyncio
import signal
import threading
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import structlog

from consumer.backends.confluent import ConfluentBackend
from consumer.cli.common import MIB, bad_record_policy, dead_letter_writer, decode_settings
from consumer.cli.sinks import open_sink
from consumer.core.app import App, load_app
from consumer.core.errors import ConfigError
from consumer.core.settings import RunSettings, load_settings
from consumer.decoding.topics import TopicDecoders
from consumer.engine.client import ClientBackend
from consumer.engine.group import Engine, EngineSettings
from consumer.runner.result import RunRecorder, RunResult
from consumer.runtime.logs import configure_logging
from consumer.runtime.operations import start_operations
from consumer.runtime.shutdown import GracefulShutdown

if TYPE_CHECKING:
    from consumer.backends.aiokafka import AiokafkaDriver


def run(
    app: App | str,
    settings: RunSettings | None = None,
    /,
    *,
    config_file: Path | None = None,
    handle_signals: bool | None = None,
    **values: Any,
) -> RunResult:
    """Run `app` as one member of a consumer group until it stops; see `Runner`."""
    return Runner(
        app, settings, config_file=config_file, handle_signals=handle_signals, **values
    ).run()


class Runner:
    """One member of a consumer group, run from Python.

    `app` is an `App`, or its `MODULE:ATTR` reference. Settings are those of `offsetkeeper
    run`, by the same names (README "Configuration"): either a `RunSettings`, or keyword
    values (`group=`, `topics=`, `sink=`, `stop_when_idle_s=`, ...), which take precedence
    over `OFFSETKEEPER_*` environment variables and the config file (`config_file`, or
    `OFFSETKEEPER_CONFIG`), exactly as flags do. Invalid settings raise `ConfigError` here.

    `run()` blocks until the run stops and returns a `RunResult`; an `OffsetkeeperError`
    that ends it is in the result, not raised (`RunResult.raise_for_error()`). `stop()`,
    from any thread, asks for the graceful stop SIGTERM gives: the batch in hand commits.
    With `handle_signals` (default: when called on the main thread) SIGTERM and SIGINT stop
    the run as they stop the command, and the previous handlers are restored afterwards.
    Logging is configured from the settings unless structlog was configured already.
    """

    def __init__(
        self,
        app: App | str,
        settings: RunSettings | None = None,
        /,
        *,
        config_file: Path | None = None,
        handle_signals: bool | None = None,
        **values: Any,
    ) -> None:
        self.settings = settings_for(app, settings, values, config_file)
        if self.settings.workers > 1:
            raise ConfigError(
                "workers above 1 are run by the command's supervisor (offsetkeeper run "
                "--workers N); from Python, run one Runner per process",
                workers=self.settings.workers,
            )
        self._app = app if isinstance(app, App) else None
        self._handle_signals = handle_signals
        self._stop = threading.Event()
        self._engine: Engine | None = None

    def stop(self) -> None:
        """Ask the run to stop gracefully (safe from any thread, before or during `run`)."""
        self._stop.set()
        engine = self._engine
        if engine is not None:
            engine.request_stop()

    def run(self) -> RunResult:
        settings = self.settings
        if not structlog.is_configured():
            configure_logging(settings.log_level, settings.log_format)
        app = self._app or load_app(settings.app)
        handle_signals = self._handle_signals
        if handle_signals is None:
            handle_signals = threading.current_thread() is threading.main_thread()
        if not handle_signals:
            return consume(app, settings, shutdown=None, on_engine=self._attach)
        with _signal_handlers_restored():
            shutdown = GracefulShutdown(settings.shutdown_deadline_s)
            return consume(app, settings, shutdown=shutdown, on_engine=self._attach)

    def _attach(self, engine: Engine) -> None:
        self._engine = engine
        if self._stop.is_set():
            engine.request_stop()


def settings_for(
    app: App | str,
    settings: RunSettings | None,
    values: Mapping[str, Any],
    config_file: Path | None,
) -> RunSettings:
    """The run's settings: `settings` as given, or built from `values` like flags."""
    if settings is not None:
        if values or config_file is not None:
            raise ConfigError("give either a RunSettings or setting values, not both")
        return settings
    given = dict(values)
    # An App object needs no reference to load; its name labels the metrics and logs.
    given.setdefault("app", app if isinstance(app, str) else app.name)
    return load_settings(RunSettings, given, config_file)


@contextmanager
def _signal_handlers_restored() -> Iterator[None]:
    """The caller's SIGTERM, SIGINT and SIGALRM handlers are back once the run is over."""
    signals = (signal.SIGTERM, signal.SIGINT, signal.SIGALRM)
    previous = {signum: signal.getsignal(signum) for signum in signals}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def engine_settings(settings: RunSettings) -> EngineSettings:
    return EngineSettings(
        group=settings.group,
        topics=tuple(settings.topics),
        reset_policy=settings.reset_policy,
        batch_max_records=settings.batch_max_records,
        poll_timeout_s=settings.poll_timeout_s,
        commit_interval_s=settings.commit_interval_s,
        stop_when_idle_s=settings.stop_when_idle_s,
        sink_retry_deadline_s=settings.sink_retry_deadline_s,
        bad_records=bad_record_policy(settings),
        on_data_loss=settings.on_data_loss,
        state_cache_bytes=settings.state_cache_mb * MIB,
    )


def consume(
    app: App,
    settings: RunSettings,
    *,
    shutdown: GracefulShutdown | None,
    on_engine: Callable[[Engine], None] = lambda _engine: None,
) -> RunResult:
    """Run this process as one member of the group until it stops (see the module docstring).
    Problems found before the engine exists (the sink URL, the metrics port, a decoder, the
    dead-letter topic template) raise `ConfigError`; from then on the run ends in its result."""
    sink = open_sink(settings.sink.get_secret_value())
    operations = start_operations(settings)
    dead_letters = None
    try:
        decoders = TopicDecoders(app, decode_settings(settings))
        dead_letters = dead_letter_writer(settings, group=settings.group, topics=settings.topics)
        recorder = RunRecorder(None if operations is None else operations.telemetry)
        run_settings = engine_settings(settings)

        def make_engine(backend: ClientBackend) -> Engine:
            engine = Engine(
                app,
                run_settings,
                backend,
                sink,
                observer=recorder,
                decoders=decoders,
                dead_letters=dead_letters,
            )
            recorder.engine = engine
            if shutdown is not None:  # at once, if a signal came before the engine
                shutdown.on_request(engine.request_stop)
            on_engine(engine)
            return engine

        return recorder.outcome(
            lambda: _drive(settings, make_engine),
            signalled=lambda: shutdown is not None and shutdown.requested,
        )
    finally:
        if dead_letters is not None:
            dead_letters.close()
        if shutdown is not None:
            shutdown.disarm()
        if operations is not None:
            operations.stop()


def _drive(settings: RunSettings, make_engine: Callable[[ClientBackend], Engine]) -> int:
    """Consume with the configured Kafka client until the engine stops; the exit code."""
    if settings.backend == "aiokafka":
        return asyncio.run(_aiokafka_driver(settings, make_engine).run())
    return make_engine(
        ConfluentBackend(
            bootstrap_servers=settings.bootstrap_servers,
            group=settings.group,
            client_config=settings.kafka_config,
            unreachable_deadline_s=settings.broker_retry_deadline_s,
        )
    ).run()


def _aiokafka_driver(
    settings: RunSettings, make_engine: Callable[[ClientBackend], Engine]
) -> AiokafkaDriver:
    # Imported here: the confluent path never loads aiokafka.
    from consumer.backends.aiokafka import AiokafkaBridge, AiokafkaDriver  # noqa: PLC0415

    def engine_for(bridge: AiokafkaBridge) -> Engine:
        engine = make_engine(bridge)
        engine.resolve_awaitable = bridge.resolve  # async processors are awaited on the loop
        return engine

    return AiokafkaDriver(
        engine_for,
        bootstrap_servers=settings.bootstrap_servers,
        group=settings.group,
        topics=settings.topics,
        client_config=settings.kafka_config,
        batch_max_records=settings.batch_max_records,
        poll_timeout_s=settings.poll_timeout_s,
        commit_interval_s=settings.commit_interval_s,
    )
