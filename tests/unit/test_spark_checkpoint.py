"""consumer.checkpoints.spark: adopting a Spark Structured Streaming job's Kafka offsets."""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import MutableMapping
from pathlib import Path
from typing import Any

import pytest

from consumer.checkpoints.spark import read_spark_kafka_offsets
from consumer.core.errors import ConfigError
from tests.fixtures.spark_checkpoint import (
    CRC_BYTES,
    SPARK_CONF,
    commit_file_text,
    kafka_offset_json,
    offsets_file_text,
    write_spark_checkpoint,
)

BATCHES: list[dict[str, dict[int, int]]] = [
    {"orders": {0: 10, 1: 7}},
    {"orders": {0: 25, 1: 19}, "refunds": {0: 3}},
    {"orders": {0: 40, 1: 33}, "refunds": {0: 9}},
    {"orders": {0: 51, 1: 47}, "refunds": {0: 12}},
]
FILE_SOURCE = '{"logOffset":3}'


def _error(exc: pytest.ExceptionInfo[ConfigError]) -> str:
    return str(exc.value)


# -- the fixture writes what Spark writes --------------------------------------------------------


def test_fixture_writes_spark_layout_byte_for_byte(tmp_path: Path) -> None:
    root = write_spark_checkpoint(tmp_path / "cp", BATCHES[:2], committed=0)

    assert uuid.UUID(json.loads((root / "metadata").read_text())["id"]).version == 4
    assert (root / "sources" / "0" / "0").read_bytes() == (b'\x00v1\n{"orders":{"0":0,"1":0}}')
    offsets_1 = (root / "offsets" / "1").read_text()
    assert offsets_1.split("\n") == [
        "v1",
        json.dumps(
            {"batchWatermarkMs": 0, "batchTimestampMs": 1_717_000_010_000, "conf": SPARK_CONF},
            separators=(",", ":"),
        ),
        '{"orders":{"0":25,"1":19},"refunds":{"0":3}}',
    ]
    assert not offsets_1.endswith("\n")
    assert (root / "commits" / "0").read_text() == 'v1\n{"nextBatchWatermarkMs":0}'
    assert sorted(p.name for p in (root / "commits").iterdir()) == [".0.crc", "0"]
    assert sorted(p.name for p in (root / "offsets").iterdir()) == [".0.crc", ".1.crc", "0", "1"]
    assert (root / "offsets" / ".0.crc").read_bytes() == CRC_BYTES


def test_fixture_v2_offsets_are_keyed_by_source_id(tmp_path: Path) -> None:
    root = write_spark_checkpoint(
        tmp_path / "cp", BATCHES[:1], committed=0, version="v2", other_sources=["-"]
    )
    lines = (root / "offsets" / "0").read_text().split("\n")
    assert lines[0] == "v2"
    assert json.loads(lines[1])["sourceMetadataInfo"] == {}
    assert lines[2:] == ['0:{"orders":{"0":10,"1":7}}', "1:-"]


# -- the latest committed batch -------------------------------------------------------------------


def test_reads_latest_committed_batch_v1(tmp_path: Path) -> None:
    root = write_spark_checkpoint(tmp_path / "cp", BATCHES, committed=3)
    assert read_spark_kafka_offsets(root) == {
        "orders": {0: 51, 1: 47},
        "refunds": {0: 12},
    }


def test_uncommitted_newest_batch_is_ignored(tmp_path: Path) -> None:
    # offsets/3 was planned (written before the batch ran) but commits/3 was never written.
    root = write_spark_checkpoint(tmp_path / "cp", BATCHES, committed=2)
    assert (root / "offsets" / "3").is_file()
    assert read_spark_kafka_offsets(root) == {"orders": {0: 40, 1: 33}, "refunds": {0: 9}}


def test_only_batch_zero_committed(tmp_path: Path) -> None:
    root = write_spark_checkpoint(tmp_path / "cp", BATCHES, committed=0)
    assert read_spark_kafka_offsets(root) == {"orders": {0: 10, 1: 7}}


