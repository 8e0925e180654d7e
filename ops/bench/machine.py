"""A description of the machine and the software versions, stored with every result."""

from __future__ import annotations

import os
import platform
import re
import subprocess
from importlib import metadata
from pathlib import Path
from typing import Any

import confluent_kafka
import psycopg

REPO = Path(__file__).resolve().parents[2]


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _memory_gib() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 1024 / 1024, 1)
    except OSError:
        pass
    return None


def load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def _git_commit() -> str | None:
    done = subprocess.run(
        ["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
        check=False,
        capture_output=True,
        text=True,
    )
    dirty = subprocess.run(
        ["git", "-C", str(REPO), "status", "--porcelain", "--", "consumer", "sinks"],
        check=False,
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        return None
    return done.stdout.strip() + (" (consumer/ or sinks/ modified)" if dirty.stdout.strip() else "")


def _kafka_version() -> str:
    found = re.search(
        r"<kafka.version>([^<]+)</kafka.version>", (REPO / "ops/kafka/pom.xml").read_text()
    )
    return found.group(1) if found else "unknown"


def describe(dsn: str, peer_version: str | None) -> dict[str, Any]:
    with psycopg.connect(dsn) as db:
        row = db.execute("SHOW server_version").fetchone()
    java = subprocess.run(["java", "-version"], check=False, capture_output=True, text=True)
    return {
        "cpu_model": _cpu_model(),
        "cores": os.cpu_count(),
        "memory_gib": _memory_gib(),
        "kernel": platform.release(),
        "os": platform.platform(),
        "python": platform.python_version(),
        "offsetkeeper": _version("offsetkeeper"),
        "offsetkeeper_commit": _git_commit(),
        "confluent_kafka": _version("confluent-kafka"),
        "librdkafka": confluent_kafka.libversion()[0],
        "psycopg": psycopg.__version__,
        "fastavro": _version("fastavro"),
        "kafka_broker": f"Apache Kafka {_kafka_version()} (KRaft, ops/kafka-local, 1 node)",
        "java": (java.stderr.splitlines() or ["unknown"])[0],
        "postgresql": f"PostgreSQL {row[0] if row else '?'} (ops/postgres-local, fsync on)",
        "peer": peer_version,
    }
