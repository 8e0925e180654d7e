"""consumer.core.app: declared tables are checked up front; apps load by MODULE:ATTR reference."""

from __future__ import annotations

import pytest

from consumer import App, ConfigError, Row, Table, check_identifier, load_app
from tests.fixtures.apps import EVENTS


def test_a_valid_table() -> None:
    table = Table("t_1", columns={"a": "text", "b": "json"}, key=("a",))
    assert table.key == ("a",)
    with pytest.raises(AttributeError):
        table.name = "other"  # type: ignore[misc]


@pytest.mark.parametrize(
    "name",
    [
        "1abc",
        "a-b",
        "a b",
        'x"; DROP TABLE t; --',
        "",
        "a" * 64,
        "é",
        # `$` matches before a trailing newline; the whole name must match.
        "orders\n",
        "orders\r\n",
        "orders\x00",
        "\norders",
    ],
)
def test_table_and_column_names_must_be_plain_identifiers(name: str) -> None:
    with pytest.raises(ConfigError, match="table name must be a plain SQL identifier"):
        Table(name, columns={"a": "text"}, key=("a",))
    with pytest.raises(ConfigError, match="column name must be a plain SQL identifier"):
        Table("t", columns={"a": "text", name: "text"}, key=("a",))


def test_check_identifier_refuses_a_trailing_newline_and_non_strings() -> None:
    assert check_identifier("orders", what="table name") == "orders"
    with pytest.raises(ConfigError, match="plain SQL identifier") as caught:
        check_identifier("orders\n", what="table name")
    assert caught.value.context["name"] == "orders\n"
    with pytest.raises(ConfigError, match="plain SQL identifier"):
        check_identifier(7, what="table name")  # type: ignore[arg-type]


def test_an_unknown_column_type_is_named() -> None:
    with pytest.raises(ConfigError, match="unknown column type") as caught:
        Table("t", columns={"a": "text", "b": "varchar"}, key=("a",))  # type: ignore[dict-item]
    assert caught.value.context["column"] == "b"
    assert caught.value.context["type"] == "varchar"


def test_a_table_needs_columns_and_declared_key_columns() -> None:
    with pytest.raises(ConfigError, match="at least one column"):
        Table("t", columns={}, key=("a",))
    with pytest.raises(ConfigError, match="needs key columns"):
        Table("t", columns={"a": "text"}, key=())
    with pytest.raises(ConfigError, match="key columns are not declared") as caught:
        Table("t", columns={"a": "text"}, key=("a", "b", "c"))
    assert caught.value.context["key"] == ["b", "c"]


def test_app_table_names_are_unique_and_looked_up() -> None:
    with pytest.raises(ConfigError, match="unique"):
        App(name="dup", tables=(EVENTS, EVENTS))
    app = App(name="one", tables=(EVENTS,))
    assert app.table("events") is EVENTS
    with pytest.raises(ConfigError, match="undeclared table") as caught:
        app.table("other")
    assert caught.value.context == {"app": "one", "table": "other"}


@pytest.mark.parametrize(
    "name",
    [
        "offsetkeeper_checkpoints",
        "offsetkeeper_leases",
        "offsetkeeper_replay_jobs",
        "offsetkeeper_stage_events",
        "offsetkeeper_anything",
        "OffsetKeeper_Checkpoints",
        "OFFSETKEEPER_LEASES",
    ],
)
@pytest.mark.parametrize("mode", ["upsert", "append"])
def test_offsetkeepers_own_table_names_are_refused(name: str, mode: str) -> None:
    key = ("a",) if mode == "upsert" else ()
    with pytest.raises(ConfigError, match="reserved for offsetkeeper's own tables") as caught:
        Table(name, columns={"a": "text"}, key=key, mode=mode)  # type: ignore[arg-type]
    assert caught.value.context["table"] == name
    assert name in str(caught.value)


def test_a_name_that_only_contains_offsetkeeper_is_allowed() -> None:
    assert Table("my_offsetkeeper_x", columns={"a": "text"}, key=("a",)).name == "my_offsetkeeper_x"
    assert Table("offsetkeeper", columns={"a": "text"}, key=("a",)).name == "offsetkeeper"


def test_app_tables_differing_only_in_case_are_refused() -> None:
    orders = Table("orders", columns={"id": "text"}, key=("id",))
    shouting = Table("ORDERS", columns={"id": "text"}, key=("id",))
    mixed = Table("Orders", columns={"id": "text"}, key=("id",))

    with pytest.raises(ConfigError, match="differ in more than case") as caught:
        App(name="shop", tables=(orders, EVENTS, shouting, mixed))

    assert caught.value.context == {"app": "shop", "tables": [["ORDERS", "Orders", "orders"]]}
    assert "ORDERS" in str(caught.value)


def test_repeated_table_names_are_named() -> None:
    with pytest.raises(ConfigError, match="table names must be unique") as caught:
        App(name="dup", tables=(EVENTS, EVENTS))
    assert caught.value.context["tables"] == ["events"]


def test_columns_differing_only_in_case_are_refused() -> None:
    with pytest.raises(ConfigError, match="differ in more than case") as caught:
        Table("t", columns={"id": "text", "Total": "bigint", "total": "double"}, key=("id",))
    assert caught.value.context == {"table": "t", "columns": [["Total", "total"]]}


def test_an_append_table_column_differing_from_a_source_column_only_in_case_is_refused() -> None:
    with pytest.raises(ConfigError, match="reserved for append tables") as caught:
        Table("t", columns={"Source_Offset": "bigint"}, mode="append")
    assert caught.value.context["columns"] == ["Source_Offset"]


def test_process_registers_the_processor_and_returns_it() -> None:
    app = App(name="p", tables=(EVENTS,))

    def fn(record: object) -> Row:
        return Row("events", {"id": "x"})

    assert app.process(fn) is fn
    assert app.processor is fn


@pytest.mark.parametrize(
    ("reference", "message"),
    [
        ("consumer.examples.orders", "MODULE:ATTR"),
        (":app", "MODULE:ATTR"),
        ("consumer.examples.orders:", "MODULE:ATTR"),
        ("no_such_module_xyz:app", "cannot import"),
        ("consumer.examples.orders:ORDERS", "does not name an offsetkeeper App"),
        ("consumer.examples.orders:missing", "does not name an offsetkeeper App"),
        ("tests.fixtures.apps:events_app", "does not name an offsetkeeper App"),
    ],
)
def test_bad_app_references_are_config_errors(reference: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message) as caught:
        load_app(reference)
    assert caught.value.context["app"] == reference


def test_an_app_without_a_processor_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    import tests.fixtures.apps as module  # noqa: PLC0415 - the module gets a bare app below

    monkeypatch.setattr(module, "BARE", App(name="bare", tables=(EVENTS,)), raising=False)
    with pytest.raises(ConfigError, match="has no processor"):
        load_app("tests.fixtures.apps:BARE")
