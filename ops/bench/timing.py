"""What every contender measures about itself, the same way, and hands back as one JSON file.

Stdlib only: the peer contender imports it from its own venv.

- `first_record_at`: wall-clock time the first records came back from Kafka;
- `last_commit_at`: wall-clock time the last batch became durable (for the limit, the time the
  last record was decoded);
- throughput = records / (last_commit_at - first_record_at): joining the group, and idling
  after the end, are not throughput (the engine's own `consumer_stopped` figure is the same);
- latency samples: per record, the commit time minus the `ts_ms` the producer stamped on it;
- `peak_rss_kib`: the process's VmHWM just before it writes its result (/proc/self/status; not
  wait4()'s ru_maxrss, which also counts the parent's memory at fork time);
- `first_commit_at` is also written at once to `first_commit_file` (recovery runs read it while
  the process is still running).
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any


def peak_rss_kib(pid: int | str) -> int | None:
    """VmHWM (peak resident set) of a process: its own, not the forking parent's."""
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


class RunClock:
    def __init__(
        self, *, latency: bool = False, first_commit_file: str | os.PathLike[str] | None = None
    ) -> None:
        self.records = 0
        self.batches = 0
        self.first_record_at: float | None = None
        self.first_commit_at: float | None = None
        self.last_commit_at: float | None = None
        self.latency = latency
        self.latencies_ms: list[int] = []
        self._first_commit_file = first_commit_file
        self.extra: dict[str, Any] = {}

    def fetched(self, count: int) -> None:
        if count and self.first_record_at is None:
            self.first_record_at = time.time()

    def committed(self, records: int, ts_ms: list[int] | None = None) -> float:
        now = time.time()
        self.records += records
        self.batches += 1
        self.last_commit_at = now
        if self.first_commit_at is None:
            self.first_commit_at = now
            if self._first_commit_file is not None:
                tmp = Path(f"{self._first_commit_file}.tmp")
                tmp.write_text(json.dumps({"first_commit_at": now, "pid": os.getpid()}))
                tmp.replace(self._first_commit_file)
        if self.latency and ts_ms:
            now_ms = now * 1000.0
            self.latencies_ms.extend(int(now_ms - t) for t in ts_ms)
        return now

    def result(self) -> dict[str, Any]:
        busy = None
        if self.first_record_at is not None and self.last_commit_at is not None:
            busy = self.last_commit_at - self.first_record_at
        return {
            "records": self.records,
            "batches": self.batches,
            "first_record_at": self.first_record_at,
            "first_commit_at": self.first_commit_at,
            "last_commit_at": self.last_commit_at,
            "busy_s": busy,
            "records_per_s": (self.records / busy) if busy and busy > 0 else None,
            "latencies_ms": self.latencies_ms if self.latency else None,
            "peak_rss_kib": peak_rss_kib("self"),
            **self.extra,
        }

    def write(self, path: str | os.PathLike[str]) -> None:
        tmp = Path(f"{path}.tmp")
        tmp.write_text(json.dumps(self.result()))
        tmp.replace(path)