def test_highest_commit_wins_across_gaps_and_purged_batches(tmp_path: Path) -> None:
    # Spark purges old batches (minBatchesToRetain); async progress tracking may skip commits.
    root = write_spark_checkpoint(tmp_path / "cp", BATCHES, committed=2)
    (root / "commits" / "0").unlink()
    (root / "commits" / "1").unlink()
    (root / "offsets" / "0").unlink()
    assert read_spark_kafka_offsets(root) == {"orders": {0: 40, 1: 33}, "refunds": {0: 9}}


def test_temp_crc_compact_files_and_directories_are_not_batches(tmp_path: Path) -> None:
    root = write_spark_checkpoint(tmp_path / "cp", BATCHES, committed=1)
    commits = root / "commits"
    (commits / ".3.crc").write_bytes(CRC_BYTES)
    (commits / f".3.{uuid.uuid4()}.tmp").write_text(commit_file_text())
    (commits / f".3.{uuid.uuid4()}.tmp.crc").write_bytes(CRC_BYTES)
    (commits / "3.compact").write_text(commit_file_text())
    (commits / "3.tmp").write_text(commit_file_text())
    (commits / "9").mkdir()
    assert read_spark_kafka_offsets(root) == {"orders": {0: 25, 1: 19}, "refunds": {0: 3}}


def test_numeric_ordering_not_lexical(tmp_path: Path) -> None:
    batches = [{"orders": {0: 100 + i}} for i in range(11)]
    root = write_spark_checkpoint(tmp_path / "cp", batches, committed=10)
    assert read_spark_kafka_offsets(root) == {"orders": {0: 110}}


def test_offsets_are_next_offsets_and_keep_their_full_range(tmp_path: Path) -> None:
    big = 2**40 + 7
    root = write_spark_checkpoint(tmp_path / "cp", [{"t": {0: 0, 12: big, 3: 5}}], committed=0)
    offsets = read_spark_kafka_offsets(root)
    assert offsets == {"t": {0: 0, 3: 5, 12: big}}
    assert list(offsets["t"]) == [0, 3, 12]
    assert all(type(p) is int and type(o) is int for p, o in offsets["t"].items())


def test_logs_what_it_adopted(tmp_path: Path, log_events: list[MutableMapping[str, Any]]) -> None:
    root = write_spark_checkpoint(tmp_path / "cp", BATCHES, committed=1)
    read_spark_kafka_offsets(root)
    assert log_events == [
        {
            "event": "spark_checkpoint_read",
            "log_level": "info",
            "path": str(root / "offsets" / "1"),
            "batch": 1,
            "version": 1,
            "source": "0",
            "partitions": 3,
        }
    ]


# -- version headers ------------------------------------------------------------------------------


def test_offset_log_v2_is_read(tmp_path: Path) -> None:
    root = write_spark_checkpoint(tmp_path / "cp", BATCHES, committed=2, version="v2")
    assert read_spark_kafka_offsets(root) == {"orders": {0: 40, 1: 33}, "refunds": {0: 9}}


def test_commit_log_v2_is_read(tmp_path: Path) -> None:
    root = write_spark_checkpoint(tmp_path / "cp", BATCHES, committed=1, commit_version="v2")
    assert (root / "commits" / "1").read_text().startswith("v2\n")
    assert read_spark_kafka_offsets(root) == {"orders": {0: 25, 1: 19}, "refunds": {0: 3}}


def test_spark_2_2_commit_and_metadata_are_read(tmp_path: Path) -> None:
    # Spark 2.2's BatchCommitLog wrote "v1\n{}"; Spark 2.1 metadata had no "conf".
    root = write_spark_checkpoint(tmp_path / "cp", BATCHES, committed=1)
    (root / "commits" / "1").write_text("v1\n{}")
    (root / "offsets" / "1").write_text(
        'v1\n{"batchWatermarkMs":0,"batchTimestampMs":1490000000000}\n{"orders":{"0":25,"1":19}}'
    )
    assert read_spark_kafka_offsets(root) == {"orders": {0: 25, 1: 19}}


def test_v1_empty_metadata_line_and_trailing_newline_are_accepted(tmp_path: Path) -> None:
    root = write_spark_checkpoint(tmp_path / "cp", BATCHES, committed=0)
    (root / "offsets" / "0").write_text('v1\n\n{"orders":{"0":4}}\n')
    (root / "commits" / "0").write_text("v1\r\n")
    assert read_spark_kafka_offsets(root) == {"orders": {0: 4}}


