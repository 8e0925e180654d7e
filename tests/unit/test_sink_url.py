"""sinks._url: opening a sink from its URL, and masking passwords in what is shown."""

from __future__ import annotations

from pathlib import Path

import pytest

from consumer import ConfigError
from sinks import SqliteSink, open_sink
from sinks._postgres import PostgresSink
from tests.fixtures.sqlite_db import query


def test_sqlite_url_with_a_relative_path() -> None:
    sink = open_sink("sqlite:///data/out.db")
    assert isinstance(sink, SqliteSink)
    assert sink.description == "sqlite:///data/out.db"


def test_sqlite_url_with_an_absolute_path(tmp_path: Path) -> None:
    db = tmp_path / "abs.db"
    sink = open_sink(f"sqlite:///{db}")
    assert isinstance(sink, SqliteSink)
    assert sink.description == f"sqlite:///{db}"
    sink.open(())
    sink.close()
    assert db.is_file(), "sqlite:////abs/path.db opens the absolute path"


def test_sqlite_url_options_name_the_own_tables(tmp_path: Path) -> None:
    db = tmp_path / "opts.db"
    sink = open_sink(f"sqlite:///{db}?checkpoint_table=cp&lease_table=leases")
    sink.open(())
    sink.close()
    tables = {name for (name,) in query(db, "SELECT name FROM sqlite_master WHERE type='table'")}
    assert tables == {"cp", "leases", "offsetkeeper_replay_jobs"}


def test_unknown_sqlite_options_are_a_config_error() -> None:
    with pytest.raises(ConfigError, match="unknown sqlite sink options") as caught:
        open_sink("sqlite:///x.db?journal=off&cache=big")
    assert caught.value.context["options"] == ["cache", "journal"]


def test_an_own_table_name_that_is_not_an_identifier_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="plain SQL identifier"):
        open_sink("sqlite:///x.db?checkpoint_table=cp;drop")


def test_sqlite_url_without_a_path_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="needs a file path"):
        open_sink("sqlite://")


def test_postgresql_url_makes_a_postgres_sink_that_shows_no_password() -> None:
    sink = open_sink("postgresql://writer:pw-123@db.example:5432/offsets?sslmode=disable")
    assert isinstance(sink, PostgresSink)
    assert sink.description == "postgresql://writer:***@db.example:5432/offsets"
    assert isinstance(open_sink("postgres://u@h/db"), PostgresSink)


def test_an_unknown_scheme_is_a_config_error_without_the_password() -> None:
    with pytest.raises(ConfigError, match="unknown sink URL scheme") as caught:
        open_sink("mysql://root:topsecret@localhost/db")
    assert "topsecret" not in str(caught.value)
    assert caught.value.context["sink"] == "mysql://root:***@localhost/db"
    assert caught.value.context["known"] == ["sqlite", "postgresql"]
