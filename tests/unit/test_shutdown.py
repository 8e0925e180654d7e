"""consumer.runtime.shutdown: real signals, a real watchdog thread, a fake hard exit."""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from consumer.core.exit_codes import EXIT_ABORTED
from consumer.runtime.shutdown import GracefulShutdown, ShutdownAborted

_HANDLED = (signal.SIGTERM, signal.SIGINT, signal.SIGALRM)


@pytest.fixture(autouse=True)
def _restore_signal_handlers() -> Iterator[None]:
    saved = {signum: signal.getsignal(signum) for signum in _HANDLED}
    yield
    for signum, handler in saved.items():
        signal.signal(signum, handler)


class HardExit:
    """Stands in for os._exit: records the code instead of ending the test run."""

    def __init__(self) -> None:
        self.codes: list[int] = []
        self.called = threading.Event()

    def __call__(self, code: int) -> None:
        self.codes.append(code)
        self.called.set()


def _signal_self(signum: int) -> None:
    """A real signal to this process; its Python handler runs in this (the main) thread as
    soon as raise_signal returns."""
    signal.raise_signal(signum)


def test_the_first_signal_asks_to_stop_and_starts_nothing_else(
    log_events: list[dict[str, Any]],
) -> None:
    shutdown = GracefulShutdown(deadline_s=30)
    stops: list[str] = []
    shutdown.on_request(lambda: stops.append("engine"))

    _signal_self(signal.SIGTERM)

    assert shutdown.requested
    assert stops == ["engine"]
    late: list[str] = []
    shutdown.on_request(lambda: late.append("late"))  # registered after the signal: at once
    assert late == ["late"]
    [requested] = [e for e in log_events if e["event"] == "shutdown_requested"]
    assert (requested["signal"], requested["deadline_s"]) == ("SIGTERM", 30)
    shutdown.disarm()


def test_sigint_is_a_stop_request_too() -> None:
    shutdown = GracefulShutdown(deadline_s=30)

    _signal_self(signal.SIGINT)

    assert shutdown.requested
    shutdown.disarm()


def test_a_second_signal_aborts_with_exit_code_5(log_events: list[dict[str, Any]]) -> None:
    shutdown = GracefulShutdown(deadline_s=30)
    _signal_self(signal.SIGTERM)

    with pytest.raises(ShutdownAborted) as caught:
        _signal_self(signal.SIGTERM)

    assert caught.value.code == EXIT_ABORTED == 5
    assert caught.value.reason == "second SIGTERM"
    assert isinstance(caught.value, SystemExit)
    [aborted] = [e for e in log_events if e["event"] == "shutdown_aborted"]
    assert aborted["reason"] == "second SIGTERM"
    assert aborted["exit_code"] == 5
    shutdown.disarm()


def test_the_deadline_interrupts_a_blocking_call_in_the_main_thread() -> None:
    shutdown = GracefulShutdown(deadline_s=0.3)
    _signal_self(signal.SIGTERM)
    began = time.monotonic()

    with pytest.raises(ShutdownAborted) as caught:
        time.sleep(20)  # a blocking system call, like a wait on the database

    assert caught.value.reason == "deadline"
    assert time.monotonic() - began < 5
    shutdown.disarm()


def test_signals_during_the_abort_are_ignored() -> None:
    shutdown = GracefulShutdown(deadline_s=30)
    _signal_self(signal.SIGTERM)
    with pytest.raises(ShutdownAborted):
        _signal_self(signal.SIGTERM)

    _signal_self(signal.SIGTERM)  # a third one: no second abort raised mid-cleanup

    shutdown.disarm()


def test_an_abort_that_cannot_finish_ends_the_process_hard(
    log_events: list[dict[str, Any]],
) -> None:
    hard_exit = HardExit()
    shutdown = GracefulShutdown(deadline_s=0.2, abort_grace_s=0.3, exit_hard=hard_exit)
    _signal_self(signal.SIGTERM)
    began = time.monotonic()
    with pytest.raises(ShutdownAborted):
        time.sleep(20)

    # The unwinding hangs (a call that never returns): the watchdog ends the process.
    assert hard_exit.called.wait(timeout=10)
    assert hard_exit.codes == [EXIT_ABORTED]
    assert time.monotonic() - began < 5
    assert any(e["event"] == "shutdown_forced" for e in log_events)
    shutdown.disarm()


def test_disarming_after_the_engine_returned_cancels_the_deadline() -> None:
    hard_exit = HardExit()
    shutdown = GracefulShutdown(deadline_s=0.2, abort_grace_s=0.2, exit_hard=hard_exit)
    _signal_self(signal.SIGTERM)

    shutdown.disarm()
    time.sleep(0.8)  # past the deadline and the grace: nothing may happen now

    assert hard_exit.codes == []
    assert shutdown.requested


def test_a_deadline_set_after_the_signal_is_the_one_enforced() -> None:
    # The handlers go in first; the configured deadline is known only once settings load.
    shutdown = GracefulShutdown(deadline_s=60)
    _signal_self(signal.SIGTERM)
    shutdown.deadline_s = 0.2

    began = time.monotonic()
    with pytest.raises(ShutdownAborted):
        time.sleep(20)
    assert time.monotonic() - began < 5
    shutdown.disarm()