@pytest.mark.parametrize("header", ["v3", "v10"])
def test_newer_offset_log_version_is_refused(tmp_path: Path, header: str) -> None:
    root = write_spark_checkpoint(tmp_path / "cp", BATCHES, committed=1, version=header)
    path = root / "offsets" / "1"
    with pytest.raises(ConfigError) as exc:
        read_spark_kafka_offsets(root)
    assert _error(exc) == (
        f"Spark offset log file has version {header}, newer than this reader knows (v1, v2); "
        f"it was written by a newer Spark (path={str(path)!r}, version={header!r})"
    )
    assert exc.value.context == {"path": str(path), "version": header}


def test_newer_commit_log_version_is_refused(tmp_path: Path) -> None:
    root = write_spark_checkpoint(tmp_path / "cp", BATCHES, committed=1, commit_version="v3")
    with pytest.raises(ConfigError) as exc:
        read_spark_kafka_offsets(root)
    assert exc.value.message == (
        "Spark commit log file has version v3, newer than this reader knows (v1, v2); "
        "it was written by a newer Spark"
    )
    assert exc.value.context == {"path": str(root / "commits" / "1"), "version": "v3"}


@pytest.mark.parametrize(
    "header", ["1", "v", "v0", "vx", "V1", "v1.0", "\x00v1", "\u00ac\u00ed\x00\x05sr"]
)
def test_malformed_offset_log_header_is_refused(tmp_path: Path, header: str) -> None:
    # The last is how Spark 2.0's Java-serialized offset log starts.
    root = write_spark_checkpoint(tmp_path / "cp", BATCHES, committed=0)
    (root / "offsets" / "0").write_text(f'{header}\n{{}}\n{{"orders":{{"0":1}}}}')
    with pytest.raises(ConfigError) as exc:
        read_spark_kafka_offsets(root)
    assert exc.value.message == (
        "malformed Spark offset log file: the first line must be a version header like 'v1', "
        f"got {header!r}"
    )
    assert exc.value.context == {"path": str(root / "offsets" / "0")}


def test_malformed_commit_log_header_is_refused(tmp_path: Path) -> None:
    root = write_spark_checkpoint(tmp_path / "cp", BATCHES, committed=0)
    (root / "commits" / "0").write_text('{"nextBatchWatermarkMs":0}')
    with pytest.raises(ConfigError) as exc:
        read_spark_kafka_offsets(root)
    assert exc.value.message == (
        "malformed Spark commit log file: the first line must be a version header like 'v1', "
        "got '{\"nextBatchWatermarkMs\":0}'"
    )


# -- several sources ------------------------------------------------------------------------------


def test_the_one_kafka_source_is_found_among_others(tmp_path: Path) -> None:
    root = write_spark_checkpoint(
        tmp_path / "cp",
        BATCHES,
        committed=1,
        other_sources=[FILE_SOURCE, "-", "42", '{"0":{"value":5,"runTimeMs":1}}'],
        kafka_position=2,
    )
    assert (root / "offsets" / "1").read_text().split("\n")[2:] == [
        FILE_SOURCE,
        "-",
        '{"orders":{"0":25,"1":19},"refunds":{"0":3}}',
        "42",
        '{"0":{"value":5,"runTimeMs":1}}',
    ]
    assert read_spark_kafka_offsets(root) == {"orders": {0: 25, 1: 19}, "refunds": {0: 3}}
    assert read_spark_kafka_offsets(root, source_index=2) == {
        "orders": {0: 25, 1: 19},
        "refunds": {0: 3},
    }


