"""The benchmark's own Kafka broker and PostgreSQL, on free ports, stopped by PID at the end."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import psycopg

REPO = Path(__file__).resolve().parents[2]
# PostgreSQL's shared_buffers for the run (ops/postgres-local sets 32MB, sized for tests).
PG_SHARED_BUFFERS = "256MB"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _ops(script: str, *args: str) -> str:
    done = subprocess.run(
        [str(REPO / "ops" / script), *args],
        check=False,
        capture_output=True,
        text=True,
        timeout=900,
    )
    if done.returncode != 0:
        sys.stderr.write(done.stderr[-4000:])
        raise RuntimeError(f"ops/{script} {args[0]} failed with exit code {done.returncode}")
    lines = done.stdout.strip().splitlines()
    return lines[-1] if lines else ""


def _read_pid(path: Path) -> int | None:
    try:
        return int(path.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def _kill_by_pid(pid: int | None, timeout_s: float = 30.0) -> None:
    """SIGTERM, then SIGKILL after the timeout; the PID is one this harness started."""
    if pid is None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.2)
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)


@dataclass
class Services:
    bootstrap: str
    dsn: str
    root: Path
    kafka_pid: int | None
    pg_pid: int | None

    @property
    def kafka_dir(self) -> Path:
        return self.root / "kafka"

    @property
    def pg_dir(self) -> Path:
        return self.root / "pg"

    def stop(self) -> None:
        """Stop both servers by the PIDs recorded at start; then remove their data."""
        for script, data_dir, pid in (
            ("kafka-local", self.kafka_dir, self.kafka_pid),
            ("postgres-local", self.pg_dir, self.pg_pid),
        ):
            with contextlib.suppress(RuntimeError, subprocess.TimeoutExpired):
                _ops(script, "stop", "--data-dir", str(data_dir))
            _kill_by_pid(pid)  # no-op when the stop command already ended it
        subprocess.run(["rm", "-rf", str(self.root)], check=False)


def start(log: callable) -> Services:  # type: ignore[valid-type]
    """Start a broker and a database in a fresh temporary directory (mode 755, so that the
    postgres OS user can reach its data dir)."""
    root = Path(tempfile.mkdtemp(prefix="okbench-"))
    root.chmod(0o755)
    services = Services("", "", root, None, None)
    try:
        kafka_port, controller_port = free_port(), free_port()
        log(f"starting Kafka on 127.0.0.1:{kafka_port}")
        services.bootstrap = _ops(
            "kafka-local",
            "start",
            "--port",
            str(kafka_port),
            "--controller-port",
            str(controller_port),
            "--data-dir",
            str(services.kafka_dir),
        )
        services.kafka_pid = _read_pid(services.kafka_dir / "kafka.pid")
        pg_port = free_port()
        log(f"starting PostgreSQL on 127.0.0.1:{pg_port}")
        services.dsn = _ops(
            "postgres-local", "start", "--port", str(pg_port), "--data-dir", str(services.pg_dir)
        )
        # A larger buffer cache than the test default, for a table of 800k rows: stop, append
        # the setting (the last one in the file wins), start again on the same cluster.
        _ops("postgres-local", "stop", "--data-dir", str(services.pg_dir))
        with (services.pg_dir / "postgresql.conf").open("a") as conf:
            conf.write(f"\n# okbench\nshared_buffers = {PG_SHARED_BUFFERS}\n")
        services.dsn = _ops(
            "postgres-local",
            "start",
            "--reuse",
            "--port",
            str(pg_port),
            "--data-dir",
            str(services.pg_dir),
        )
        with psycopg.connect(services.dsn) as db:
            shown = db.execute("SHOW shared_buffers").fetchone()
        log(f"PostgreSQL shared_buffers = {shown[0] if shown else '?'}")
        services.pg_pid = _read_pid(services.pg_dir / "postmaster.pid")
    except BaseException:
        services.stop()
        raise
    return services
