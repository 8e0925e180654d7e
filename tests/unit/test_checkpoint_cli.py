"""consumer.cli.checkpoint and consumer.cli.checkpoint_tools: what the checkpoint commands show,
and how they refuse hostile input files (no broker: the files are read before Kafka is asked)."""

from __future__ import annotations

import json
import os
import re
import subprocess
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

import consumer.cli.checkpoint as checkpoint_cli
from consumer import Checkpoint, ConfigError, Sink, TopicPartition, open_sink
from consumer.cli.checkpoint_tools import export_document, read_export, read_offsets_file
from consumer.cli.main import main
from tests.fixtures.processes import OFFSETKEEPER, REPO
from tests.fixtures.spark_checkpoint import write_spark_checkpoint

SECRET = "hunter2"  # noqa: S105 - a test value that must never be shown


@pytest.fixture(autouse=True)
def _clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("OFFSETKEEPER_"):
            monkeypatch.delenv(name)
    # configure_logging would bind every logger of this process to the captured stderr of this
    # test for good (cache_logger_on_first_use); the commands run with structlog's defaults.
    monkeypatch.setattr(checkpoint_cli, "configure_logging", lambda *args: None)


@pytest.fixture
def sqlite_behind_any_url(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Every sink URL the checkpoint commands open is served by one empty SQLite file, so a
    command can be given a URL with secrets in it and still run without a database server."""
    db = tmp_path / "sink.db"
    created = open_sink(f"sqlite:///{db}")
    created.open(())
    created.close()

    def open_sqlite(url: str) -> Sink:
        return open_sink(f"sqlite:///{db}")

    monkeypatch.setattr(checkpoint_cli, "open_sink", open_sqlite)
    return db


@pytest.mark.usefixtures("sqlite_behind_any_url")
@pytest.mark.parametrize("output_format", ["table", "json"])
@pytest.mark.parametrize(
    "url",
    [
        f"postgresql://writer:{SECRET}@db.example/offsets?sslmode=require",
        f"postgresql://db.example/offsets?password={SECRET}&sslmode=require",
        f"kafka://b1:9092/out?sasl.password={SECRET}&sasl.username=me",
        f"kafka://b1:9092/out?ssl.key.password={SECRET}",
    ],
)
def test_checkpoint_show_masks_every_secret_of_the_sink_url(
    url: str, output_format: str, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(["checkpoint", "show", "--group", "g", "--sink", url, "--format", output_format])

    shown = capsys.readouterr()
    assert code == 0
    assert SECRET not in shown.out + shown.err
    assert "***" in shown.out
    assert "db.example" in shown.out or "b1:9092" in shown.out
    if output_format == "json":
        assert json.loads(shown.out)["checkpoints"] == []


# -- hostile input files: a ConfigError naming the file and what is wrong ----------------------

CHECKPOINT = Checkpoint("g", "orders", 3, 42, datetime(2024, 5, 1, tzinfo=UTC), state=b"s")
DEEP = "[" * 100_000


def _entry(**overrides: Any) -> dict[str, Any]:
    [entry] = export_document([CHECKPOINT], source="test")["checkpoints"]
    return {**entry, **overrides}


def _export(*entries: Any, **overrides: Any) -> str:
    document = export_document([], source="test")
    return json.dumps({**document, "checkpoints": list(entries), **overrides})


def _refused(read: Callable[[Path], Any], path: Path, match: str) -> ConfigError:
    with pytest.raises(ConfigError, match=match) as caught:
        read(path)
    assert caught.value.context["path"] == str(path)
    assert str(path) in str(caught.value), "the message names the file"
    assert len(str(caught.value)) < 500, "a hostile value is never quoted in full"
    return caught.value


def test_an_export_round_trips(tmp_path: Path) -> None:
    path = tmp_path / "export.json"
    path.write_text(json.dumps(export_document([CHECKPOINT], source="test")), encoding="utf-8")

    assert read_export(path) == [CHECKPOINT]


def test_a_valid_offsets_file_is_read(tmp_path: Path) -> None:
    path = tmp_path / "offsets.json"
    path.write_text(json.dumps({"orders": {"0": 5, "2147483647": 2**63 - 1}}), encoding="utf-8")

    assert read_offsets_file(path) == {
        TopicPartition("orders", 0): 5,
        TopicPartition("orders", 2**31 - 1): 2**63 - 1,
    }


# Files that are bad whatever they were meant to hold: (content, what the error says).
BAD_FILES: list[Any] = [
    pytest.param(DEEP.encode(), "nests JSON too deeply", id="deep-array"),
    pytest.param(b'{"a":' * 100_000, "nests JSON too deeply", id="deep-object"),
    pytest.param(b"\xff\xfe{}", r"not UTF-8 text \(byte 0", id="not-utf8"),
    pytest.param(b'{"orders": {"0": 5}', "not valid JSON", id="truncated"),
    pytest.param(b"", "not valid JSON", id="empty"),
    pytest.param(b'{"orders": {"0": ' + b"9" * 5_000 + b"}}", "not usable JSON", id="5000-digits"),
]


@pytest.mark.parametrize(("content", "message"), BAD_FILES)
@pytest.mark.parametrize("read", [read_export, read_offsets_file], ids=["export", "offsets"])
def test_a_bad_file_is_refused_naming_it(
    tmp_path: Path, read: Callable[[Path], Any], content: bytes, message: str
) -> None:
    path = tmp_path / "input.json"
    path.write_bytes(content)

    _refused(read, path, message)


@pytest.mark.parametrize("read", [read_export, read_offsets_file], ids=["export", "offsets"])
def test_a_directory_a_fifo_or_a_missing_file_is_refused_naming_it(
    tmp_path: Path, read: Callable[[Path], Any]
) -> None:
    (tmp_path / "dir").mkdir()
    os.mkfifo(tmp_path / "fifo")  # reading it would block for ever

    _refused(read, tmp_path / "dir", "is a directory, not a file")
    _refused(read, tmp_path / "fifo", "is not a regular file")
    _refused(read, tmp_path / "missing.json", "No such file or directory")


@pytest.mark.parametrize("read", [read_export, read_offsets_file], ids=["export", "offsets"])
def test_an_unreadable_file_is_refused_naming_it(
    tmp_path: Path, read: Callable[[Path], Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "input.json"
    path.write_text("{}", encoding="utf-8")

    def deny(self: Path) -> bytes:  # as chmod 000 does for a user other than root
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(Path, "read_bytes", deny)

    _refused(read, path, "cannot read the .* file: Permission denied")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        pytest.param('["orders"]', "not an offsetkeeper checkpoint export", id="a-list"),
        pytest.param('{"kind": "other"}', "not an offsetkeeper checkpoint export", id="kind"),
        pytest.param(_export(export_version=[1] * 10_000), "unknown export", id="version"),
        pytest.param(_export(checkpoints={"a": 1}), "checkpoints must be a list", id="not-list"),
        pytest.param(_export(7), "entry is not an object", id="entry-int"),
        pytest.param(_export(_entry(next_offset=-1)), "next_offset", id="negative"),
        pytest.param(_export(_entry(next_offset=2**63)), "next_offset", id="huge"),
        pytest.param(_export(_entry(next_offset="42")), "next_offset", id="text-offset"),
        pytest.param(_export(_entry(next_offset=4.2)), "next_offset", id="float-offset"),
        pytest.param(_export(_entry(partition=-1)), "partition", id="negative-partition"),
        pytest.param(_export(_entry(partition=True)), "partition", id="bool-partition"),
        pytest.param(_export(_entry(topic=7)), "topic", id="int-topic"),
        pytest.param(_export(_entry(topic="a b\n")), "not a Kafka topic name", id="bad-topic"),
        pytest.param(_export(_entry(topic="t" * 250)), "not a Kafka topic name", id="long"),
        pytest.param(_export(_entry(state="@@not base64@@")), "not valid base64", id="b64"),
        pytest.param(_export(_entry(state=12)), "must be base64 text", id="int-state"),
        pytest.param(_export(_entry(updated_at=10**20)), "updated_at", id="far-future"),
        pytest.param(_export(_entry(format_version=9)), "newer than", id="newer-format"),
        pytest.param(_export(_entry(format_version=None)), "format_version", id="no-format"),
        pytest.param(_export({"format_version": 2}), "missing a field", id="missing-fields"),
        pytest.param(_export(_entry(), _entry(next_offset=7)), "two entries", id="duplicate"),
    ],
)
def test_a_hostile_export_is_refused_naming_the_file(
    tmp_path: Path, text: str, message: str
) -> None:
    path = tmp_path / "export.json"
    path.write_text(text, encoding="utf-8")

    _refused(read_export, path, message)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        pytest.param([["orders", 0, 5]], "must map topic to", id="a-list"),
        pytest.param({"orders": [5]}, "must be a {partition: offset} object", id="topic-list"),
        pytest.param({"a b": {"0": 5}}, "not a Kafka topic name", id="bad-topic"),
        pytest.param({"": {"0": 5}}, "not a Kafka topic name", id="empty-topic"),
        pytest.param({"orders": {"x": 5}}, "partition must be a number", id="word"),
        pytest.param({"orders": {"-1": 5}}, "partition must be a number", id="negative"),
        pytest.param({"orders": {"\u0663": 5}}, "partition must be a number", id="arabic-3"),
        pytest.param({"orders": {"\u00b2": 5}}, "partition must be a number", id="superscript"),
        pytest.param({"orders": {"2147483648": 5}}, "partition must be a number", id="int32"),
        pytest.param({"orders": {"0": -1}}, "non-negative integer", id="negative-offset"),
        pytest.param({"orders": {"0": "5"}}, "non-negative integer", id="text-offset"),
        pytest.param({"orders": {"0": 5.0}}, "non-negative integer", id="float-offset"),
        pytest.param({"orders": {"0": True}}, "non-negative integer", id="bool-offset"),
        pytest.param({"orders": {"0": None}}, "non-negative integer", id="null-offset"),
        pytest.param({"orders": {"0": 2**63}}, "beyond the largest Kafka offset", id="huge"),
    ],
)
def test_a_hostile_offsets_file_is_refused_naming_the_file(
    tmp_path: Path, data: Any, message: str
) -> None:
    path = tmp_path / "offsets.json"
    path.write_text(json.dumps(data), encoding="utf-8")

    _refused(read_offsets_file, path, re.escape(message))


# -- what the user sees: one line and exit code 1, not a traceback ------------------------------


def _offsetkeeper(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    environment = {k: v for k, v in os.environ.items() if not k.startswith("OFFSETKEEPER_")}
    return subprocess.run(
        [OFFSETKEEPER, *args, "--group", "g", "--sink", "sqlite:///sink.db"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=cwd,
        env={**environment, "PYTHONPATH": str(REPO), "OFFSETKEEPER_LOG_FORMAT": "json"},
        check=False,
    )


@pytest.mark.parametrize(
    ("args", "file", "content", "message"),
    [
        pytest.param(
            ("checkpoint", "import", "--input"),
            "export.json",
            DEEP.encode(),
            "the export file nests JSON too deeply to read",
            id="import-deep",
        ),
        pytest.param(
            ("checkpoint", "import", "--input"),
            "export.json",
            _export(_entry(next_offset=-1)).encode(),
            "invalid checkpoint entry",
            id="import-negative-offset",
        ),
        pytest.param(
            ("checkpoint", "adopt", "--from", "offsets-file"),
            "offsets.json",
            b"\xff\xfe{}",
            "the offsets file is not UTF-8 text",
            id="adopt-not-utf8",
        ),
        pytest.param(
            ("checkpoint", "adopt", "--from", "spark-checkpoint"),
            "spark",
            DEEP.encode(),
            "nests too deeply",
            id="adopt-spark-deep",
        ),
    ],
)
def test_the_cli_prints_one_line_and_exits_1_for_a_hostile_file(
    tmp_path: Path, args: tuple[str, ...], file: str, content: bytes, message: str
) -> None:
    if file == "spark":
        root = write_spark_checkpoint(tmp_path / "spark", [{"orders": {0: 1}}], committed=0)
        (root / "offsets" / "0").write_bytes(b"v1\n{}\n" + content)
        path = root / "offsets" / "0"
    else:
        path = tmp_path / file
        path.write_bytes(content)

    done = _offsetkeeper(*args, str(tmp_path / file), cwd=tmp_path)

    assert done.returncode == 1, done.stderr
    assert "Traceback" not in done.stderr
    printed = [line for line in done.stderr.splitlines() if line.startswith("offsetkeeper:")]
    assert len(printed) == 1, done.stderr
    assert printed[0].startswith("offsetkeeper: error: ")
    assert message in printed[0]
    assert f"path={str(path)!r}" in printed[0]
    assert done.stdout == ""
    assert not (tmp_path / "sink.db").exists(), "nothing was opened or written"
