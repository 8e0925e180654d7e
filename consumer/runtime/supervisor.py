"""The supervisor of `offsetkeeper run --workers N`: N members of one consumer group, each a
child process running `offsetkeeper run`, under one parent.

    1. Start. Every worker is started at once, in its own process group (a Ctrl-C in a
       terminal reaches the supervisor only, which forwards it once). Worker i gets
       `OFFSETKEEPER_WORKER=i` and the read end of a pipe whose write end only the supervisor
       holds (`OFFSETKEEPER_SUPERVISOR_FD`): if the supervisor dies without stopping them
       (`kill -9`), the pipe reads end-of-file and each worker stops itself gracefully.
    2. Restart. A worker that exits while the supervisor is not stopping is started again after
       a pause: 1 s, doubling with every further exit that came within 60 s of its start, up to
       30 s; a worker that ran 60 s starts again after 1 s (`RestartPolicy`). Two exits are
       final instead:
       - under `--stop-when-idle`, a worker that exits 0 or 2 stopped on its own, caught up:
         it is finished (once every worker is, the supervisor exits);
       - a worker that failed (exit code not 0, or killed by a signal) 5 times in a row, each
         within 60 s of its start, fails at something a restart cannot fix (a configuration
         error, a crash at start-up): the supervisor gives up on it and stops every worker as
         on SIGTERM.
    3. Stop. The first SIGTERM or SIGINT is forwarded to every worker, and pending restarts
       are cancelled. Each worker commits its batch in hand and exits 0, or aborts at its own
       `shutdown_deadline_s` and exits 5 (`consumer.runtime.shutdown`). A second signal is
       forwarded too (the workers abort at once). A worker still running `shutdown_deadline_s`
       plus `ABORT_GRACE_S` after the first signal (10 s after a second one), when a single
       process would have ended itself, is sent SIGKILL.
    4. Exit code: the worst of the workers' last exits, in the order 1 (an error, a worker
       killed by a signal outside a stop, or given up on), 2 (partitions halted on bad
       records), 5 (a stop cut short: a worker aborted, or was killed at the deadline), 0
       (`worst_exit_code`).

The loop runs in the main thread and ticks every `TICK_S`; signal handlers only record the
signal for the next tick. The HTTP endpoint reads `views()` (a snapshot) from its own threads.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from types import FrameType
from typing import Literal

import structlog

from consumer.core.exit_codes import (
    EXIT_ABORTED,
    EXIT_FAILED,
    EXIT_OK,
    EXIT_PARTITIONS_STOPPED,
)
from consumer.runtime.shutdown import ABORT_GRACE_S

log = structlog.get_logger("offsetkeeper.supervisor")

WORKER_ENV = "OFFSETKEEPER_WORKER"
SUPERVISOR_FD_ENV = "OFFSETKEEPER_SUPERVISOR_FD"
TICK_S = 0.1

# Worst last: the supervisor exits with the last of these that any worker's last exit had.
EXIT_SEVERITY = (EXIT_OK, EXIT_ABORTED, EXIT_PARTITIONS_STOPPED, EXIT_FAILED)

Action = Literal["restart", "finished", "give up"]
State = Literal["starting", "running", "restarting", "finished", "stopped"]
# (worker index, its metrics port or None) -> the worker's command line.
WorkerCommand = Callable[[int, "int | None"], Sequence[str]]


@dataclass(frozen=True, slots=True)
class Decision:
    """What to do with a worker that exited on its own."""

    action: Action
    quick_exits: int  # exits in a row, each within `stable_after_s` of the worker's start
    delay_s: float  # before the restart (0 unless restarting)


@dataclass(frozen=True, slots=True)
class RestartPolicy:
    """See the module docstring, step 2."""

    first_delay_s: float = 1.0
    max_delay_s: float = 30.0
    stable_after_s: float = 60.0
    give_up_after: int = 5

    def delay_s(self, quick_exits: int) -> float:
        """The pause before a restart that follows `quick_exits` quick exits in a row."""
        doublings = min(max(quick_exits - 1, 0), 30)
        return float(min(self.first_delay_s * 2**doublings, self.max_delay_s))

    def decide(
        self, returncode: int, *, uptime_s: float, quick_exits: int, stop_when_idle: bool
    ) -> Decision:
        """A worker exited with `returncode` (negative: killed by that signal) after
        `uptime_s`; `quick_exits` counts the quick exits in a row before this one."""
        if stop_when_idle and returncode in (EXIT_OK, EXIT_PARTITIONS_STOPPED):
            return Decision("finished", 0, 0.0)
        quick = quick_exits + 1 if uptime_s < self.stable_after_s else 0
        if returncode != EXIT_OK and quick >= self.give_up_after:
            return Decision("give up", quick, 0.0)
        return Decision("restart", quick, self.delay_s(quick))


def counted_exit_code(
    returncode: int, *, stopping: bool, killed: bool, forwarded: Iterable[int] = ()
) -> int:
    """The exit code a worker's exit counts as (one of `EXIT_SEVERITY`). During a stop, a worker
    killed by the supervisor's SIGKILL, or by another's signal, had its stop cut short (5);
    one killed by a forwarded SIGTERM or SIGINT had not installed its handlers yet, so had
    nothing in flight (0). Outside a stop a signal is a crash (1), as is an unknown code."""
    if returncode >= 0:
        return returncode if returncode in EXIT_SEVERITY else EXIT_FAILED
    if not stopping:
        return EXIT_FAILED
    if not killed and -returncode in set(forwarded):
        return EXIT_OK
    return EXIT_ABORTED


def worst_exit_code(codes: Iterable[int]) -> int:
    """The worst of `codes` by `EXIT_SEVERITY` (an unknown code counts as 1); 0 for none."""
    known = [code if code in EXIT_SEVERITY else EXIT_FAILED for code in codes]
    return max(known, key=EXIT_SEVERITY.index, default=EXIT_OK)


def describe_returncode(returncode: int) -> dict[str, object]:
    """`exit_code` and `signal` for a log event (Popen's convention: -N is signal N)."""
    if returncode >= 0:
        return {"exit_code": returncode, "signal": None}
    try:
        name = signal.Signals(-returncode).name
    except ValueError:
        name = str(-returncode)
    return {"exit_code": None, "signal": name}


@dataclass(frozen=True, slots=True)
class WorkerView:
    """What the HTTP endpoint may know of a worker (a snapshot)."""

    index: int
    state: State
    pid: int | None
    metrics_port: int | None
    restarts: int
    last_returncode: int | None


@dataclass(slots=True)
class _Worker:
    index: int
    process: subprocess.Popen[bytes] | None = None
    started_at: float = 0.0
    exited_at: float = 0.0
    metrics_port: int | None = None
    quick_exits: int = 0
    restarts: int = 0
    restart_at: float | None = None
    last_returncode: int | None = None
    last_code: int | None = None  # the last exit, as counted (see counted_exit_code)
    finished: bool = False
    killed: bool = False

    def view(self) -> WorkerView:
        state: State
        if self.process is not None:
            state = "running"
        elif self.finished:
            state = "finished"
        elif self.restart_at is not None:
            state = "restarting"
        elif self.last_returncode is None:
            state = "starting"
        else:
            state = "stopped"
        pid = None if self.process is None else self.process.pid
        port = None if self.process is None else self.metrics_port
        return WorkerView(self.index, state, pid, port, self.restarts, self.last_returncode)


def free_loopback_port() -> int:
    """A TCP port free on 127.0.0.1 now (the worker binds it a moment later; should another
    process take it first, that worker fails to start and is restarted on another port)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class Supervisor:
    """See the module docstring. Create it and call `run` in the main thread."""

    def __init__(
        self,
        count: int,
        command: WorkerCommand,
        *,
        deadline_s: float,
        policy: RestartPolicy | None = None,
        stop_when_idle: bool = False,
        metrics_ports: bool = False,
        abort_grace_s: float = ABORT_GRACE_S,
        env: Mapping[str, str] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.count = count
        self._command = command
        self._deadline_s = deadline_s
        self._policy = policy or RestartPolicy()
        self._stop_when_idle = stop_when_idle
        self._metrics_ports = metrics_ports
        self._abort_grace_s = abort_grace_s
        self._env = dict(os.environ if env is None else env)
        self._clock = clock
        self._workers = [_Worker(index) for index in range(count)]
        self._views = tuple(worker.view() for worker in self._workers)
        self._signals: list[int] = []  # appended by the handler, consumed by the loop
        self._handled_signals = 0
        self._forwarded: set[int] = set()
        self._stopping = False
        self._kill_at = 0.0
        self._last_tick = clock()
        # Workers hold the read end, only this process the write end (see step 1).
        self._lifeline_read, self._lifeline_write = os.pipe()

    # -- what the endpoint reads -----------------------------------------------------------

    def views(self) -> tuple[WorkerView, ...]:
        return self._views

    @property
    def stopping(self) -> bool:
        return self._stopping

    def loop_age_s(self) -> float:
        """Seconds since the loop last ran (it runs every `TICK_S`)."""
        return self._clock() - self._last_tick

    # -- signals -----------------------------------------------------------------------------

    def install_signal_handlers(self) -> None:
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, self._on_signal)

    def _on_signal(self, signum: int, _frame: FrameType | None) -> None:
        self.request_stop(signum)

    def request_stop(self, signum: int = signal.SIGTERM) -> None:
        """As if `signum` came. Safe in a signal handler: it only records it, and takes no
        lock (the main thread it interrupts might hold it); the loop sees it within a tick."""
        self._signals.append(signum)

    # -- the loop ------------------------------------------------------------------------------

    def run(self) -> int:
        """Start the workers and supervise them until they are all gone; the exit code."""
        log.info(
            "supervisor_starting",
            workers=self.count,
            deadline_s=self._deadline_s,
            stop_when_idle=self._stop_when_idle,
        )
        try:
            self._take_signals(self._clock())  # a signal before the start: start nothing
            for worker in self._workers:
                if not self._stopping:
                    self._start(worker)
            while not self._done():
                self._tick()
                time.sleep(TICK_S)  # a signal runs its handler at once, then the sleep goes on
        finally:
            self._kill_all("the supervisor failed")
            os.close(self._lifeline_read)
            os.close(self._lifeline_write)
        code = worst_exit_code(w.last_code for w in self._workers if w.last_code is not None)
        log.info(
            "supervisor_stopped",
            exit_code=code,
            workers={w.index: w.last_code for w in self._workers},
            restarts=sum(w.restarts for w in self._workers),
        )
        return code

    def _tick(self) -> None:
        self._last_tick = now = self._clock()
        self._take_signals(now)
        for worker in self._workers:
            process = worker.process
            if process is not None and (returncode := process.poll()) is not None:
                self._exited(worker, returncode, now)
        if self._stopping:
            if now >= self._kill_at:
                self._kill_all("shutdown deadline")
        else:
            for worker in self._workers:
                if worker.restart_at is not None and now >= worker.restart_at:
                    worker.restart_at = None
                    worker.restarts += 1
                    self._start(worker)
        self._publish()

    def _done(self) -> bool:
        if any(worker.process is not None for worker in self._workers):
            return False
        return self._stopping or all(worker.finished for worker in self._workers)

    def _take_signals(self, now: float) -> None:
        while self._handled_signals < len(self._signals):
            signum = self._signals[self._handled_signals]
            self._handled_signals += 1
            if not self._stopping:
                self._begin_stop(signal.Signals(signum).name, signum, now)
                continue
            log.warning("supervisor_signal_again", signal=signal.Signals(signum).name)
            self._kill_at = min(self._kill_at, now + self._abort_grace_s)
            self._forward(signum)

    def _begin_stop(self, reason: str, signum: int, now: float) -> None:
        self._stopping = True
        self._kill_at = now + self._deadline_s + self._abort_grace_s
        for worker in self._workers:
            worker.restart_at = None
        running = [w.index for w in self._workers if w.process is not None]
        log.info(
            "supervisor_stopping",
            reason=reason,
            deadline_s=self._deadline_s,
            kill_after_s=self._deadline_s + self._abort_grace_s,
            running=running,
        )
        self._forward(signum)

    def _forward(self, signum: int) -> None:
        self._forwarded.add(signum)
        for worker in self._workers:
            if worker.process is not None:
                with contextlib.suppress(ProcessLookupError):  # exited: reaped on the next tick
                    worker.process.send_signal(signum)

    def _kill_all(self, reason: str) -> None:
        for worker in self._workers:
            process = worker.process
            if process is None or worker.killed or process.poll() is not None:
                continue
            worker.killed = True
            log.warning("worker_killed", worker=worker.index, pid=process.pid, reason=reason)
            process.kill()
            if reason == "the supervisor failed":
                process.wait()

    def _publish(self) -> None:
        self._views = tuple(worker.view() for worker in self._workers)

    # -- one worker ------------------------------------------------------------------------

    def _start(self, worker: _Worker) -> None:
        port = free_loopback_port() if self._metrics_ports else None
        env = {
            **self._env,
            WORKER_ENV: str(worker.index),
            SUPERVISOR_FD_ENV: str(self._lifeline_read),
        }
        now = self._clock()
        try:
            process = subprocess.Popen(  # noqa: S603 - our own command line, no shell
                list(self._command(worker.index, port)),
                env=env,
                stdin=subprocess.DEVNULL,
                pass_fds=(self._lifeline_read,),
                process_group=0,
            )
        except OSError as exc:
            log.error("worker_start_failed", worker=worker.index, error=str(exc))  # noqa: TRY400
            worker.started_at = now
            self._exited(worker, EXIT_FAILED, now)
            return
        worker.process, worker.started_at, worker.metrics_port = process, now, port
        worker.killed = False
        if worker.restarts:
            log.info(
                "worker_restarted",
                worker=worker.index,
                pid=process.pid,
                restarts=worker.restarts,
                down_s=round(now - worker.exited_at, 3),
                metrics_port=port,
            )
        else:
            log.info("worker_started", worker=worker.index, pid=process.pid, metrics_port=port)
        self._publish()

    def _exited(self, worker: _Worker, returncode: int, now: float) -> None:
        pid = None if worker.process is None else worker.process.pid
        uptime = now - worker.started_at
        worker.process, worker.exited_at, worker.last_returncode = None, now, returncode
        details: dict[str, object] = {
            "worker": worker.index,
            "pid": pid,
            "uptime_s": round(uptime, 3),
            **describe_returncode(returncode),
        }
        worker.last_code = counted_exit_code(
            returncode, stopping=self._stopping, killed=worker.killed, forwarded=self._forwarded
        )
        if self._stopping:
            log.info("worker_exited", **details, action="stopped")
            return
        decision = self._policy.decide(
            returncode,
            uptime_s=uptime,
            quick_exits=worker.quick_exits,
            stop_when_idle=self._stop_when_idle,
        )
        worker.quick_exits = decision.quick_exits
        if decision.action == "finished":
            worker.finished = True
            log.info("worker_exited", **details, action="finished")
        elif decision.action == "restart":
            worker.restart_at = now + decision.delay_s
            log.warning("worker_exited", **details, action="restart", restart_in_s=decision.delay_s)
        else:
            worker.last_code = EXIT_FAILED
            log.error(
                "worker_exited", **details, action="give up", quick_exits=decision.quick_exits
            )
            self._begin_stop(f"gave up on worker {worker.index}", signal.SIGTERM, now)
        self._publish()


def watch_supervisor(on_gone: Callable[[], None]) -> bool:
    """In a worker: call `on_gone` (from a thread) once the supervisor is gone, i.e. the pipe
    it handed down reads end-of-file. False when this process is no supervised worker. The
    variable is removed, so that no process this one starts mistakes some fd for the pipe."""
    raw = os.environ.pop(SUPERVISOR_FD_ENV, None)
    if raw is None:
        return False
    try:
        fd = int(raw)
        os.fstat(fd)
    except (ValueError, OSError):
        log.warning("supervisor_pipe_unusable", variable=SUPERVISOR_FD_ENV, value=raw)
        return False

    def watch() -> None:
        try:
            while os.read(fd, 1):
                pass  # the supervisor never writes; only end-of-file matters
        except OSError:
            pass
        log.warning("supervisor_gone", action="stopping this worker gracefully")
        on_gone()

    threading.Thread(target=watch, name="offsetkeeper-supervisor-pipe", daemon=True).start()
    return True
