"""consumer.engine.values: rows checked against their column types and the sink's limits."""

from __future__ import annotations

import math
from typing import Any

import pytest

from consumer import InvalidRecordError, Table, ValueLimits
from consumer.engine.values import RowChecker

TABLE = Table(
    name="things",
    columns={
        "id": "text",
        "big": "bigint",
        "small": "integer",
        "ratio": "double",
        "flag": "boolean",
        "blob": "bytes",
        "doc": "json",
    },
    key=("id",),
)
STRICT = ValueLimits(nul_in_text=False, nul_in_json=False, nan=False, infinity=False)


@pytest.mark.parametrize(
    ("column", "value"),
    [
        ("big", 2**63 - 1),
        ("big", -(2**63)),
        ("small", -(2**31)),
        ("ratio", 1.5),
        ("ratio", 2**53),
        ("ratio", -(2**53)),
        ("flag", False),
        ("blob", b"\x00\xff"),
        ("blob", memoryview(b"x")),
        ("doc", {"a": [1, "x", None, 10**30]}),
        ("id", "plain \U0001f600 text"),
        ("doc", None),
    ],
)
def test_values_a_sink_can_hold_pass(column: str, value: Any) -> None:
    RowChecker(STRICT).check(TABLE, {"id": "k", column: value})


@pytest.mark.parametrize(
    ("column", "value", "says"),
    [
        ("big", 2**63, "bigint out of range"),
        ("big", True, "given bool"),
        ("big", 1.0, "given float"),
        ("small", 2**31, "integer out of range"),
        ("ratio", 2**53 + 1, "cannot hold exactly"),
        ("ratio", 10**400, "too large"),
        ("ratio", math.nan, "NaN"),
        ("ratio", -math.inf, "infinity"),
        ("ratio", "1.5", "given str"),
        ("flag", 1, "boolean column given int"),
        ("blob", "text", "bytes column given str"),
        ("doc", {"n": math.nan}, "strict JSON"),
        ("doc", {1, 2}, "strict JSON"),
        ("doc", ["\ud800"], "lone surrogate"),
        ("doc", {"a": "x\x00y"}, "NUL"),
        ("id", "a\x00b", "NUL"),
        ("id", "\udfff", "lone surrogate"),
        ("id", None, "key column is null"),
    ],
)
def test_values_a_sink_cannot_hold_are_refused_naming_table_and_column(
    column: str, value: Any, says: str
) -> None:
    with pytest.raises(InvalidRecordError) as refused:
        RowChecker(STRICT).check(TABLE, {"id": "k", column: value})
    assert refused.value.field == column
    assert refused.value.context["table"] == "things"
    assert says in str(refused.value)


def test_what_a_sink_stores_it_is_not_refused() -> None:
    lenient = RowChecker(ValueLimits())
    lenient.check(TABLE, {"id": "a\x00b", "ratio": math.nan, "doc": {"a": "x\x00y"}})
    lenient.check(TABLE, {"id": "k", "ratio": math.inf})


def test_an_escaped_backslash_before_u0000_is_not_a_nul() -> None:
    RowChecker(STRICT).check(TABLE, {"id": "k", "doc": {"path": "C:\\u0000"}})
