"""consumer.runtime.supervisor: the restart, stop and exit-code rules, as pure functions, and
the supervisor itself over real child processes (small Python scripts standing in for
`offsetkeeper run`, so no broker is needed)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest

from consumer.core.exit_codes import (
    EXIT_ABORTED,
    EXIT_FAILED,
    EXIT_OK,
    EXIT_PARTITIONS_STOPPED,
)
from consumer.runtime.supervisor import (
    SUPERVISOR_FD_ENV,
    WORKER_ENV,
    RestartPolicy,
    Supervisor,
    counted_exit_code,
    describe_returncode,
    watch_supervisor,
    worst_exit_code,
)
from tests.fixtures.processes import wait_until

# -- the rules ---------------------------------------------------------------------------------


def test_restart_delays_double_from_one_second_up_to_thirty() -> None:
    policy = RestartPolicy()
    assert [policy.delay_s(n) for n in range(8)] == [1, 1, 2, 4, 8, 16, 30, 30]
    assert policy.delay_s(10_000) == 30


def test_quick_exits_in_a_row_back_off_and_a_stable_run_starts_over() -> None:
    policy = RestartPolicy()
    quick = 0
    delays = []
    for _ in range(4):
        decision = policy.decide(-9, uptime_s=5, quick_exits=quick, stop_when_idle=False)
        assert decision.action == "restart"
        quick = decision.quick_exits
        delays.append(decision.delay_s)
    assert delays == [1, 2, 4, 8]
    after_a_long_run = policy.decide(-9, uptime_s=61, quick_exits=quick, stop_when_idle=False)
    assert (after_a_long_run.action, after_a_long_run.delay_s) == ("restart", 1)
    assert after_a_long_run.quick_exits == 0


def test_five_quick_failures_in_a_row_give_up_but_clean_exits_never_do() -> None:
    policy = RestartPolicy()
    assert policy.decide(1, uptime_s=0.5, quick_exits=3, stop_when_idle=False).action == "restart"
    assert policy.decide(1, uptime_s=0.5, quick_exits=4, stop_when_idle=False).action == "give up"
    assert policy.decide(-11, uptime_s=2, quick_exits=4, stop_when_idle=False).action == "give up"
    assert policy.decide(0, uptime_s=0.5, quick_exits=9, stop_when_idle=False).action == "restart"
    assert policy.decide(1, uptime_s=60, quick_exits=4, stop_when_idle=False).action == "restart"


@pytest.mark.parametrize("code", [EXIT_OK, EXIT_PARTITIONS_STOPPED])
def test_under_stop_when_idle_a_clean_or_halted_exit_is_finished(code: int) -> None:
    policy = RestartPolicy()
    assert policy.decide(code, uptime_s=3, quick_exits=0, stop_when_idle=True).action == "finished"
    assert policy.decide(code, uptime_s=3, quick_exits=0, stop_when_idle=False).action == "restart"
    crashed = policy.decide(-9, uptime_s=3, quick_exits=0, stop_when_idle=True)
    assert crashed.action == "restart"


@pytest.mark.parametrize(
    ("returncode", "stopping", "killed", "counted"),
    [
        (0, True, False, EXIT_OK),
        (2, True, False, EXIT_PARTITIONS_STOPPED),
        (5, True, False, EXIT_ABORTED),
        (1, False, False, EXIT_FAILED),
        (3, True, False, EXIT_FAILED),  # no code `run` returns: an error
        (-signal.SIGKILL, True, True, EXIT_ABORTED),  # ours, at the deadline
        (-signal.SIGKILL, True, False, EXIT_ABORTED),  # another's, during the stop
        (-signal.SIGTERM, True, False, EXIT_OK),  # ours, before its handlers were in place
        (-signal.SIGKILL, False, False, EXIT_FAILED),  # a crash while running
    ],
)
def test_what_a_workers_exit_counts_as(
    returncode: int, stopping: bool, killed: bool, counted: int
) -> None:
    forwarded = (signal.SIGTERM,)
    assert (
        counted_exit_code(returncode, stopping=stopping, killed=killed, forwarded=forwarded)
        == counted
    )


def test_the_worst_exit_code_wins_in_the_order_1_2_5_0() -> None:
    assert worst_exit_code([]) == EXIT_OK
    assert worst_exit_code([0, 0]) == EXIT_OK
    assert worst_exit_code([0, 5]) == EXIT_ABORTED
    assert worst_exit_code([5, 2, 0]) == EXIT_PARTITIONS_STOPPED
    assert worst_exit_code([2, 1, 5]) == EXIT_FAILED
    assert worst_exit_code([0, 7]) == EXIT_FAILED


def test_exits_are_described_by_code_or_signal_name() -> None:
    assert describe_returncode(2) == {"exit_code": 2, "signal": None}
    assert describe_returncode(-9) == {"exit_code": None, "signal": "SIGKILL"}


# -- the supervisor over real processes ------------------------------------------------------

# A stand-in worker. argv: directory, mode[, exit code]. It installs its SIGTERM handler, then
# writes "<worker>-<pid>" (holding its env) so the test knows it can take a signal.
#   sleep     exit 0 on SIGTERM (a graceful stop)
#   twice     exit 5 on the second SIGTERM, ignore the first (a stop cut short)
#   stubborn  ignore SIGTERM (a worker the deadline must kill)
#   exit      exit at once with the code given
_WORKER = """
import json, os, signal, sys, time
directory, mode = sys.argv[1], sys.argv[2]
terms = []
def on_term(signum, frame):
    terms.append(signum)
    if mode == "sleep":
        sys.exit(0)
    if mode == "twice" and len(terms) >= 2:
        sys.exit(5)