def test_two_kafka_sources_need_source_index(tmp_path: Path) -> None:
    other = kafka_offset_json({"clicks": {0: 500, 1: 600}})
    root = write_spark_checkpoint(
        tmp_path / "cp", BATCHES, committed=1, other_sources=[other, FILE_SOURCE]
    )
    with pytest.raises(ConfigError) as exc:
        read_spark_kafka_offsets(root)
    assert _error(exc) == (
        "the Spark query has 3 sources and 2 of them are Kafka offset maps; pass source_index "
        "to pick one (0: Kafka, 1: Kafka, 2: not Kafka) "
        f"(path={str(root / 'offsets' / '1')!r}, sources=3)"
    )
    assert read_spark_kafka_offsets(root, source_index=0) == {
        "orders": {0: 25, 1: 19},
        "refunds": {0: 3},
    }
    assert read_spark_kafka_offsets(root, source_index=1) == {"clicks": {0: 500, 1: 600}}


def test_no_kafka_source_among_several(tmp_path: Path) -> None:
    root = write_spark_checkpoint(tmp_path / "cp", BATCHES, committed=0)
    (root / "offsets" / "0").write_text(f"v1\n{{}}\n{FILE_SOURCE}\n-")
    with pytest.raises(ConfigError) as exc:
        read_spark_kafka_offsets(root)
    assert exc.value.message == (
        "the Spark query has 2 sources and 0 of them are Kafka offset maps; pass source_index "
        "to pick one (0: not Kafka, 1: no offset)"
    )
    assert exc.value.context == {"path": str(root / "offsets" / "0"), "sources": 2}


def test_source_index_out_of_range(tmp_path: Path) -> None:
    root = write_spark_checkpoint(tmp_path / "cp", BATCHES, committed=1, other_sources=["-"])
    for index in (2, -1):
        with pytest.raises(ConfigError) as exc:
            read_spark_kafka_offsets(root, source_index=index)
        assert exc.value.message == (
            f"source_index {index} is not a source of this query: it has 2 source(s) (0, 1)"
        )
        assert exc.value.context == {"path": str(root / "offsets" / "1")}


def test_source_index_on_a_non_kafka_source(tmp_path: Path) -> None:
    root = write_spark_checkpoint(
        tmp_path / "cp", BATCHES, committed=1, other_sources=[FILE_SOURCE]
    )
    with pytest.raises(ConfigError) as exc:
        read_spark_kafka_offsets(root, source_index=1)
    assert exc.value.message == (
        "source 1 is not a Kafka source: its offset is not a Kafka offset map like "
        '{"topic":{"0":23,"1":42}}, got \'{"logOffset":3}\''
    )
    assert exc.value.context == {"path": str(root / "offsets" / "1")}


def test_single_non_kafka_source_says_so(tmp_path: Path) -> None:
    root = write_spark_checkpoint(tmp_path / "cp", BATCHES, committed=0)
    (root / "offsets" / "0").write_text("v1\n{}\n17")
    with pytest.raises(ConfigError) as exc:
        read_spark_kafka_offsets(root)
    assert exc.value.message == (
        "source 0 is not a Kafka source: its offset is not a Kafka offset map like "
        '{"topic":{"0":23,"1":42}}, got \'17\''
    )


@pytest.mark.parametrize(
    "line",
    [
        "{}",
        '{"orders":{}}',
        '{"orders":{"p0":1}}',
        '{"orders":{"0":"12"}}',
        '{"orders":{"0":1.5}}',
        '{"orders":{"0":true}}',
        '{"orders":{"0":9223372036854775808}}',
        '["orders",0,1]',
    ],
)
def test_shapes_that_are_not_kafka_offsets(tmp_path: Path, line: str) -> None:
    root = write_spark_checkpoint(tmp_path / "cp", BATCHES, committed=0)
    (root / "offsets" / "0").write_text(f"v1\n{{}}\n{line}")
    with pytest.raises(ConfigError) as exc:
        read_spark_kafka_offsets(root, source_index=0)
    assert exc.value.message.startswith("source 0 is not a Kafka source")
    assert exc.value.message.endswith(f"got {line!r}")


def test_source_with_no_offset(tmp_path: Path) -> None:
    root = write_spark_checkpoint(tmp_path / "cp", BATCHES, committed=1, other_sources=["-"])
    with pytest.raises(ConfigError) as exc:
        read_spark_kafka_offsets(root, source_index=1)
    assert exc.value.message == (
        "source 1 has no offset in the latest committed batch ('-'): it has not read anything yet"
    )
    only_void = tmp_path / "void"
    write_spark_checkpoint(only_void, BATCHES, committed=0)
    (only_void / "offsets" / "0").write_text("v1\n{}\n-")
    with pytest.raises(ConfigError) as exc:
        read_spark_kafka_offsets(only_void)
    assert exc.value.message.startswith("source 0 has no offset in the latest committed batch")


