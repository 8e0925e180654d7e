"""Retries to a deadline: what the engine does with failures that are not about a record (the
sink unreachable, the broker refusing dead letters, the schema registry down)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import structlog

from consumer.core.errors import FencedError, RowsRefusedError, SinkError
from consumer.engine.observer import EngineObserver

log = structlog.get_logger("offsetkeeper.engine")

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """Capped exponential backoff (0.1 s doubling to `max_backoff_s`) until `deadline_s` after
    the first attempt, the last try at the deadline itself; then the last error is raised."""

    deadline_s: float = 120.0
    max_backoff_s: float = 5.0


class Retrier:
    """Runs actions under a `RetryPolicy`. Never retries `FencedError` (a newer owner exists)
    nor `RowsRefusedError` (the batch's own values were refused): trying again cannot help."""

    def __init__(
        self,
        policy: RetryPolicy,
        *,
        clock: Callable[[], float],
        sleep: Callable[[float], None],
        observer: EngineObserver,
    ) -> None:
        self._policy = policy
        self._clock = clock
        self._sleep = sleep
        self._observer = observer
        self._cancelled = False

    def cancel(self) -> None:
        """Retry nothing more: the next failure is final (the loop is being abandoned)."""
        self._cancelled = True

    def sink(self, what: str, action: Callable[[], T]) -> T:
        """Run a sink call, retrying `SinkError`; reported to the observer as sink health."""
        return self.retry(what, action, retry_on=(SinkError,), sink_call=True)

    def retry(
        self,
        what: str,
        action: Callable[[], T],
        *,
        retry_on: tuple[type[Exception], ...],
        sink_call: bool = False,
    ) -> T:
        """Run `action`, retrying `retry_on` errors. Logs `<kind>_retry` and `<kind>_gave_up`
        (with the error's class as `error_type`, e.g. SinkFullError for a full disk), where
        kind is "sink" for sink calls and `what` otherwise. Only a sink call reports
        its success to the observer (sink health); a `SinkError` met anywhere (a state read
        while decoding) reports the failure."""
        kind = "sink" if sink_call else what
        deadline = self._clock() + self._policy.deadline_s
        backoff = 0.1
        attempt = 0
        while True:
            attempt += 1
            began = self._clock()
            try:
                result = action()
            except (FencedError, RowsRefusedError):
                raise  # retrying cannot change a newer owner, nor the values of a batch
            except retry_on as exc:
                if isinstance(exc, SinkError):
                    self._observer.sink_failed(what, exc)
                now = self._clock()
                if self._cancelled or now >= deadline:
                    log.error(  # noqa: TRY400 - the caller reports the error; no traceback twice
                        f"{kind}_gave_up",
                        action=what,
                        attempts=attempt,
                        error_type=type(exc).__name__,
                        error=str(exc),
                    )
                    raise
                # The last wait ends at the deadline, and one more try is made there: a sink
                # that comes back (space freed) just before the deadline is not given up on.
                wait = min(backoff, deadline - now)
                log.warning(
                    f"{kind}_retry",
                    action=what,
                    attempt=attempt,
                    backoff_s=wait,
                    error_type=type(exc).__name__,
                    error=str(exc),
                )
                self._sleep(wait)
                backoff = min(backoff * 2, self._policy.max_backoff_s)
            else:
                if sink_call:
                    self._observer.sink_succeeded(what, self._clock() - began)
                return result
