"""sinks._url: opening a sink from its URL, and masking passwords in what is shown."""

from __future__ import annotations

from pathlib import Path

import pytest

from consumer import ConfigError, Table, open_sink
from sinks import FileSink, KafkaSink, SqliteSink
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
    assert tables == {"cp", "leases", "offsetkeeper_replay_jobs", "offsetkeeper_state"}


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
    assert caught.value.context["known"] == ["file", "kafka", "postgres", "postgresql", "sqlite"]


def test_file_url_with_an_absolute_directory(tmp_path: Path) -> None:
    sink = open_sink(f"file://{tmp_path}/out")
    assert isinstance(sink, FileSink)
    assert sink.directory == tmp_path / "out"
    assert sink.description == f"file://{tmp_path}/out"
    assert isinstance(open_sink("file://localhost/srv/out"), FileSink)


def test_file_url_with_a_relative_directory() -> None:
    sink = open_sink("file:data/out%20dir")
    assert isinstance(sink, FileSink)
    assert sink.directory == Path("data/out dir")
    assert sink.description == "file:data/out dir"


def test_file_url_options_and_hosts_are_config_errors() -> None:
    with pytest.raises(ConfigError, match="takes no options") as caught:
        open_sink("file:///srv/out?format=parquet&fsync=off")
    assert caught.value.context["options"] == ["format", "fsync"]
    with pytest.raises(ConfigError, match="names a host"):
        open_sink("file://data/out")  # meant file:data/out
    with pytest.raises(ConfigError, match="names a host") as caught:
        open_sink("file://me:s3cr3t@nas/out")
    assert "s3cr3t" not in str(caught.value)
    assert caught.value.context["host"] == "me:***@nas"
    with pytest.raises(ConfigError, match="needs a directory"):
        open_sink("file://")


def test_kafka_url_makes_a_kafka_sink_that_shows_no_client_settings() -> None:
    sink = open_sink("kafka://k1:9092,k2:9092/orders-out?linger.ms=5&sasl.password=topsecret")
    assert isinstance(sink, KafkaSink)
    assert sink.description == "kafka://k1:9092,k2:9092/orders-out"


def test_kafka_url_options_are_checked() -> None:
    with pytest.raises(ConfigError, match="unknown kafka sink options") as caught:
        open_sink("kafka://k1:9092/out?lease_table=x")
    assert caught.value.context["options"] == ["lease_table"]
    with pytest.raises(ConfigError, match="one output topic"):
        open_sink("kafka://k1:9092")


@pytest.mark.parametrize("option", ["checkpoint_table", "lease_table"])
def test_an_app_table_named_like_an_own_table_is_refused_at_open(
    tmp_path: Path, option: str
) -> None:
    sink = open_sink(f"sqlite:///{tmp_path / 'x.db'}?{option}=Orders")
    orders = Table(name="orders", columns={"id": "text"}, key=("id",))
    with pytest.raises(ConfigError, match="name of the sink's own table") as caught:
        sink.open([orders])
    assert caught.value.context["option"] == option
    assert caught.value.context["table"] == "orders"
    postgres = open_sink(f"postgresql://u:pw@db.invalid/x?{option}=orders")
    with pytest.raises(ConfigError, match="name of the sink's own table"):
        postgres.open([orders])  # before it connects


@pytest.mark.parametrize(
    "query",
    [
        "checkpoint_table=own&lease_table=own",
        "checkpoint_table=offsetkeeper_replay_jobs",
        "lease_table=OFFSETKEEPER_CHECKPOINTS",
    ],
)
def test_the_own_tables_need_distinct_names(query: str) -> None:
    for scheme in ("sqlite:///x.db", "postgresql://u@h/db"):
        with pytest.raises(ConfigError, match="distinct names"):
            open_sink(f"{scheme}?{query}")