def test_v2_sources_are_picked_by_source_id(tmp_path: Path) -> None:
    other = kafka_offset_json({"clicks": {0: 500}})
    root = write_spark_checkpoint(
        tmp_path / "cp",
        BATCHES,
        committed=1,
        version="v2",
        other_sources=[FILE_SOURCE, other],
        kafka_position=1,
    )
    assert (root / "offsets" / "1").read_text().split("\n")[2:] == [
        f"0:{FILE_SOURCE}",
        '1:{"orders":{"0":25,"1":19},"refunds":{"0":3}}',
        '2:{"clicks":{"0":500}}',
    ]
    assert read_spark_kafka_offsets(root, source_index=1) == {
        "orders": {0: 25, 1: 19},
        "refunds": {0: 3},
    }
    assert read_spark_kafka_offsets(root, source_index=2) == {"clicks": {0: 500}}
    with pytest.raises(ConfigError) as exc:
        read_spark_kafka_offsets(root)
    assert exc.value.message == (
        "the Spark query has 3 sources and 2 of them are Kafka offset maps; pass source_index "
        "to pick one (0: not Kafka, 1: Kafka, 2: Kafka)"
    )


def test_v2_named_sources(tmp_path: Path) -> None:
    # Sources named with .name() are keyed by that name; one Kafka source is still found alone.
    root = write_spark_checkpoint(
        tmp_path / "cp",
        BATCHES,
        committed=3,
        version="v2",
        other_sources=[FILE_SOURCE],
        source_ids=["orders_stream", "landing-files"],
    )
    assert read_spark_kafka_offsets(root) == {"orders": {0: 51, 1: 47}, "refunds": {0: 12}}
    with pytest.raises(ConfigError) as exc:
        read_spark_kafka_offsets(root, source_index=0)
    assert exc.value.message == (
        "source_index 0 is not a source of this query: it has 2 source(s) "
        "(orders_stream, landing-files)"
    )


def test_v2_line_without_source_id(tmp_path: Path) -> None:
    root = write_spark_checkpoint(tmp_path / "cp", BATCHES, committed=0, version="v2")
    path = root / "offsets" / "0"
    header, metadata, _ = path.read_text().split("\n")
    path.write_text(f"{header}\n{metadata}\n-")
    with pytest.raises(ConfigError) as exc:
        read_spark_kafka_offsets(root)
    assert exc.value.message == (
        "malformed Spark v2 offset log file: a source line is not 'sourceId:offset', got '-'"
    )


def test_v2_requires_metadata(tmp_path: Path) -> None:
    root = write_spark_checkpoint(tmp_path / "cp", BATCHES, committed=0, version="v2")
    (root / "offsets" / "0").write_text('v2\n\n0:{"orders":{"0":1}}')
    with pytest.raises(ConfigError) as exc:
        read_spark_kafka_offsets(root)
    assert exc.value.message == (
        "malformed Spark offset log file: a v2 file must have a metadata line"
    )


# -- -1 / -2 ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(("value", "meaning"), [(-1, "latest"), (-2, "earliest")])
def test_placeholder_offsets_are_refused_by_topic_and_partition(
    tmp_path: Path, value: int, meaning: str
) -> None:
    root = write_spark_checkpoint(
        tmp_path / "cp", [{"orders": {0: 10, 1: value}, "refunds": {0: 4}}], committed=0
    )
    path = root / "offsets" / "0"
    with pytest.raises(ConfigError) as exc:
        read_spark_kafka_offsets(root)
    assert _error(exc) == (
        f"source 0 holds the placeholder {value} ({meaning}), not a concrete offset; it cannot "
        f"be adopted as a next offset (path={str(path)!r}, topic='orders', partition=1, "
        f"offset={value})"
    )
    assert exc.value.context == {
        "path": str(path),
        "topic": "orders",
        "partition": 1,
        "offset": value,
    }


