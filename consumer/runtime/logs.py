"""structlog set-up: one JSON object per line when not on a terminal, pretty on one."""

from __future__ import annotations

import logging
import sys
from collections.abc import Mapping, MutableMapping
from typing import Any, Literal

import structlog

_LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
}


def configure_logging(
    level: str = "info",
    log_format: Literal["auto", "json", "console"] = "auto",
    *,
    context: Mapping[str, object] | None = None,
) -> None:
    """Configure structlog for this process (called once at start-up, never at import).
    `context` is added to every line of the process, from every thread (a worker of
    `run --workers N` says `worker=i`)."""
    use_json = log_format == "json" or (log_format == "auto" and not sys.stderr.isatty())
    renderer: structlog.typing.Processor = (
        structlog.processors.JSONRenderer()
        if use_json
        else structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
    )
    fixed: list[structlog.typing.Processor] = [_ProcessContext(context)] if context else []
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            *fixed,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(_LEVELS[level]),
        # One write per line (message and newline together): the workers of `run --workers N`
        # share the supervisor's stderr, and two writes per line let their lines interleave.
        logger_factory=structlog.WriteLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=True,
    )


class _ProcessContext:
    """Adds fixed key-value pairs to every event (an event's own value wins)."""

    def __init__(self, context: Mapping[str, object]) -> None:
        self._context = dict(context)

    def __call__(
        self, _logger: Any, _method: str, event: MutableMapping[str, Any]
    ) -> MutableMapping[str, Any]:
        for key, value in self._context.items():
            event.setdefault(key, value)
        return event
