"""Where offsetkeeper's time goes: cumulative time of the engine's parts, from cProfile stats.

cProfile's own overhead inflates the Python-heavy parts (per-record calls) relative to the
C-heavy ones (librdkafka, libpq), so read the shares as an upper bound for the Python side.
"""

from __future__ import annotations

import io
import pstats
from pathlib import Path
from typing import Any

# (label, file suffix or "~" for built-ins, function name)
PARTS: tuple[tuple[str, str, str], ...] = (
    ("Kafka poll: ConfluentBackend.poll_batch", "consumer/_confluent.py", "poll_batch"),
    ("  librdkafka consume()", "~", "<method 'consume' of 'cimpl.Consumer' objects>"),
    ("  RawRecord per message (_raw_record)", "consumer/_confluent.py", "_raw_record"),
    ("group_by_partition", "consumer/_batch.py", "group_by_partition"),
    ("process_partition (decode, app, rows)", "consumer/_batch.py", "process_partition"),
    ("  Record per message (_decoded)", "consumer/_batch.py", "_decoded"),
    ("  JSON decode (_decode_json)", "consumer/_decode.py", "_decode_json"),
    ("  the app's processor", "ok_app.py", "json_row"),
    ("  _keyed_rows (table lookup, key, checks)", "consumer/_batch.py", "_keyed_rows"),
    ("commit_batch (the sink transaction)", "consumer/_commit.py", "commit_batch"),
    ("  merge_rows (dedupe by key)", "consumer/_batch.py", "merge_rows"),
    ("  PostgresSink.write_rows (COPY + merge)", "sinks/_postgres.py", "write_rows"),
    ("    psycopg Copy.write_row", "psycopg/copy.py", "write_row"),
    ("  PostgresSink.save_checkpoints", "sinks/_postgres.py", "save_checkpoints"),
    ("  PostgresSink.commit (COMMIT)", "sinks/_postgres.py", "commit"),
    ("  NullSink.write_rows", "ops/bench/bench_sinks.py", "write_rows"),
    ("advisory Kafka commit", "consumer/_confluent.py", "commit_advisory"),
    ("idle check (watermarks)", "consumer/_engine.py", "_idle_long_enough"),
)


def analyze(stats_path: Path, records: int, text_path: Path) -> dict[str, Any]:
    stats = pstats.Stats(str(stats_path))
    table: dict[tuple[str, int, str], Any] = stats.stats  # type: ignore[attr-defined]
    total = 0.0
    for (filename, _line, name), entry in table.items():
        if filename.endswith("consumer/_engine.py") and name == "run":
            total = max(total, entry[3])
    parts = []
    for label, suffix, name in PARTS:
        seconds = sum(
            entry[3]
            for (filename, _line, fn), entry in table.items()
            if fn == name and (filename == suffix if suffix == "~" else filename.endswith(suffix))
        )
        if seconds:
            parts.append(
                {
                    "part": label,
                    "seconds": round(seconds, 2),
                    "share": seconds / total if total else 0.0,
                }
            )
    buffer = io.StringIO()
    pstats.Stats(str(stats_path), stream=buffer).sort_stats("tottime").print_stats(30)
    buffer.write("\n\n")
    pstats.Stats(str(stats_path), stream=buffer).sort_stats("cumulative").print_stats(40)
    text_path.write_text(buffer.getvalue())
    return {"records": records, "total_s": round(total, 2), "parts": parts, "text": text_path.name}
