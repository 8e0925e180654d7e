"""A signal the kernel delivers to another thread reaches its Python handler while the main
thread waits for the committer thread (BatchLoop.settle / abandon). An untimed wait ran the
handler only once the commit ended: with the batch held on a database lock, SIGTERM's graceful
stop did not begin until the lock went away (test_operations' SIGTERM tests, 1 run in 6)."""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest

from consumer.engine.loop import SIGNAL_CHECK_S, wait_for_outcome


@pytest.fixture
def handler_runs() -> Iterator[list[float]]:
    runs: list[float] = []
    previous = signal.signal(signal.SIGUSR1, lambda *_: runs.append(time.monotonic()))
    yield runs
    signal.signal(signal.SIGUSR1, previous)


def test_a_signal_delivered_to_the_committer_thread_runs_its_handler_during_the_wait(
    handler_runs: list[float],
) -> None:
    release = threading.Event()
    worker: list[int] = []

    def commit() -> str:
        worker.append(threading.get_ident())
        release.wait(5)  # a batch held on a lock, released by the handler (or, failing, in 5 s)
        return "committed"

    with ThreadPoolExecutor(1) as committer:
        future = committer.submit(commit)
        while not worker:
            time.sleep(0.01)

        def deliver() -> None:
            time.sleep(0.2)
            sent.append(time.monotonic())
            signal.pthread_kill(worker[0], signal.SIGUSR1)  # to the committer, not the main thread

        sent: list[float] = []
        threading.Thread(target=deliver).start()
        original = signal.getsignal(signal.SIGUSR1)

        def on_signal(*_: object) -> None:
            assert callable(original)
            original(signal.SIGUSR1, None)
            release.set()

        signal.signal(signal.SIGUSR1, on_signal)
        started = time.monotonic()
        assert wait_for_outcome(future) is None
        waited = time.monotonic() - started
    assert len(handler_runs) == 1
    assert handler_runs[0] - sent[0] < SIGNAL_CHECK_S + 0.5
    assert waited < 2.0, "the handler ran only when the commit ended"


def test_the_outcome_is_the_commits_own_error() -> None:
    with ThreadPoolExecutor(1) as committer:
        failed = committer.submit(lambda: 1 / 0)
        assert isinstance(wait_for_outcome(failed), ZeroDivisionError)
        # A commit that itself raised TimeoutError is an outcome, not a reason to wait on.
        timed_out = committer.submit(lambda: (_ for _ in ()).throw(TimeoutError("db")))
        assert isinstance(wait_for_outcome(timed_out), TimeoutError)