def test_other_negative_offset_is_refused(tmp_path: Path) -> None:
    root = write_spark_checkpoint(tmp_path / "cp", [{"orders": {3: -7}}], committed=0)
    with pytest.raises(ConfigError) as exc:
        read_spark_kafka_offsets(root)
    assert exc.value.message == (
        "source 0 holds the negative offset -7; it cannot be adopted as a next offset"
    )
    assert exc.value.context["partition"] == 3


def test_placeholder_in_an_uncommitted_batch_does_not_matter(tmp_path: Path) -> None:
    root = write_spark_checkpoint(
        tmp_path / "cp", [{"orders": {0: 10}}, {"orders": {0: -1}}], committed=0
    )
    assert read_spark_kafka_offsets(root) == {"orders": {0: 10}}


# -- errors ----------------------------------------------------------------------------------------


def test_missing_directory(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as exc:
        read_spark_kafka_offsets(tmp_path / "nope")
    assert _error(exc) == (
        f"Spark checkpoint directory does not exist (path={str(tmp_path / 'nope')!r})"
    )


def test_path_is_a_file(tmp_path: Path) -> None:
    file = tmp_path / "cp"
    file.write_text("v1")
    with pytest.raises(ConfigError) as exc:
        read_spark_kafka_offsets(file)
    assert exc.value.message == "Spark checkpoint path is not a directory"
    assert exc.value.context == {"path": str(file)}


def test_missing_commits_directory(tmp_path: Path) -> None:
    root = write_spark_checkpoint(tmp_path / "cp", BATCHES, committed=1)
    for child in (root / "commits").iterdir():
        child.unlink()
    (root / "commits").rmdir()
    with pytest.raises(ConfigError) as exc:
        read_spark_kafka_offsets(root)
    assert exc.value.message == (
        "not a Spark streaming checkpoint with a commit log: it has no commits/ directory "
        "(Spark writes one from 2.2 on)"
    )
    assert exc.value.context == {"path": str(root / "commits")}


def test_no_committed_batch(tmp_path: Path) -> None:
    root = write_spark_checkpoint(tmp_path / "cp", BATCHES, committed=-1)
    (root / "commits" / ".0.crc").write_bytes(CRC_BYTES)
    with pytest.raises(ConfigError) as exc:
        read_spark_kafka_offsets(root)
    assert (
        exc.value.message == "the Spark query has no committed batch: commits/ holds no batch file"
    )
    assert exc.value.context == {"path": str(root / "commits")}


def test_committed_batch_without_offsets_file(tmp_path: Path) -> None:
    root = write_spark_checkpoint(tmp_path / "cp", BATCHES, committed=1)
    (root / "offsets" / "1").unlink()
    with pytest.raises(ConfigError) as exc:
        read_spark_kafka_offsets(root)
    assert _error(exc) == (
        "the latest committed batch has no offsets file "
        f"(path={str(root / 'offsets' / '1')!r}, batch=1)"
    )


def test_missing_offsets_directory(tmp_path: Path) -> None:
    root = write_spark_checkpoint(tmp_path / "cp", BATCHES, committed=0)
    for child in (root / "offsets").iterdir():
        child.unlink()
    (root / "offsets").rmdir()
    with pytest.raises(ConfigError) as exc:
        read_spark_kafka_offsets(root)
    assert exc.value.message == "the latest committed batch has no offsets file"


def test_malformed_kafka_json(tmp_path: Path) -> None:
    root = write_spark_checkpoint(tmp_path / "cp", BATCHES, committed=0)
    (root / "offsets" / "0").write_text('v1\n{}\n{"orders":{"0":12,}')
    with pytest.raises(ConfigError) as exc:
        read_spark_kafka_offsets(root)
    assert re.fullmatch(
        r"malformed JSON in Spark log file: source 0's offset does not parse \(.+\): "
        r"'\{\"orders\":\{\"0\":12,\}'",
        exc.value.message,
    )
    assert exc.value.context == {"path": str(root / "offsets" / "0")}
    assert isinstance(exc.value.__cause__, json.JSONDecodeError)


def test_malformed_metadata_json(tmp_path: Path) -> None:
    root = write_spark_checkpoint(tmp_path / "cp", BATCHES, committed=0)
    (root / "offsets" / "0").write_text('v1\n{"batchWatermarkMs":\n{"orders":{"0":1}}')
    with pytest.raises(ConfigError) as exc:
        read_spark_kafka_offsets(root)
    assert exc.value.message.startswith(
        "malformed JSON in Spark log file: batch metadata does not parse ("
    )


def test_metadata_line_that_is_not_an_object(tmp_path: Path) -> None:
    root = write_spark_checkpoint(tmp_path / "cp", BATCHES, committed=0)
    (root / "offsets" / "0").write_text('v1\n[1]\n{"orders":{"0":1}}')
    with pytest.raises(ConfigError) as exc:
        read_spark_kafka_offsets(root)
    assert exc.value.message == (
        "malformed Spark offset log file: its metadata line is not a JSON object"
    )


def test_malformed_commit_metadata(tmp_path: Path) -> None:
    root = write_spark_checkpoint(tmp_path / "cp", BATCHES, committed=0)
    (root / "commits" / "0").write_text("v1\n{nextBatchWatermarkMs")
    with pytest.raises(ConfigError) as exc:
        read_spark_kafka_offsets(root)
    assert exc.value.message.startswith(
        "malformed JSON in Spark log file: commit metadata does not parse ("
    )
    assert exc.value.context == {"path": str(root / "commits" / "0")}


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("", "Spark offset log file is empty"),
        ("v1", "malformed Spark offset log file: the metadata line after the version is missing"),
        ("v1\n{}", "Spark offset log file lists no source"),
    ],
)
def test_truncated_offsets_file(tmp_path: Path, content: str, message: str) -> None:
    root = write_spark_checkpoint(tmp_path / "cp", BATCHES, committed=0)
    (root / "offsets" / "0").write_text(content)
    with pytest.raises(ConfigError) as exc:
        read_spark_kafka_offsets(root)
    assert exc.value.message == message
    assert exc.value.context == {"path": str(root / "offsets" / "0")}


