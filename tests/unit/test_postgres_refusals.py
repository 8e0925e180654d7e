"""sinks._postgres_refusals and sinks._postgres_staging, the parts that need no server: which
PostgreSQL errors are data refusals (not retried) and which are transient (retried), and the
staging tables' names. The real server's errors: tests/integration/test_postgres_refusals.py."""

from __future__ import annotations

import psycopg
import pytest

from consumer import ConfigError, Table
from sinks._postgres_refusals import refusal
from sinks._postgres_staging import STAGING_PREFIX, check_staging_names, staging_name
from sinks._sql import Written

ORDERS = Table(name="orders", columns={"id": "text", "amount": "bigint"}, key=("id",))


def _no_lookup(_exc: psycopg.Error) -> str | None:
    return None


@pytest.mark.parametrize(
    "sqlstate",
    [
        "22003",  # numeric_value_out_of_range: 10**30 in a bigint
        "22P02",  # invalid_text_representation: text where bigint is declared
        "22P05",  # untranslatable_character: \u0000 in jsonb
        "22021",  # character_not_in_repertoire
        "23502",  # not_null_violation
        "23505",  # unique_violation
        "23514",  # check_violation
        "23503",  # foreign_key_violation (also at COMMIT, when deferred)
    ],
)
def test_data_exceptions_and_constraint_violations_are_refusals(sqlstate: str) -> None:
    error = psycopg.errors.lookup(sqlstate)("refused")
    found = refusal(error, Written(ORDERS, [{"id": "a", "amount": 1}]), _no_lookup)
    assert found is not None
    assert found.context["sqlstate"] == sqlstate


@pytest.mark.parametrize(
    "sqlstate",
    [
        "40001",  # serialization_failure
        "40P01",  # deadlock_detected
        "08006",  # connection_failure
        "57P01",  # admin_shutdown
        "53100",  # disk_full
        "55P03",  # lock_not_available
        "42P01",  # undefined_table (the staging table of a rolled-back transaction, once)
        "25P02",  # in_failed_sql_transaction
    ],
)
def test_transient_failures_are_not_refusals(sqlstate: str) -> None:
    error = psycopg.errors.lookup(sqlstate)("transient")
    assert refusal(error, Written(ORDERS, [{"id": "a"}]), _no_lookup) is None


def test_what_psycopg_raises_before_the_server_sees_a_value() -> None:
    rows = [{"id": "fine", "amount": 1}, {"id": "lone \ud800", "amount": 2}]
    written = Written(ORDERS, rows)
    nul = refusal(
        psycopg.DataError("PostgreSQL text fields cannot contain NUL"), written, _no_lookup
    )
    assert nul is not None
    encoding = refusal(
        UnicodeEncodeError("utf-8", "\ud800", 0, 1, "surrogates not allowed"), written, _no_lookup
    )
    assert encoding is not None
    assert encoding.column == "id", "found by the value that cannot be bound"
    huge = refusal(
        OverflowError("too big"), Written(ORDERS, [{"id": "a", "amount": 10**30}]), _no_lookup
    )
    assert huge is not None
    assert huge.column == "amount"
    # A client-side error that is not about a value: a lost connection, retried.
    assert refusal(psycopg.OperationalError("connection lost"), written, _no_lookup) is None
    assert refusal(psycopg.InterfaceError("closed"), written, _no_lookup) is None
    assert refusal(KeyError("not a refusal"), written, _no_lookup) is None


def test_the_column_of_a_violated_constraint_is_looked_up_when_the_server_names_none() -> None:
    asked: list[psycopg.Error] = []

    def lookup(exc: psycopg.Error) -> str | None:
        asked.append(exc)
        return "amount"

    error = psycopg.errors.CheckViolation("violates check constraint")
    found = refusal(error, Written(ORDERS, [{"id": "a", "amount": -1}]), lookup)
    assert found is not None
    assert found.column == "amount"
    assert asked == [error]


def test_staging_names_fit_in_63_bytes_and_long_names_do_not_share_one() -> None:
    first = "a" * 50 + "_orders_2024"
    second = "a" * 50 + "_orders_2025"
    assert len(first) == len(second) == 62
    names = {staging_name(first), staging_name(second)}
    assert len(names) == 2
    assert all(len(name.encode()) <= 63 and name.startswith(STAGING_PREFIX) for name in names)
    assert staging_name("orders").startswith(f"{STAGING_PREFIX}orders_")
    assert staging_name("x" * 63) != staging_name("x" * 62)
    check_staging_names([Table(name=n, columns={"a": "text"}, key=("a",)) for n in (first, second)])


def test_tables_that_would_share_a_staging_table_are_refused(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr("sinks._postgres_staging.staging_name", lambda _table: "same")
    tables = [Table(name=n, columns={"a": "text"}, key=("a",)) for n in ("one", "two")]
    with pytest.raises(ConfigError, match="share a staging table"):
        check_staging_names(tables)
