"""The engine alone, CPU only: records/s of offsetkeeper's batch path (decode, process, key and
check rows, merge, commit) into an in-memory sink, with no broker and no database, so that two
versions of the code can be compared with far less noise than the end-to-end bench.

    .venv/bin/python ops/bench/engine_only.py --tree /path/to/old/checkout --tree . [--rounds 5]

Each round runs every tree once, in a fresh subprocess (the tree's own .venv where it has one,
PYTHONPATH=tree), in turn, so slow
drift of the machine spreads over all of them; the report gives each tree's median and best
records/s and its ratio to the first tree. The workload is the bench's own (workload.py): JSON
orders of about 200 bytes over 6 partitions, batches of 2,000.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
BATCH = 2000  # records per polled batch, as in the end-to-end bench


def _child(records: int) -> None:
    """Runs inside the subprocess: whichever `consumer` PYTHONPATH selects."""
    sys.path.insert(0, str(HERE))
    import logging  # noqa: PLC0415

    import ok_app  # noqa: PLC0415 - the bench app, from this directory
    import structlog  # noqa: PLC0415
    import workload  # noqa: PLC0415

    # The same for every tree: logs would cost more than the work measured.
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))

    try:  # releases before the engine had its own package
        from consumer._engine import Engine, EngineSettings  # type: ignore[import-not-found]  # noqa: PLC0415
    except ImportError:
        from consumer.engine.group import Engine, EngineSettings  # noqa: PLC0415
    from consumer import RawRecord, TopicPartition  # noqa: PLC0415

    tps = [TopicPartition("bench", p) for p in range(workload.PARTITIONS)]
    batches: list[list[Any]] = []
    batch: list[Any] = []
    offsets = dict.fromkeys(range(workload.PARTITIONS), 0)
    for partition, key, fields in workload.records(records, "json"):
        fields["ts_ms"] = 0
        batch.append(
            RawRecord(
                topic="bench",
                partition=partition,
                offset=offsets[partition],
                timestamp_ms=0,
                key=key.encode(),
                value=json.dumps(fields).encode(),
                headers=(),
            )
        )
        offsets[partition] += 1
        if len(batch) == BATCH:
            batches.append(batch)
            batch = []
    if batch:
        batches.append(batch)
    sink = _MemorySink()
    engine = Engine(ok_app.json_app, EngineSettings(group="g", topics=("bench",)), _Backend(), sink)
    engine.start()
    engine.on_assigned(tps)
    began = time.process_time()
    for polled in batches:
        engine.step(polled)
    getattr(engine, "settle", lambda: None)()  # pipelined engines: the batch in flight
    getattr(engine, "abandon", lambda: None)()
    spent = time.process_time() - began
    if engine.records_committed != records:
        raise SystemExit(f"committed {engine.records_committed} of {records} records")
    print(json.dumps({"records": records, "rows": len(sink.rows), "rate": records / spent}))


class _Backend:
    def pause(self, partitions: Any) -> None: ...

    def resume(self, partitions: Any) -> None: ...

    def commit_advisory(self, next_offsets: Any) -> None: ...

    def watermarks(self, partition: Any, timeout_s: float = 10.0) -> tuple[int, int]:
        return 0, 10**9

    def group_metadata(self) -> object:
        return None


class _MemorySink:
    """Keeps the last row per key and the checkpoints in dicts: the engine's cost, not I/O."""

    writes_per_partition = False
    description = "memory"

    def __init__(self) -> None:
        self.rows: dict[Any, Any] = {}
        self.checkpoints: dict[Any, Any] = {}

    def open(self, tables: Any) -> None: ...

    def acquire(self, group: str, partitions: Any) -> dict[Any, int]:
        return dict.fromkeys(partitions, 1)

    def load_checkpoints(self, group: str, partitions: Any = None) -> dict[Any, Any]:
        return {}

    def begin(self) -> None: ...

    def write_rows(self, table: Any, rows: Any, origin: Any = None) -> None:
        for row in rows:
            self.rows[row["id"]] = row

    def save_checkpoints(self, group: str, checkpoints: Any, epochs: Any) -> None:
        for checkpoint in checkpoints:
            self.checkpoints[(checkpoint.topic, checkpoint.partition)] = checkpoint

    def commit(self) -> None: ...

    def rollback(self) -> None: ...

    def close(self) -> None: ...


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tree", action="append", type=Path, required=True)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--records", type=int, default=300_000)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        _child(args.records)
        return 0
    rates: dict[Path, list[float]] = {tree.resolve(): [] for tree in args.tree}
    for round_number in range(1, args.rounds + 1):
        for tree, found in rates.items():
            # Each tree with its own environment where it has one (an editable install would
            # otherwise lend its modules to another tree's package).
            python = tree / ".venv" / "bin" / "python"
            done = subprocess.run(
                [str(python) if python.exists() else sys.executable, __file__, "--child",
                 "--tree", str(tree), "--records", str(args.records)],
                capture_output=True, text=True, check=True,
                env={**os.environ, "PYTHONPATH": str(tree), "OFFSETKEEPER_LOG_LEVEL": "warning"},
            )  # fmt: skip
            rate = json.loads(done.stdout.strip().splitlines()[-1])["rate"]
            found.append(rate)
            print(f"round {round_number} {tree}: {rate:,.0f} records/s (CPU)", file=sys.stderr)
    first = statistics.median(next(iter(rates.values())))
    print("| tree | median records/s (CPU) | best | x first tree |")
    print("| --- | ---: | ---: | ---: |")
    for tree, found in rates.items():
        median = statistics.median(found)
        print(f"| `{tree}` | {median:,.0f} | {max(found):,.0f} | {median / first:.3f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