def test_empty_commit_file(tmp_path: Path) -> None:
    root = write_spark_checkpoint(tmp_path / "cp", BATCHES, committed=0)
    (root / "commits" / "0").write_text("")
    with pytest.raises(ConfigError) as exc:
        read_spark_kafka_offsets(root)
    assert exc.value.message == "Spark commit log file is empty"


def test_offsets_file_that_is_not_utf8(tmp_path: Path) -> None:
    root = write_spark_checkpoint(tmp_path / "cp", BATCHES, committed=0)
    (root / "offsets" / "0").write_bytes(b"v1\n{}\n\xff\xfe")
    with pytest.raises(ConfigError) as exc:
        read_spark_kafka_offsets(root)
    assert exc.value.message == "Spark log file is not UTF-8 text"


def test_offsets_file_text_helper_matches_builder(tmp_path: Path) -> None:
    root = write_spark_checkpoint(tmp_path / "cp", BATCHES, committed=0, version="v2")
    assert (root / "offsets" / "2").read_text() == offsets_file_text(
        2, [kafka_offset_json(BATCHES[2])], "v2"
    )


# -- hostile files: a ConfigError naming the file, never a traceback -----------------------------

DEEP = "[" * 100_000


@pytest.mark.parametrize(
    ("file", "content"),
    [
        ("offsets", f"v1\n{{}}\n{DEEP}"),  # a source's offset
        ("offsets", f"v1\n{DEEP}\n{{}}"),  # the batch metadata
        ("offsets", "v1\n{}\n" + '{"a":' * 100_000),
        ("commits", f"v1\n{DEEP}"),
    ],
)
def test_json_nested_too_deeply_is_refused_naming_the_file(
    tmp_path: Path, file: str, content: str
) -> None:
    root = write_spark_checkpoint(tmp_path / "cp", BATCHES, committed=0)
    (root / file / "0").write_text(content)

    with pytest.raises(ConfigError, match="nests too deeply") as exc:
        read_spark_kafka_offsets(root)

    assert exc.value.context == {"path": str(root / file / "0")}
    assert str(root / file / "0") in str(exc.value)


