"""consumer.runtime.health: liveness and readiness rules, on a fake clock."""

from __future__ import annotations

import pytest

from consumer import KafkaError, SinkError, TopicPartition
from consumer.runtime.health import Health, SinkFailure, StopCause
from tests.fixtures.fake_backend import FakeClock

P0 = TopicPartition("orders", 0)
P1 = TopicPartition("orders", 1)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def health(clock: FakeClock) -> Health:
    return Health(readiness_timeout_s=30, liveness_timeout_s=120, clock=clock.now)


def _ready(health: Health) -> tuple[bool, list[str]]:
    verdict = health.readiness()
    assert verdict.body["status"] == ("ready" if verdict.ok else "not ready")
    return verdict.ok, verdict.body["reasons"]


def test_not_ready_until_joined_then_ready_with_partitions(health: Health) -> None:
    assert _ready(health) == (False, ["joining the consumer group"])

    health.assigned({P0: 0, P1: 10})

    assert _ready(health) == (True, [])
    assert health.readiness().body["partitions"] == 2


def test_a_member_with_an_empty_assignment_is_ready(health: Health) -> None:
    health.mark_joined()

    ok, reasons = _ready(health)

    assert ok, reasons
    assert health.readiness().body["partitions"] == 0


def test_stopping_makes_it_unready_at_once(health: Health) -> None:
    health.assigned({P0: 0})
    health.mark_stopping()

    assert _ready(health) == (False, ["shutting down"])


def test_liveness_follows_the_loop_heartbeat(health: Health, clock: FakeClock) -> None:
    assert health.liveness().ok
    clock.sleep(119)
    assert health.liveness().ok
    clock.sleep(2)

    verdict = health.liveness()

    assert not verdict.ok
    assert verdict.body["status"] == "stalled"
    assert verdict.body["loop_last_seen_s"] == 121
    health.beat()
    assert health.liveness().ok


def test_a_stalled_loop_is_also_unready(health: Health, clock: FakeClock) -> None:
    health.assigned({P0: 0})
    clock.sleep(121)

    ok, reasons = _ready(health)

    assert not ok
    assert reasons == ["the partition loop has not run for 121s"]


def test_sink_failures_make_it_unready_only_after_the_timeout(
    health: Health, clock: FakeClock
) -> None:
    health.assigned({P0: 0})
    health.sink_failed(SinkFailure("open", "SinkError"))
    clock.sleep(29)
    health.sink_failed(SinkFailure("open", "SinkError"))  # retries do not restart the clock
    assert _ready(health) == (True, [])
    assert health.sink_failing_for() == 29
    clock.sleep(1)

    ok, reasons = _ready(health)

    assert not ok
    assert reasons == ["the sink has been failing for 30s: open failed with SinkError"]
    # A sink failure keeps the loop alive: it is retrying, not wedged.
    assert health.liveness().ok
    health.sink_ok()
    assert _ready(health) == (True, [])
    assert health.sink_failing_for() == 0


class UniqueViolation(Exception):  # noqa: N818 - named as psycopg names it
    pass


def _raised(error: Exception, cause: Exception | None = None) -> Exception:
    try:
        raise error from cause
    except Exception as raised:
        return raised


def test_a_sink_failure_keeps_the_action_classes_and_codes_but_no_message() -> None:
    row = "(id)=(alice@example.com)"
    error = _raised(
        SinkError(
            f"cannot write rows: duplicate key {row}",
            sink="postgresql://u:***@h/db",
            table="users",
            sqlstate="23505",
            reason=f"duplicate key value violates unique constraint: Key {row} already exists",
        ),
        UniqueViolation(f"Key {row} already exists"),
    )

    failure = SinkFailure.of("commit", error)

    assert failure == SinkFailure(
        action="commit",
        error="SinkError",
        cause=f"{__name__}.UniqueViolation",
        codes=(("SQLSTATE", "23505"),),
    )
    assert failure.describe() == (
        f"commit failed with SinkError ({__name__}.UniqueViolation, SQLSTATE 23505)"
    )
    assert "alice" not in repr(failure)