signal.signal(signal.SIGTERM, on_term)
name = os.path.join(directory, f"{os.environ['OFFSETKEEPER_WORKER']}-{os.getpid()}")
with open(name + ".tmp", "w") as out:
    json.dump({k: v for k, v in os.environ.items() if k.startswith("OFFSETKEEPER_")}, out)
os.rename(name + ".tmp", name)
if mode == "exit":
    sys.exit(int(sys.argv[3]))
while True:
    time.sleep(0.02)
"""

FAST = RestartPolicy(first_delay_s=0.05, max_delay_s=0.2, stable_after_s=30, give_up_after=5)


@dataclass
class Running:
    supervisor: Supervisor
    directory: Path
    thread: threading.Thread
    result: list[int]

    def pids(self, worker: int) -> list[int]:
        """Every pid worker `worker` had so far, in start order."""
        found = [
            (p.stat().st_mtime_ns, int(p.name.split("-")[1]))
            for p in self.directory.glob(f"{worker}-*")
            if not p.name.endswith(".tmp")
        ]
        return [pid for _, pid in sorted(found)]

    def wait_started(self, worker: int, count: int = 1) -> int:
        wait_until(lambda: len(self.pids(worker)) >= count, timeout=20, interval=0.02)
        return self.pids(worker)[-1]

    def exit_code(self, timeout: float = 20) -> int:
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "the supervisor did not return"
        return self.result[0]


Start = Callable[..., Running]


@pytest.fixture
def supervise(tmp_path: Path) -> Iterator[Start]:
    started: list[Running] = []

    def start(
        modes: Sequence[Sequence[str]],
        *,
        deadline_s: float = 5.0,
        abort_grace_s: float = 5.0,
        stop_when_idle: bool = False,
        policy: RestartPolicy = FAST,
    ) -> Running:
        def command(index: int, _port: int | None) -> list[str]:
            return [sys.executable, "-c", _WORKER, str(tmp_path), *modes[index]]

        supervisor = Supervisor(
            len(modes),
            command,
            deadline_s=deadline_s,
            abort_grace_s=abort_grace_s,
            stop_when_idle=stop_when_idle,
            policy=policy,
        )
        result: list[int] = []
        thread = threading.Thread(target=lambda: result.append(supervisor.run()), daemon=True)
        running = Running(supervisor, tmp_path, thread, result)
        started.append(running)
        thread.start()
        return running

    yield start
    for running in started:
        if running.thread.is_alive():
            running.supervisor.request_stop(signal.SIGKILL)
            running.thread.join(30)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie is not alive: the supervisor reaps its children.
    status = Path(f"/proc/{pid}/status")
    return not (status.exists() and "zombie" in status.read_text())


def test_a_killed_worker_is_restarted_and_sigterm_stops_every_worker(supervise: Start) -> None:
    running = supervise([["sleep"], ["sleep"]])
    first = running.wait_started(0)
    other = running.wait_started(1)
    os.kill(first, signal.SIGKILL)
    second = running.wait_started(0, count=2)
    assert second != first
    wait_until(lambda: running.supervisor.views()[0].restarts == 1, timeout=5, interval=0.02)
    assert running.supervisor.views()[0].state == "running"
    assert running.supervisor.views()[1].restarts == 0

    running.supervisor.request_stop(signal.SIGTERM)
    assert running.exit_code() == EXIT_OK
    assert not any(_alive(pid) for pid in (second, other))
    assert [view.state for view in running.supervisor.views()] == ["stopped", "stopped"]


def test_workers_get_their_index_and_the_supervisors_pipe(supervise: Start) -> None:
    running = supervise([["sleep"], ["sleep"], ["sleep"]])
    for worker in range(3):
        pid = running.wait_started(worker)
        env = json.loads((running.directory / f"{worker}-{pid}").read_text())
        assert env[WORKER_ENV] == str(worker)
        assert env[SUPERVISOR_FD_ENV].isdigit()
        # Each in a process group of its own: a terminal's Ctrl-C reaches the supervisor only.
        assert os.getpgid(pid) == pid
    running.supervisor.request_stop()
    assert running.exit_code() == EXIT_OK


def test_a_worker_failing_at_start_is_given_up_on_and_the_rest_stopped(supervise: Start) -> None:
    running = supervise([["sleep"], ["exit", "1"]])
    healthy = running.wait_started(0)
    assert running.exit_code() == EXIT_FAILED
    assert len(running.pids(1)) == FAST.give_up_after
    assert not _alive(healthy)
    assert running.supervisor.views()[1].restarts == FAST.give_up_after - 1


def test_under_stop_when_idle_finished_workers_are_not_restarted(supervise: Start) -> None:
    running = supervise([["exit", "0"], ["exit", "2"]], stop_when_idle=True)
    assert running.exit_code() == EXIT_PARTITIONS_STOPPED
    assert [len(running.pids(w)) for w in (0, 1)] == [1, 1]
    assert [view.state for view in running.supervisor.views()] == ["finished", "finished"]


def test_a_second_signal_is_forwarded_and_the_aborted_stop_exits_5(supervise: Start) -> None:
    running = supervise([["twice"], ["sleep"]])
    running.wait_started(0)
    running.wait_started(1)
    running.supervisor.request_stop(signal.SIGTERM)
    wait_until(lambda: running.supervisor.views()[1].state == "stopped", timeout=10)
    assert running.supervisor.views()[0].state == "running", "the first SIGTERM is graceful"
    running.supervisor.request_stop(signal.SIGTERM)
    assert running.exit_code() == EXIT_ABORTED


def test_a_worker_still_running_after_the_deadline_is_killed(supervise: Start) -> None:
    running = supervise([["stubborn"], ["sleep"]], deadline_s=0.5, abort_grace_s=0.5)
    stubborn = running.wait_started(0)
    running.wait_started(1)
    stopped_at = time.monotonic()
    running.supervisor.request_stop(signal.SIGTERM)
    assert running.exit_code() == EXIT_ABORTED
    took = time.monotonic() - stopped_at
    assert 1.0 <= took < 5, took
    assert not _alive(stubborn)


def test_a_stop_before_the_start_starts_nothing(tmp_path: Path) -> None:
    supervisor = Supervisor(
        2, lambda _i, _p: [sys.executable, "-c", _WORKER, str(tmp_path), "sleep"], deadline_s=1
    )
    supervisor.request_stop()
    assert supervisor.run() == EXIT_OK
    assert list(tmp_path.iterdir()) == []


def test_a_worker_stops_itself_when_the_supervisors_pipe_closes(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    read_end, write_end = os.pipe()
    monkeypatch.setenv(SUPERVISOR_FD_ENV, str(read_end))
    gone = threading.Event()
    try:
        assert watch_supervisor(gone.set)
        assert SUPERVISOR_FD_ENV not in os.environ, "not handed down any further"
        assert not gone.wait(0.2)
        os.close(write_end)  # the supervisor died
        assert gone.wait(5)
    finally:
        os.close(read_end)


def test_no_pipe_no_watch(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(SUPERVISOR_FD_ENV, raising=False)
    assert not watch_supervisor(lambda: None)
    monkeypatch.setenv(SUPERVISOR_FD_ENV, "not-a-number")
    assert not watch_supervisor(lambda: None)


def test_the_supervisor_process_forwards_a_real_sigterm(tmp_path: Path) -> None:
    """The signal handlers, in a real supervisor process of its own."""
    script = f"""
import sys
from consumer.runtime.supervisor import Supervisor
supervisor = Supervisor(
    2, lambda i, p: [sys.executable, "-c", {_WORKER!r}, {str(tmp_path)!r}, "sleep"],
    deadline_s=5,
)
supervisor.install_signal_handlers()
sys.exit(supervisor.run())
"""
    process = subprocess.Popen([sys.executable, "-c", script])
    try:
        wait_until(lambda: len(list(tmp_path.glob("?-*[0-9]"))) == 2, timeout=20, interval=0.02)
        pids = [int(p.name.split("-")[1]) for p in tmp_path.glob("?-*[0-9]")]
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=20) == EXIT_OK
        assert not any(_alive(pid) for pid in pids)
    finally:
        if process.poll() is None:
            process.kill()