@pytest.mark.parametrize(
    "partition", ["2147483648", "99999999999", "9" * 5_000], ids=["int32+1", "11", "5000"]
)
def test_a_partition_beyond_a_java_int_is_refused(tmp_path: Path, partition: str) -> None:
    root = write_spark_checkpoint(tmp_path / "cp", BATCHES, committed=0)
    (root / "offsets" / "0").write_text(f'v1\n{{}}\n{{"orders":{{"{partition}":5}}}}')

    with pytest.raises(ConfigError, match="beyond the largest Kafka partition number") as exc:
        read_spark_kafka_offsets(root)

    assert exc.value.context == {"path": str(root / "offsets" / "0"), "topic": "orders"}
    assert len(str(exc.value)) < 400


def test_an_offset_literal_too_long_for_python_is_refused(tmp_path: Path) -> None:
    root = write_spark_checkpoint(tmp_path / "cp", BATCHES, committed=0)
    (root / "offsets" / "0").write_text('v1\n{}\n{"orders":{"0":' + "7" * 5_000 + "}}")

    with pytest.raises(ConfigError, match="does not parse") as exc:
        read_spark_kafka_offsets(root)

    assert exc.value.context == {"path": str(root / "offsets" / "0")}


@pytest.mark.parametrize("offset", ['"12"', "12.0", "true", "null", "[12]", str(2**63)])
def test_an_offset_of_the_wrong_type_or_range_is_not_a_kafka_offset(
    tmp_path: Path, offset: str
) -> None:
    root = write_spark_checkpoint(tmp_path / "cp", BATCHES, committed=0)
    (root / "offsets" / "0").write_text(f'v1\n{{}}\n{{"orders":{{"0":{offset}}}}}')

    with pytest.raises(ConfigError, match="is not a Kafka source") as exc:
        read_spark_kafka_offsets(root)

    assert exc.value.context == {"path": str(root / "offsets" / "0")}


def test_a_version_header_with_thousands_of_digits_is_malformed(tmp_path: Path) -> None:
    root = write_spark_checkpoint(tmp_path / "cp", BATCHES, committed=0)
    (root / "offsets" / "0").write_text("v" + "9" * 5_000 + '\n{}\n{"orders":{"0":1}}')

    with pytest.raises(ConfigError, match="must be a version header") as exc:
        read_spark_kafka_offsets(root)

    assert exc.value.context == {"path": str(root / "offsets" / "0")}


def test_an_offsets_file_that_is_a_directory(tmp_path: Path) -> None:
    root = write_spark_checkpoint(tmp_path / "cp", BATCHES, committed=0)
    (root / "offsets" / "0").unlink()
    (root / "offsets" / "0").mkdir()

    with pytest.raises(ConfigError, match="has no offsets file") as exc:
        read_spark_kafka_offsets(root)

    assert exc.value.context["path"] == str(root / "offsets" / "0")


def test_an_unreadable_offsets_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = write_spark_checkpoint(tmp_path / "cp", BATCHES, committed=0)
    unreadable = root / "offsets" / "0"
    read_bytes = Path.read_bytes

    def deny(path: Path) -> bytes:  # as chmod 000 would for a user other than root
        if path == unreadable:
            raise PermissionError(13, "Permission denied", str(path))
        return read_bytes(path)

    monkeypatch.setattr(Path, "read_bytes", deny)

    with pytest.raises(ConfigError) as exc:
        read_spark_kafka_offsets(root)

    assert exc.value.message == "cannot read Spark log file: Permission denied"
    assert exc.value.context == {"path": str(unreadable)}


def test_a_directory_that_cannot_be_searched(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = write_spark_checkpoint(tmp_path / "cp", BATCHES, committed=0)
    commits = root / "commits"
    is_dir = Path.is_dir

    def deny(path: Path) -> bool:  # stat() of an entry of a directory without search permission
        if path == commits:
            raise PermissionError(13, "Permission denied", str(path))
        return is_dir(path)

    monkeypatch.setattr(Path, "is_dir", deny)

    with pytest.raises(ConfigError) as exc:
        read_spark_kafka_offsets(root)

    assert exc.value.message == "cannot read the Spark checkpoint: Permission denied"
    assert exc.value.context == {"path": str(commits)}
