"""consumer.cli.checkpoint and consumer.cli.checkpoint_tools: what the checkpoint commands show,
and how they refuse hostile input files (no broker: the files are read before Kafka is asked)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

import consumer.cli.checkpoint as checkpoint_cli
from consumer import Sink, open_sink
from consumer.cli.main import main

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
