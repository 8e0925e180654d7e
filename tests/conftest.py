"""Session fixtures: a real Kafka broker and a real PostgreSQL (see tests/fixtures/services.py).

Under CI=true a broker or database that cannot be had fails the run; it is never skipped.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from consumer import mask_url
from tests.fixtures.services import Service, kafka_service, postgres_service

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


# What this run used, printed in the run's summary (output during fixture set-up is captured).
_SERVICES_USED: list[str] = []


def _announce(config: pytest.Config, text: str) -> None:
    _SERVICES_USED.append(text.strip())
    reporter = config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None:
        reporter.write_line(text)


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    terminalreporter.section("services used by this run")
    if not _SERVICES_USED:
        terminalreporter.write_line("no Kafka broker or database was needed")
    for line in _SERVICES_USED:
        terminalreporter.write_line(line)


# A failed test shows the end of each consumer log it started: the consumer's own account of a
# stall or a crash is what a CI failure needs (the logs live in a temp dir CI does not keep).
_CONSUMER_LOG_LINES = 40
_CONSUMER_LOG_LINE_CHARS = 600


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    outcome = yield
    report = outcome.get_result()  # type: ignore[attr-defined]
    if report.when != "call" or not report.failed:
        return
    for process in getattr(item, "funcargs", {}).get("consumers", None) or []:
        report.sections.append(
            (f"consumer log {process.log_path} (last lines)", _log_tail(process.log_path))
        )


def _log_tail(path: Path) -> str:
    try:
        lines = path.read_text(errors="replace").splitlines()[-_CONSUMER_LOG_LINES:]
    except OSError as exc:
        return f"(unreadable: {exc})"
    return "\n".join(
        line if len(line) <= _CONSUMER_LOG_LINE_CHARS else line[:_CONSUMER_LOG_LINE_CHARS] + " …"
        for line in lines
    )


def _obtain(request: pytest.FixtureRequest, what: str, starter, work_dir: Path) -> Service:  # type: ignore[no-untyped-def]
    try:
        service: Service = starter(work_dir)
    except Exception as exc:
        message = f"no {what} for integration tests: {exc}"
        if IN_CI:
            pytest.fail(message, pytrace=False)
        pytest.skip(message)
    _announce(
        request.config,
        f"\n[offsetkeeper tests] {what}: {mask_url(service.address)} via {service.source}",
    )
    return service


@pytest.fixture(scope="session")
def kafka(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Service]:
    service = _obtain(
        request, "Kafka broker", kafka_service, tmp_path_factory.mktemp("kafka-service")
    )
    yield service
    service.stop()


@pytest.fixture(scope="session")
def postgres(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Service]:
    service = _obtain(
        request, "PostgreSQL", postgres_service, tmp_path_factory.mktemp("pg-service")
    )
    yield service
    service.stop()
