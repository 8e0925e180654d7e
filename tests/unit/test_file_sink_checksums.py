"""sinks._file_digests and _file_verify: the SHA-256 of every committed data file, recorded by
the checkpoint document (bounded: a few inline, the rest in sealed segments), checked by
`FileSink.verify_data_files` and by the reader; moving a checkpoint back drops the digests of
the files it uncommits; a directory written before checksums reads as before."""

from __future__ import annotations

import hashlib
import io
import json
import shutil
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from consumer import Checkpoint, RowsOrigin, SinkError, Table, TopicPartition
from consumer.cli.data_checks import DataFileReport, DataFileVerifier, report_data_files
from sinks import (
    CorruptDataFileError,
    DataFileCheck,
    FileSink,
    committed_files,
    read_committed_rows,
)
from sinks._file_digests import INLINE_DIGESTS
from tests.fixtures.processes import REPO

GROUP = "g"
TP0 = TopicPartition("orders", 0)
TP1 = TopicPartition("orders", 1)
WHEN = datetime(2026, 12, 3, 9, 0, tzinfo=UTC)
ORDERS = Table(name="orders", columns={"id": "text", "amount": "bigint"}, key=("id",))
NOTES = Table(name="notes", columns={"id": "text", "text": "text"}, key=("id",))
GOLDEN = REPO / "tests" / "fixtures" / "checkpoints" / "file-sink-0.2.0"


def _rows(tp: TopicPartition, first: int, next_offset: int, salt: str = "") -> list[Any]:
    return [{"id": f"o-{tp.partition}-{o}{salt}", "amount": o} for o in range(first, next_offset)]


class Writer:
    """A file sink driven the way the engine drives it, one committed batch at a time."""

    def __init__(self, root: Path, partitions: tuple[TopicPartition, ...] = (TP0, TP1)) -> None:
        self.sink = FileSink(root, lock_timeout_s=1.0)
        self.sink.open([ORDERS, NOTES])
        self.epochs = self.sink.acquire(GROUP, partitions)

    def batch(
        self, ranges: dict[TopicPartition, tuple[int, int]], *, salt: str = "", notes: bool = False
    ) -> None:
        self.sink.begin()
        try:
            for tp, (first, next_offset) in ranges.items():
                origin = RowsOrigin(GROUP, tp, first, next_offset)
                rows = _rows(tp, first, next_offset, salt)
                self.sink.write_rows(ORDERS, rows[:1], origin)  # two writes: one file, one digest
                self.sink.write_rows(ORDERS, rows[1:], origin)
                if notes:
                    self.sink.write_rows(NOTES, [{"id": "n", "text": salt}], origin)
            checkpoints = [
                Checkpoint(GROUP, tp.topic, tp.partition, nxt, WHEN)
                for tp, (_first, nxt) in ranges.items()
            ]
            self.sink.save_checkpoints(GROUP, checkpoints, {tp: self.epochs[tp] for tp in ranges})
            self.sink.commit()
        except BaseException:
            self.sink.rollback()
            raise

    def batches(self, count: int, size: int = 3, *, start: int = 0) -> None:
        for n in range(count):
            first = start + n * size
            self.batch({tp: (first, first + size) for tp in self.epochs})

    def close(self) -> None:
        self.sink.close()


@pytest.fixture
def root(tmp_path: Path) -> Path:
    return tmp_path / "out"


@pytest.fixture
def writer(root: Path) -> Iterator[Writer]:
    opened = Writer(root)
    yield opened
    opened.close()


def _document(root: Path, group: str = GROUP) -> dict[str, Any]:
    path = root / "_offsetkeeper" / "checkpoints" / f"{group}.json"
    loaded: dict[str, Any] = json.loads(path.read_text())
    return loaded


def _chain(root: Path, tp: TopicPartition) -> dict[str, Any]:
    (chain,) = [
        c
        for c in _document(root)["digests"]
        if (c["topic"], c["partition"]) == (tp.topic, tp.partition)
    ]
    return chain


def _segments(root: Path) -> list[Path]:
    return sorted((root / "_offsetkeeper" / "digests" / GROUP).glob("*.jsonl"))


def _verify(root: Path, group: str = GROUP) -> list[DataFileCheck]:
    sink = FileSink(root)
    sink.open_existing()
    try:
        return sink.verify_data_files(group)
    finally:
        sink.close()


def _statuses(checks: list[DataFileCheck]) -> dict[str, int]:
    counted: dict[str, int] = {}
    for check in checks:
        counted[check.status] = counted.get(check.status, 0) + 1
    return counted


