"""Replaying a stateful app: its state lives in the job's own group and starts empty, so a
replay from the log start rebuilds it exactly (through kill -9 and resume), and one from the
middle of the log is refused unless asked for with --state-from-empty."""

from __future__ import annotations

import json

import pytest

from tests.fixtures.chaos import chaos_event
from tests.fixtures.kafka_tools import create_topic, produce, unique_name
from tests.fixtures.services import Service
from tests.fixtures.state_chaos import verify_state_sink
from tests.integration.conftest import SinkUnderTest
from tests.integration.test_replay import replay

pytestmark = pytest.mark.integration

APP = "tests.apps.state_chaos:app"


def test_a_stateful_replay_from_the_log_start_rebuilds_the_state_exactly_across_a_kill(
    kafka: Service, sink: SinkUnderTest
) -> None:
    partitions = 3
    topic = unique_name("state-replay")
    create_topic(kafka.address, topic, partitions)
    produce(kafka.address, topic, (chaos_event(i, 700) for i in range(9_000)))
    args = ("--app", APP, "--topic", topic, "--from-offset", "0", "--sink", sink.url)
    args = (*args, "--job-id", "rebuild", "--batch-max-records", "400", "--state-cache-mb", "1")
    crashed = replay(
        kafka,
        *args,
        env={
            "OFFSETKEEPER_TEST_CRASH_POINT": "after-rows",
            "OFFSETKEEPER_TEST_CRASH_AFTER_BATCHES": "5",
        },
    )
    assert crashed.returncode == -9
    resumed = replay(kafka, *args)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    counts = verify_state_sink(kafka.address, topic, partitions, sink.query, "replay:rebuild")
    assert counts == {"records": 9_000, "keys": 700}


def test_a_stateful_replay_from_the_middle_is_refused_unless_state_from_empty(
    kafka: Service, sink: SinkUnderTest
) -> None:
    topic = unique_name("state-window")
    create_topic(kafka.address, topic, 1)
    produce(kafka.address, topic, (chaos_event(i, 10) for i in range(1_000)))
    args = ("--app", APP, "--topic", topic, "--from-offset", "600", "--sink", sink.url)

    refused = replay(kafka, *args, "--job-id", "window")
    assert refused.returncode == 1
    assert "a replay's state starts empty" in refused.stderr
    assert "--state-from-empty" in refused.stderr
    assert sink.query("SELECT count(*) FROM state_events") in ([(0,)], [])

    accepted = replay(kafka, *args, "--job-id", "window", "--state-from-empty")
    assert accepted.returncode == 0, accepted.stderr[-3000:]
    totals = {str(k): int(c) for k, c in sink.query("SELECT event_key, count FROM state_totals")}
    assert totals == {f"k-{i}": 40 for i in range(10)}, "the window's 400 records, 40 per key"
    stored = sink.query("SELECT value FROM offsetkeeper_state WHERE group_id = 'replay:window'")
    assert sorted(json.loads(bytes(v))["count"] for (v,) in stored) == [40] * 10
