"""The file sink's checksums through the real engine and a real broker: a consumer writes a
file sink; `offsetkeeper checkpoint verify` finds it clean; a committed file altered by one
byte and another truncated are reported (exit 4, each named with table, partition, offsets
and both digests) and the reader refuses them; a directory whose checkpoint document has no
checksums (as 0.2.0 wrote it) still reads, verifies as "no checksum recorded", and is
continued by a consumer that records checksums for its new files."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import pytest

from sinks import CorruptDataFileError, committed_files, read_committed_rows
from tests.apps.chaos import EVENTS, LATEST
from tests.fixtures.chaos import chaos_event
from tests.fixtures.kafka_tools import (
    create_topic,
    end_offsets,
    partition_contents,
    produce,
    unique_name,
)
from tests.fixtures.processes import ConsumerProcess, run_args, run_cli
from tests.fixtures.services import Service

pytestmark = [pytest.mark.integration]

PARTITIONS = 2
EXIT_PROBLEMS_FOUND = 4


def _consume(
    kafka: Service, topic: str, group: str, root: Path, log: Path, consumers: list[ConsumerProcess]
) -> None:
    process = ConsumerProcess(
        run_args(
            "tests.apps.chaos:app",
            kafka.address,
            group,
            topic,
            f"file://{root}",
            "--batch-max-records",
            "40",
            "--stop-when-idle",
            "2",
        ),
        log,
    )
    consumers.append(process)
    assert process.wait(timeout=90) == 0, process.log_path.read_text()[-3000:]


def _verify(kafka: Service, root: Path, group: str, *extra: str) -> tuple[int, str]:
    done = run_cli(
        kafka.address,
        "checkpoint",
        "verify",
        "--sink",
        f"file://{root}",
        "--group",
        group,
        *extra,
        timeout=60,
    )
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    return done.returncode, done.stdout


def _events_by_source(root: Path, group: str) -> dict[tuple[int, int], int]:
    return {
        (row["source_partition"], row["source_offset"]): row["version"]
        for row in read_committed_rows(root, EVENTS, group)
    }


def _expected(contents: dict[int, list[tuple[int, bytes | None, bytes | None]]]) -> dict[Any, int]:
    return {
        (partition, offset): json.loads(value or b"")["version"]
        for partition, records in contents.items()
        for offset, _key, value in records
    }


def test_verify_and_the_reader_catch_an_altered_and_a_truncated_committed_file(
    kafka: Service, tmp_path: Path, consumers: list[ConsumerProcess]
) -> None:
    topic, group = unique_name("file-sums"), unique_name("file-sums")
    create_topic(kafka.address, topic, PARTITIONS)
    produce(kafka.address, topic, (chaos_event(i, 50) for i in range(600)))
    root = tmp_path / "out"
    _consume(kafka, topic, group, root, tmp_path / "first.log", consumers)
    expected = _expected(partition_contents(kafka.address, topic, PARTITIONS))
    assert _events_by_source(root, group) == expected  # row by row, each once

    files = committed_files(root, EVENTS, group) + committed_files(root, LATEST, group)
    code, out = _verify(kafka, root, group)
    assert code == 0, out
    assert f"{len(files)} committed data file(s): {len(files)} match their checksums" in out
    assert "0 problem(s)" in out

    altered, truncated = files[2], [f for f in files if f.partition == 1][-1]
    good = {f.path: f.path.read_bytes() for f in (altered, truncated)}
    content = bytearray(good[altered.path])
    content[len(content) // 2] ^= 0x20  # one byte, e.g. a letter's case
    altered.path.write_bytes(bytes(content))
    truncated.path.write_bytes(good[truncated.path][: len(good[truncated.path]) // 2])

    code, out = _verify(kafka, root, group)
    assert code == EXIT_PROBLEMS_FOUND, out
    assert "2 problem(s)" in out
    lines = {line.split(":", 1)[0].strip(): line for line in out.splitlines() if ": /" in line}
    assert set(lines) == {"altered", "truncated"}, out
    for status, data_file in (("altered", altered), ("truncated", truncated)):
        line = lines[status]
        assert str(data_file.path) in line
        assert f"{data_file.topic}[{data_file.partition}]" in line
        assert f"offsets {data_file.first_offset}..{data_file.last_offset}" in line
        assert f"table {data_file.path.parent.parent.name}" in line
        assert f"expected sha256 {hashlib.sha256(good[data_file.path]).hexdigest()}" in line
        assert f"actual {hashlib.sha256(data_file.path.read_bytes()).hexdigest()}" in line

    table = EVENTS if altered.path.parent.parent.name == EVENTS.name else LATEST
    with pytest.raises(CorruptDataFileError, match="altered") as caught:
        list(read_committed_rows(root, table, group))
    assert caught.value.context["path"] == str(altered.path)
    with pytest.raises(CorruptDataFileError, match="truncated"):
        committed_files(root, truncated.path.parent.parent.name, group)

    for path, original in good.items():  # restored: clean again
        path.write_bytes(original)
    assert _verify(kafka, root, group)[0] == 0


def test_a_sink_without_checksums_still_reads_and_is_continued_with_them(
    kafka: Service, tmp_path: Path, consumers: list[ConsumerProcess]
) -> None:
    topic, group = unique_name("file-sums-old"), unique_name("file-sums-old")
    create_topic(kafka.address, topic, PARTITIONS)
    produce(kafka.address, topic, (chaos_event(i, 50) for i in range(300)))
    root = tmp_path / "out"
    _consume(kafka, topic, group, root, tmp_path / "first.log", consumers)
    # The document as 0.2.0 wrote it: the same document version, no "digests".
    document = root / "_offsetkeeper" / "checkpoints" / f"{group}.json"
    stored = json.loads(document.read_text())
    del stored["digests"]
    old_next = {c["partition"]: c["next_offset"] for c in stored["checkpoints"]}
    document.write_text(json.dumps(stored, indent=1))
    old_files = len(committed_files(root, EVENTS, group)) + len(
        committed_files(root, LATEST, group)
    )
    assert all(f.sha256 is None for f in committed_files(root, EVENTS, group))
    assert _events_by_source(root, group) == _expected(
        partition_contents(kafka.address, topic, PARTITIONS)
    )
    code, out = _verify(kafka, root, group)
    assert code == 0, out
    assert f"{old_files} with no checksum recorded, 0 problem(s)" in out
    code, out = _verify(kafka, root, group, "--require-checksums")
    assert code == EXIT_PROBLEMS_FOUND, out
    assert f"{old_files} problem(s)" in out

    produce(kafka.address, topic, (chaos_event(i, 50) for i in range(300, 500)))
    _consume(kafka, topic, group, root, tmp_path / "second.log", consumers)
    contents = partition_contents(kafka.address, topic, PARTITIONS)
    assert sum(len(r) for r in contents.values()) == 500
    assert _events_by_source(root, group) == _expected(contents)
    for data_file in committed_files(root, EVENTS, group):  # recorded: exactly its new files
        assert (data_file.sha256 is None) == (
            data_file.first_offset < old_next[data_file.partition]
        )
    code, out = _verify(kafka, root, group)
    assert code == 0, out
    assert f"{old_files} with no checksum recorded, 0 problem(s)" in out
    sink_files = len(committed_files(root, EVENTS, group)) + len(
        committed_files(root, LATEST, group)
    )
    assert f"{sink_files - old_files} match their checksums" in out
    assert end_offsets(kafka.address, topic, PARTITIONS) == {
        p: len(records) for p, records in contents.items()
    }