def _orders_file(root: Path, tp: TopicPartition, first: int) -> Path:
    (found,) = [
        f.path
        for f in committed_files(root, ORDERS, GROUP)
        if f.topic_partition == tp and f.first_offset == first
    ]
    return found


# -- what is recorded ---------------------------------------------------------------------------


def test_the_digest_is_the_sha256_and_size_of_the_bytes_written(writer: Writer, root: Path) -> None:
    writer.batch({TP0: (0, 4), TP1: (0, 2)}, notes=True)
    files = committed_files(root, ORDERS, GROUP) + committed_files(root, NOTES, GROUP)
    assert len(files) == 4
    for data_file in files:
        content = data_file.path.read_bytes()
        assert data_file.sha256 == hashlib.sha256(content).hexdigest()
        assert data_file.size == len(content)
    (recent,) = [c["recent"] for c in _document(root)["digests"] if c["partition"] == 0]
    assert {(d["table"], d["file"]) for d in recent} == {
        ("notes", "orders+0+00000000000000000000+00000000000000000003.jsonl"),
        ("orders", "orders+0+00000000000000000000+00000000000000000003.jsonl"),
    }
    assert _statuses(_verify(root)) == {"ok": 4}
    assert len(list(read_committed_rows(root, ORDERS, GROUP))) == 6


def test_the_document_stays_bounded_as_files_accumulate(writer: Writer, root: Path) -> None:
    """Per partition, fewer than INLINE_DIGESTS digests inline; the rest in sealed segments
    that each name the one before; every file stays verifiable."""
    sizes = []
    for rounds in range(6):
        writer.batches(INLINE_DIGESTS, start=rounds * INLINE_DIGESTS * 3)
        sizes.append(len((root / "_offsetkeeper/checkpoints/g.json").read_bytes()))
    files = 6 * INLINE_DIGESTS
    for tp in (TP0, TP1):
        chain = _chain(root, tp)
        assert len(chain["recent"]) < INLINE_DIGESTS
        assert chain["sealed"]["count"] == len(
            [p for p in _segments(root) if f"+{tp.partition}+" in p.name]
        )
        assert chain["sealed"]["through"] == files * 3 - 1
    assert len(_segments(root)) == 2 * 6  # one segment per INLINE_DIGESTS files a partition
    assert max(sizes) - min(sizes) < 2 * INLINE_DIGESTS * 250, sizes  # does not grow with files
    checks = _verify(root)
    assert _statuses(checks) == {"ok": 2 * files}
    header = json.loads(_segments(root)[0].read_text().splitlines()[0])
    assert header["kind"] == "offsetkeeper-file-digests"


# -- what is reported and refused ----------------------------------------------------------------


def test_an_altered_and_a_truncated_file_are_reported_and_never_read(
    writer: Writer, root: Path
) -> None:
    writer.batches(INLINE_DIGESTS + 2)  # digests both sealed and inline
    altered = _orders_file(root, TP0, 3)  # sealed
    truncated = _orders_file(root, TP1, (INLINE_DIGESTS + 1) * 3)  # inline
    good_digest = hashlib.sha256(altered.read_bytes()).hexdigest()
    content = bytearray(altered.read_bytes())
    content[10] ^= 0x01  # one byte, the size unchanged
    altered.write_bytes(bytes(content))
    truncated.write_bytes(truncated.read_bytes()[:-7])

    problems = [c for c in _verify(root) if c.problem]
    assert [(c.status, Path(c.path)) for c in problems] == [
        ("altered", altered),
        ("truncated", truncated),
    ]
    first = problems[0]
    assert (first.table, first.group, first.partition) == ("orders", GROUP, 0)
    assert (first.first_offset, first.last_offset) == (3, 5)
    assert first.expected_sha256 == good_digest
    assert first.actual_sha256 == hashlib.sha256(altered.read_bytes()).hexdigest()
    assert problems[1].actual_bytes == problems[1].expected_bytes - 7  # type: ignore[operator]

    with pytest.raises(CorruptDataFileError, match="truncated") as caught:
        committed_files(root, ORDERS, GROUP)  # a size that differs: refused without reading
    assert caught.value.context["path"] == str(truncated)
    truncated.unlink()  # from here on: gone (and reported so)
    assert "missing" in {c.status for c in _verify(root)}
    files = committed_files(root, ORDERS, GROUP)  # the altered file has its size: listed
    assert altered in [f.path for f in files]
    with pytest.raises(CorruptDataFileError, match="altered") as caught:
        committed_files(root, ORDERS, GROUP, verify=True)
    with pytest.raises(CorruptDataFileError, match="altered") as caught:
        list(read_committed_rows(root, ORDERS, GROUP))
    context = caught.value.context
    assert context["offsets"] == (3, 5)
    assert (context["table"], context["group"], context["partition"]) == ("orders", GROUP, 0)
    assert context["expected_sha256"] == good_digest


