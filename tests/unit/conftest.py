"""Fixtures for the unit tests (no broker, no database server)."""

from __future__ import annotations

from collections.abc import Iterator, MutableMapping
from typing import Any

import pytest
import structlog

from consumer.engine.crash import CRASH_AFTER_ENV, CRASH_POINT_ENV


@pytest.fixture
def log_events() -> Iterator[list[MutableMapping[str, Any]]]:
    """Every structlog event emitted during the test, as dicts (`event` is the event name)."""
    with structlog.testing.capture_logs() as captured:
        yield captured


@pytest.fixture(autouse=True)
def _no_crash_injection(monkeypatch: pytest.MonkeyPatch) -> None:
    """The crash tests' SIGKILL switch must never be on in a unit test process."""
    monkeypatch.delenv(CRASH_POINT_ENV, raising=False)
    monkeypatch.delenv(CRASH_AFTER_ENV, raising=False)