def test_only_code_shaped_context_values_are_kept() -> None:
    error = SinkError(
        "commit failed",
        code="_TRANSPORT",
        failure="abortable",
        sqlstate="23505 (id)=(alice)",  # not a code: a sink put a value in it
        reason="alice",
    )

    failure = SinkFailure.of("commit", error)

    assert failure.codes == (("code", "_TRANSPORT"), ("failure", "abortable"))
    assert failure.describe() == "commit failed with SinkError (code _TRANSPORT, failure abortable)"
    assert SinkFailure.of("open", KafkaError("x")).describe() == "open failed with KafkaError"
    assert SinkFailure.of("open", ValueError("alice")).describe() == "open failed with ValueError"


def test_a_lagging_partition_that_commits_stays_ready(health: Health, clock: FakeClock) -> None:
    health.assigned({P0: 0})
    assert health.ends_sampled({P0: 1_000}) == {P0: 1_000}
    for position in (100, 200, 300):
        clock.sleep(20)
        assert health.committed({P0: position}) == {P0: 1_000 - position}
        assert _ready(health) == (True, [])
    assert health.readiness().body["lag"] == 700


def test_a_lagging_partition_that_commits_nothing_turns_unready(
    health: Health, clock: FakeClock
) -> None:
    health.assigned({P0: 0, P1: 0})
    health.ends_sampled({P0: 50, P1: 0})
    clock.sleep(31)

    ok, reasons = _ready(health)

    assert not ok
    assert reasons == ["orders[0] lags by 50 and committed nothing for 31s"]
    health.committed({P0: 50})
    assert _ready(health) == (True, [])


def test_lag_that_just_appeared_on_an_idle_partition_starts_its_own_clock(
    health: Health, clock: FakeClock
) -> None:
    health.assigned({P0: 7})
    health.ends_sampled({P0: 7})
    clock.sleep(3_600)  # idle, caught up, for an hour (the loop kept polling)
    health.beat()
    health.ends_sampled({P0: 8})  # one new record

    assert _ready(health) == (True, [])
    clock.sleep(29)
    health.ends_sampled({P0: 9})  # still lagging: the clock keeps running
    assert _ready(health) == (True, [])
    clock.sleep(1)
    assert _ready(health)[0] is False


def test_a_stopped_partition_makes_it_unready_until_released(health: Health) -> None:
    health.assigned({P0: 0, P1: 0})
    health.stopped(P1, StopCause.of(12, "InvalidRecordError", "amount"))

    assert _ready(health) == (False, ["orders[1] is stopped on a bad record at offset 12"])
    health.released([P1])
    assert _ready(health) == (True, [])


def test_unknown_end_offsets_make_it_unready_after_the_timeout(
    health: Health, clock: FakeClock
) -> None:
    health.assigned({P0: 0})
    health.ends_unknown()
    clock.sleep(30)
    health.ends_unknown()

    ok, reasons = _ready(health)

    assert not ok
    assert reasons == ["end offsets unreadable from Kafka for 30s"]
    health.ends_sampled({P0: 0})
    assert _ready(health) == (True, [])


def test_samples_for_released_partitions_are_ignored(health: Health) -> None:
    health.assigned({P0: 5})
    health.released([P0])

    assert health.ends_sampled({P0: 10}) == {}
    assert health.committed({P0: 10}) == {}
    assert health.positions() == {}


def test_lag_is_unknown_until_both_the_position_and_the_end_are(health: Health) -> None:
    health.assigned({P0: None, P1: 3})

    body = health.readiness().body
    assert (body["lag"], body["lag_unknown_partitions"]) == (0, 2)
    assert health.ends_sampled({P0: 10, P1: 10}) == {P0: None, P1: 7}
    body = health.readiness().body
    assert (body["lag"], body["lag_unknown_partitions"]) == (7, 1)
    assert health.positions() == {P0: None, P1: 3}