def test_a_damaged_segment_is_reported_and_the_reader_refuses_its_partition(
    writer: Writer, root: Path
) -> None:
    writer.batches(INLINE_DIGESTS + 1)
    segment = next(p for p in _segments(root) if "+1+" in p.name)
    segment.write_text(segment.read_text().replace('"bytes":', '"bytes": ', 1))
    checks = _verify(root)
    damaged = [c for c in checks if c.status == "checksums damaged"]
    assert {c.partition for c in damaged} == {1}
    assert len(damaged) == INLINE_DIGESTS  # the files whose digests it held
    assert all("altered" in (c.detail or "") for c in damaged)
    assert _statuses([c for c in checks if c.partition == 0]) == {"ok": INLINE_DIGESTS + 1}
    with pytest.raises(SinkError, match="checksum segment is altered"):
        list(read_committed_rows(root, ORDERS, GROUP))
    # A new owner still gets the partition (it keeps the segment for verify to report).
    writer.close()
    again = Writer(root)
    again.batches(1, start=(INLINE_DIGESTS + 1) * 3)
    again.close()
    assert segment.exists()


# -- moving a checkpoint back --------------------------------------------------------------------


def _reset(root: Path, tp: TopicPartition, next_offset: int) -> None:
    """What `offsetkeeper checkpoint reset` does (consumer.cli.checkpoint_tools)."""
    sink = FileSink(root)
    sink.open(())
    epochs = sink.acquire(GROUP, [tp])
    sink.begin()
    sink.save_checkpoints(
        GROUP, [Checkpoint(GROUP, tp.topic, tp.partition, next_offset, WHEN)], epochs
    )
    sink.commit()
    sink.close()


@pytest.mark.parametrize("back_to_batch", [INLINE_DIGESTS + 1, 2])  # inline; into the sealed
def test_a_checkpoint_moved_back_drops_the_digests_of_the_files_it_uncommits(
    root: Path, back_to_batch: int
) -> None:
    writer = Writer(root)
    writer.batches(INLINE_DIGESTS + 3)
    writer.close()
    segments_before = _segments(root)
    boundary = back_to_batch * 3
    _reset(root, TP0, boundary)
    recorded = [d["file"] for d in _chain(root, TP0)["recent"]]
    if "sealed" in _chain(root, TP0):
        assert _chain(root, TP0)["sealed"]["through"] < boundary
    assert all(int(name.split("+")[3][:20]) < boundary for name in recorded)
    assert _statuses(_verify(root)) == {"ok": back_to_batch + INLINE_DIGESTS + 3}

    # The range is consumed again by a fixed app: other rows in files of the same names.
    writer = Writer(root, (TP0,))  # acquire deletes the uncommitted files and segments
    for n in range(back_to_batch, INLINE_DIGESTS + 3):
        writer.batch({TP0: (n * 3, n * 3 + 3)}, salt="-fixed")
    writer.close()
    assert _statuses(_verify(root)) == {"ok": 2 * (INLINE_DIGESTS + 3)}
    rows = [r for r in read_committed_rows(root, ORDERS, GROUP) if r["id"].startswith("o-0-")]
    assert [r["amount"] for r in rows] == list(range((INLINE_DIGESTS + 3) * 3))
    assert sum(r["id"].endswith("-fixed") for r in rows) == (INLINE_DIGESTS + 3 - back_to_batch) * 3
    if back_to_batch == 2:  # the dropped chain's segments are gone; partition 1's are kept
        assert set(_segments(root)) & set(segments_before) == {
            p for p in segments_before if "+1+" in p.name
        }


def test_a_segment_of_a_batch_that_never_committed_is_removed_by_the_next_acquire(
    writer: Writer, root: Path
) -> None:
    writer.batches(INLINE_DIGESTS - 1)
    writer.sink.begin()
    writer.sink.write_rows(ORDERS, _rows(TP0, 45, 48), RowsOrigin(GROUP, TP0, 45, 48))
    writer.sink.save_checkpoints(
        GROUP, [Checkpoint(GROUP, "orders", 0, 48, WHEN)], {TP0: writer.epochs[TP0]}
    )
    assert len(_segments(root)) == 1  # sealed under the lock, before the document
    writer.sink.rollback()
    assert "sealed" not in _chain(root, TP0)
    writer.close()
    Writer(root).close()
    assert _segments(root) == []
    assert _statuses(_verify(root)) == {"ok": 2 * (INLINE_DIGESTS - 1)}


