"""Each sink implements `consumer.Sink` and exactly the capability protocols its docstring
declares (its "Capabilities:" sentence), and declares the values it cannot store
(`consumer.LimitedSink`). Built without connecting to anything."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from consumer import (
    CheckpointAdmin,
    GroupBoundSink,
    JobStore,
    LimitedSink,
    Sink,
    StateStore,
    ValueLimits,
)
from sinks import FileSink, KafkaSink, SqliteSink
from sinks._kafka_settings import parse_kafka_url
from sinks._postgres import PostgresSink

PROTOCOLS = (Sink, LimitedSink, CheckpointAdmin, JobStore, GroupBoundSink, StateStore)


def _sinks(tmp_path: Path) -> dict[str, object]:
    return {
        "sqlite": SqliteSink(tmp_path / "out.db"),
        "postgresql": PostgresSink("postgresql://writer:pw@db.invalid:5432/offsets"),
        "file": FileSink(tmp_path / "out"),
        "kafka": KafkaSink(parse_kafka_url("kafka://127.0.0.1:9/out")),
    }


def _declared(sink: object) -> set[str]:
    """The protocols named in the class docstring's "Capabilities: ..." sentence."""
    match = re.search(r"Capabilities:(.*?)\.(?:\s|$)", type(sink).__doc__ or "", re.DOTALL)
    assert match is not None, f"{type(sink).__name__} declares no capabilities"
    return set(re.findall(r"`consumer\.(\w+)`", match[1]))


@pytest.mark.parametrize(
    ("name", "capabilities"),
    [
        ("sqlite", {Sink, LimitedSink, CheckpointAdmin, JobStore, StateStore}),
        ("postgresql", {Sink, LimitedSink, CheckpointAdmin, JobStore, StateStore}),
        ("file", {Sink, LimitedSink, CheckpointAdmin, JobStore, StateStore}),
        # Only the Kafka sink is fenced by the group generation: GroupBoundSink changes what
        # the engine does (no advisory offset commit), so no other sink may look like one.
        ("kafka", {Sink, LimitedSink, CheckpointAdmin, JobStore, GroupBoundSink, StateStore}),
    ],
)
def test_a_sink_implements_the_capabilities_it_declares_and_no_other(
    tmp_path: Path, name: str, capabilities: set[type]
) -> None:
    sink = _sinks(tmp_path)[name]
    implemented = {protocol for protocol in PROTOCOLS if isinstance(sink, protocol)}
    assert implemented == capabilities
    assert _declared(sink) == {protocol.__name__ for protocol in capabilities}


@pytest.mark.parametrize(
    ("name", "limits"),
    [
        # NaN would be stored as NULL; infinities and NUL in text round-trip exactly.
        ("sqlite", ValueLimits(nan=False)),
        # text cannot hold NUL, jsonb refuses "\u0000"; NaN and infinities are stored.
        ("postgresql", ValueLimits(nul_in_text=False, nul_in_json=False)),
        # Strict JSON has no NaN nor infinities.
        ("file", ValueLimits(nan=False, infinity=False)),
        ("kafka", ValueLimits(nan=False, infinity=False)),
    ],
)
def test_a_sink_declares_the_values_it_cannot_store(
    tmp_path: Path, name: str, limits: ValueLimits
) -> None:
    sink = _sinks(tmp_path)[name]
    assert isinstance(sink, LimitedSink)
    assert sink.value_limits == limits
