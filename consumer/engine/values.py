"""Rows checked against their tables' declared column types, before any sink sees them.

A value the sink cannot store must be the bad record of the record that produced it, named
by table and column, and handled by the bad-record policy (retry, dead-letter or stop); it
must never fail a whole batch, let alone stop the consumer. So every row is checked here, in
the engine, for every sink:

| type | accepts |
| --- | --- |
| `text` | `str` of valid Unicode (no lone surrogates); NUL only where the sink stores it |
| `bigint` / `integer` | `int` (not `bool`) within 64 / 32 bits, signed |
| `double` | `float`, or an `int` a double holds exactly; NaN and infinities where stored |
| `boolean` | `bool` |
| `bytes` | `bytes`, `bytearray`, `memoryview` |
| `json` | what `json.dumps` serialises as strict JSON (no NaN), valid Unicode; NUL where stored |

`None` is NULL, refused in key columns. A sink declares what it cannot store with
`ValueLimits` (see `LimitedSink`); a sink that declares nothing gets the defaults.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from consumer.core.app import Table
from consumer.core.errors import InvalidRecordError

# A JSON escape of NUL that is not itself an escaped backslash followed by "u0000".
_JSON_NUL = re.compile(r"(?<!\\)(?:\\\\)*\\u0000")

_INT64 = (-(2**63), 2**63 - 1)
_INT32 = (-(2**31), 2**31 - 1)

Check = Callable[[Any], str | None]  # None: the value is fine; else why not


@dataclass(frozen=True, slots=True)
class ValueLimits:
    """What a sink can store beyond the column types themselves."""

    nul_in_text: bool = True  # "\x00" inside text (PostgreSQL text cannot hold it)
    nul_in_json: bool = True  # "\u0000" inside a json value's strings (PostgreSQL jsonb)
    nan: bool = True  # NaN in a double column (SQLite stores it as NULL: refuse)
    infinity: bool = True  # +-inf in a double column


@runtime_checkable
class LimitedSink(Protocol):
    """A sink that declares the values it cannot store (checked before its transaction)."""

    @property
    def value_limits(self) -> ValueLimits: ...


class RowChecker:
    """Checks rows against their table's column types and the sink's `ValueLimits`. The
    checks of each table are built once."""

    def __init__(self, limits: ValueLimits | None = None) -> None:
        self._limits = limits or ValueLimits()
        self._nul_in_text = self._limits.nul_in_text
        self._checks: dict[str, Callable[[Mapping[str, Any]], None]] = {}

    def check(self, table: Table, values: Mapping[str, Any]) -> None:
        """Raise `InvalidRecordError` naming the table and the first column that is wrong."""
        compiled = self._checks.get(table.name)
        if compiled is None:
            compiled = self._compile(table)
        compiled(values)

    def _compile(self, table: Table) -> Callable[[Mapping[str, Any]], None]:
        """The table's check as straight-line code, one test per column: the common values of
        the common types pass inline; anything else goes through its type's full check."""
        checks = {column: _CHECKS[kind](self._limits) for column, kind in table.columns.items()}
        keys = frozenset(table.key)

        def slow(column: str, value: Any) -> None:
            if value is None:
                if column in keys:
                    raise InvalidRecordError("a key column is null", table=table.name, field=column)
                return
            problem = checks[column](value)
            if problem is not None:
                raise InvalidRecordError(problem, table=table.name, field=column)

        lines = ["def check(values):", "    get = values.get"]
        for column, kind in table.columns.items():
            # Column names go in as literals (repr); values are only ever read.
            lines.append(f"    v = get({column!r})")
            passes = _inline_pass(kind, self._nul_in_text)
            if column in keys or passes is None:
                lines.append(f"    if v is None or not ({passes or 'False'}): slow({column!r}, v)")
            else:
                lines.append(f"    if v is not None and not ({passes}): slow({column!r}, v)")
        namespace: dict[str, Any] = {"slow": slow, "INT64": _INT64, "INT32": _INT32}
        exec("\n".join(lines), namespace)  # noqa: S102 - code of our own, per table
        compiled: Callable[[Mapping[str, Any]], None] = namespace["check"]
        self._checks[table.name] = compiled
        return compiled


def _inline_pass(kind: str, nul_in_text: bool) -> str | None:
    """An expression true of a value `v` of `kind` that certainly passes (None: no fast
    test; every value takes the full check)."""
    if kind == "text":
        return "type(v) is str and v.isascii()" + ("" if nul_in_text else ' and "\\x00" not in v')
    if kind == "bigint":
        return "type(v) is int and INT64[0] <= v <= INT64[1]"
    if kind == "integer":
        return "type(v) is int and INT32[0] <= v <= INT32[1]"
    if kind == "boolean":
        return "type(v) is bool"
    return None


def _text(limits: ValueLimits) -> Check:
    def check(value: Any) -> str | None:
        if type(value) is not str:
            return f"text column given {type(value).__name__}, not str"
        if not value.isascii():
            try:
                value.encode("utf-8")
            except UnicodeEncodeError:
                return "text is not valid Unicode (a lone surrogate)"
        if not limits.nul_in_text and "\x00" in value:
            return "text contains NUL (0x00), which this sink cannot store"
        return None

    return check


def _integer(bounds: tuple[int, int], name: str) -> Callable[[ValueLimits], Check]:
    low, high = bounds

    def make(_limits: ValueLimits) -> Check:
        def check(value: Any) -> str | None:
            if type(value) is not int:
                return f"{name} column given {type(value).__name__}, not int"
            if not low <= value <= high:
                return f"{name} out of range [{low}, {high}]"
            return None

        return check

    return make


def _double(limits: ValueLimits) -> Check:
    def check(value: Any) -> str | None:
        kind = type(value)
        if kind is int:
            try:
                exact = int(float(value)) == value
            except OverflowError:
                return "int too large for a double column"
            # Beyond 2**53 a double rounds: the sink would store another number.
            return None if exact else "int a double cannot hold exactly (beyond 2**53)"
        if kind is not float:
            return f"double column given {kind.__name__}, not float"
        if math.isfinite(value):
            return None
        if math.isnan(value):
            return None if limits.nan else "NaN, which this sink cannot store"
        return None if limits.infinity else "infinity, which this sink cannot store"

    return check


def _boolean(_limits: ValueLimits) -> Check:
    def check(value: Any) -> str | None:
        return None if type(value) is bool else f"boolean column given {type(value).__name__}"

    return check


def _bytes(_limits: ValueLimits) -> Check:
    def check(value: Any) -> str | None:
        if isinstance(value, bytes | bytearray | memoryview):
            return None
        return f"bytes column given {type(value).__name__}"

    return check


def _json(limits: ValueLimits) -> Check:
    def check(value: Any) -> str | None:
        try:
            text = json.dumps(value, ensure_ascii=False, allow_nan=False)
            text.encode("utf-8")
        except (TypeError, ValueError, RecursionError) as exc:
            if isinstance(exc, UnicodeEncodeError):
                return "json value has a string that is not valid Unicode (a lone surrogate)"
            return f"json value does not serialise as strict JSON: {type(exc).__name__}"
        if not limits.nul_in_json and "\\u0000" in text and _JSON_NUL.search(text):
            return "json value contains NUL (\\u0000), which this sink cannot store"
        return None

    return check


_CHECKS: Mapping[str, Callable[[ValueLimits], Check]] = {
    "text": _text,
    "bigint": _integer(_INT64, "bigint"),
    "integer": _integer(_INT32, "integer"),
    "double": _double,
    "boolean": _boolean,
    "bytes": _bytes,
    "json": _json,
}