# -- documents written before checksums ------------------------------------------------------------


def test_a_directory_written_before_checksums_reads_and_is_continued(tmp_path: Path) -> None:
    root = tmp_path / "golden"
    shutil.copytree(GOLDEN, root)
    assert "digests" not in json.loads((root / "_offsetkeeper/checkpoints/golden.json").read_text())
    rows = list(read_committed_rows(root, ORDERS, "golden"))
    assert [r["id"] for r in rows][:4] == ["o-0-0", "o-0-1", "o-0-2", "o-0-3"]
    assert len(rows) == 18
    assert all(f.sha256 is None for f in committed_files(root, ORDERS, "golden"))
    assert _statuses(_verify(root, "golden")) == {"no checksum recorded": 6}
    assert not any(c.problem for c in _verify(root, "golden"))

    sink = FileSink(root)
    sink.open([ORDERS])
    epochs = sink.acquire("golden", [TP0])
    sink.begin()
    sink.write_rows(ORDERS, _rows(TP0, 9, 12), RowsOrigin("golden", TP0, 9, 12))
    sink.save_checkpoints("golden", [Checkpoint("golden", "orders", 0, 12, WHEN)], epochs)
    sink.commit()
    assert sink.migrate_checkpoints() == []  # nothing older to rewrite, digests kept
    sink.close()
    assert _statuses(_verify(root, "golden")) == {"no checksum recorded": 6, "ok": 1}
    assert len(list(read_committed_rows(root, ORDERS, "golden"))) == 21


@pytest.mark.parametrize(
    "digests",
    [
        {"topic": "orders"},
        [{"topic": "orders", "partition": 0, "recent": [{"file": "x.jsonl"}]}],
        [
            {
                "topic": "orders",
                "partition": 0,
                "recent": [
                    {
                        "table": "orders",
                        "file": "orders+1+00000000000000000000+00000000000000000002.jsonl",
                        "sha256": "0" * 64,
                        "bytes": 1,
                    }
                ],
            }
        ],
        [{"topic": "orders", "partition": 0, "recent": [], "sealed": {"segment": "../x"}}],
    ],
)
def test_a_hostile_digests_entry_is_a_sink_error(tmp_path: Path, digests: Any) -> None:
    root = tmp_path / "golden"
    shutil.copytree(GOLDEN, root)
    path = root / "_offsetkeeper/checkpoints/golden.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "digests": digests}))
    with pytest.raises(SinkError, match=r"digests|checksum"):
        committed_files(root, ORDERS, "golden")


# -- what `checkpoint verify` prints ---------------------------------------------------------------


def test_the_file_sink_is_what_checkpoint_verify_checks(writer: Writer, root: Path) -> None:
    writer.batches(2)
    assert isinstance(writer.sink, DataFileVerifier)
    check = _verify(root)[0]
    for name in dir(DataFileReport):  # every attribute the CLI reads is there
        if not name.startswith("_"):
            getattr(check, name)


def test_checkpoint_verify_reports_each_problem_and_counts_unrecorded_only_if_required(
    writer: Writer, root: Path
) -> None:
    writer.batches(3)
    altered = _orders_file(root, TP1, 3)
    expected = hashlib.sha256(altered.read_bytes()).hexdigest()
    altered.write_bytes(altered.read_bytes().replace(b"o-1-3", b"o-1-X"))
    out = io.StringIO()
    assert report_data_files(out, GROUP, _verify(root), require_checksums=False) == 1
    text = out.getvalue()
    assert "6 committed data file(s): 5 match their checksums, 0 with no checksum recorded" in text
    (line,) = [line for line in text.splitlines() if line.startswith("  altered: ")]
    assert f"{altered} (table orders, orders[1] offsets 3..5)" in line
    assert f"expected sha256 {expected} ({altered.stat().st_size} bytes)" in line
    assert f"actual {hashlib.sha256(altered.read_bytes()).hexdigest()}" in line

    document = root / "_offsetkeeper" / "checkpoints" / f"{GROUP}.json"
    document.write_text(json.dumps({**json.loads(document.read_text()), "digests": []}))
    out = io.StringIO()
    assert report_data_files(out, GROUP, _verify(root), require_checksums=False) == 0
    assert "6 with no checksum recorded, 0 problem(s)" in out.getvalue()
    out = io.StringIO()
    assert report_data_files(out, GROUP, _verify(root), require_checksums=True) == 6
    assert out.getvalue().count("  no checksum recorded: ") == 6
