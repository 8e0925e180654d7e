"""The soak: one consumer runs against a steady stream for a long time (30 minutes under
`ops/chaos`, 2.5 in CI) while a second member joins and leaves the group on a schedule (a
rebalance each time) and a few bad records go to the dead-letter topic.

Checked from the outside, on the real processes: the long-running member's resident memory
grows less than 10 % after warm-up and its open file descriptors do not grow; after every
rebalance the group's lag is back to exactly 0 (on records that arrived after it, in every
partition); and at the end PostgreSQL holds every good record exactly once, row by row, and the
dead-letter topic every bad one. The figures go to the test's directory, and under `ops/chaos`
to ops/bench/results/soak.{json,md}."""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

import pytest

from tests.chaos.conftest import long_form, scaled
from tests.chaos.soak import (
    ResourceVerdict,
    Sampler,
    SteadyStream,
    catch_up_seconds,
    resource_verdict,
)
from tests.fixtures.dead_letters import read_topic
from tests.fixtures.kafka_tools import create_topic, partition_contents, unique_name
from tests.fixtures.pg import checkpoints, create_database, query
from tests.fixtures.processes import REPO, ConsumerProcess, run_args, wait_until
from tests.fixtures.services import Service

pytestmark = [pytest.mark.integration, pytest.mark.fault, pytest.mark.chaos]

PARTITIONS = 4
RESULTS = REPO / "ops" / "bench" / "results"


def _member_args(kafka: Service, group: str, topic: str, dsn: str, dlq: str) -> list[str]:
    return run_args(
        "tests.apps.chaos:app",
        kafka.address,
        group,
        topic,
        dsn,
        "--batch-max-records",
        "500",
        "--on-bad-record",
        "dead-letter",
        "--dead-letter-topic",
        dlq,
        "--bad-record-retries",
        "1",
        "--bad-record-backoff",
        "0.05",
    )


def _assigned_count(process: ConsumerProcess) -> int:
    return sum(1 for e in process.events() if e.get("event") == "partitions_assigned")


def test_soak_memory_descriptors_and_lag_hold_across_rebalances(
    kafka: Service, postgres: Service, tmp_path: Path, consumers: list[ConsumerProcess]
) -> None:
    duration, period = scaled(150, 1800), scaled(30, 120)
    warm_up, window = scaled(40, 300), scaled(30, 120)
    topic, group = unique_name("soak"), unique_name("soak")
    dlq = f"{topic}.dlq"
    dsn = create_database(postgres.address)
    create_topic(kafka.address, topic, PARTITIONS)
    args = _member_args(kafka, group, topic, dsn, dlq)

    steady = _start_member(consumers, args, tmp_path / "steady.log")
    wait_until(lambda: _assigned_count(steady) >= 1, timeout=60, what="the first assignment")
    stream = SteadyStream(kafka.address, topic, rate=200, bad_every=2_000).start()
    sampler = Sampler(
        kafka.address, topic, PARTITIONS, steady.pid, lambda: checkpoints(dsn, group)
    ).start()

    rebalances = _churn(consumers, args, tmp_path, sampler, duration=duration, period=period)
    stream.stop()
    wait_until(
        lambda: (
            bool(sampler.samples)
            and sampler.samples[-1].lag == 0
            and sampler.samples[-1].ends == sampler.ends_now()
        ),
        timeout=120,
        what="the group to commit the whole stream",
    )
    sampler.stop()
    assert steady.alive(), "the long-running member died during the soak"
    assert steady.terminate() == 0

    catch_ups = [catch_up_seconds(sampler.samples, at, ends) for at, ends in rebalances]
    resources = resource_verdict(sampler.samples, warm_up=warm_up, window=window)
    verified = _verify_rows_and_dead_letters(kafka, topic, dlq, dsn, stream)
    figures = _figures(duration, stream, rebalances, catch_ups, resources, verified, sampler)
    _write_figures(figures, tmp_path)
    print(json.dumps(figures, indent=2))

    times = [at for at, _ in rebalances]
    missed = [at for at, seconds in zip(times, catch_ups, strict=True) if seconds is None]
    assert not missed, f"lag never returned to 0 after the rebalances at {missed} s"
    late = [s for s in catch_ups if s is not None and s > period - 5]
    assert not late, f"lag returned to 0 only after {late} s (the next rebalance was due)"
    assert resources.rss_growth < 0.10, f"resident memory grew {resources.rss_growth:.1%}"
    assert resources.fds_at_end <= resources.fds_after_warm_up, (
        f"open descriptors grew from {resources.fds_after_warm_up} to {resources.fds_at_end}"
    )


def _start_member(consumers: list[ConsumerProcess], args: list[str], log: Path) -> ConsumerProcess:
    process = ConsumerProcess(args, log)
    consumers.append(process)
    return process


def _churn(
    consumers: list[ConsumerProcess],
    args: list[str],
    tmp_path: Path,
    sampler: Sampler,
    *,
    duration: float,
    period: float,
) -> list[tuple[float, dict[int, int]]]:
    """A second member joins at every odd period and leaves (SIGTERM) at every even one, until
    `duration`; returns when each rebalance completed (in the sampler's seconds) and the end
    offsets then."""
    rebalances: list[tuple[float, dict[int, int]]] = []
    visitor: ConsumerProcess | None = None
    turn = 1
    while turn * period < duration:
        time.sleep(max(0.0, turn * period - sampler.elapsed()))
        if visitor is None:
            visitor = _start_member(consumers, args, tmp_path / f"visitor-{turn}.log")
            wait_until(
                lambda v=visitor: _assigned_count(v) >= 1,
                timeout=60,
                what="the visiting member's assignment",
            )
        else:
            assert visitor.terminate() == 0, "the visiting member did not leave cleanly"
            visitor = None
        rebalances.append((sampler.elapsed(), sampler.ends_now()))
        turn += 1
    time.sleep(max(0.0, duration - sampler.elapsed()))
    if visitor is not None:
        assert visitor.terminate() == 0
        rebalances.append((sampler.elapsed(), sampler.ends_now()))
    return rebalances


def _verify_rows_and_dead_letters(
    kafka: Service, topic: str, dlq: str, dsn: str, stream: SteadyStream
) -> dict[str, int]:
    """Every good record is in chaos_events exactly once (one row per (partition, offset),
    whichever member wrote it), each key's last version is in chaos_latest, and every bad
    record is in the dead-letter topic (at least once, as documented)."""
    good: dict[tuple[int, int], tuple[str, int]] = {}
    bad: set[tuple[int, int]] = set()
    last_version: dict[str, int] = {}
    for partition, records in partition_contents(kafka.address, topic, PARTITIONS).items():
        for offset, _key, value in records:
            event = json.loads(value or b"")
            if "version" not in event:
                bad.add((partition, offset))
                continue
            good[(partition, offset)] = (event["key"], event["version"])
            last_version[event["key"]] = event["version"]
    assert len(good) + len(bad) == stream.produced
    assert len(bad) == stream.bad
    rows = query(
        dsn, "SELECT source_partition, source_offset, event_key, version FROM chaos_events"
    )
    written: dict[tuple[int, int], int] = {}
    for partition, offset, key, version in rows:
        coordinates = (int(partition), int(offset))
        written[coordinates] = written.get(coordinates, 0) + 1
        assert good.get(coordinates) == (key, version), f"row {coordinates} is not its record's"
    twice = [c for c, n in written.items() if n > 1]
    assert not twice, f"{len(twice)} records written twice, e.g. {twice[:3]}"
    missing = good.keys() - written.keys()
    assert not missing, f"{len(missing)} records never written, e.g. {sorted(missing)[:3]}"
    latest = dict(query(dsn, "SELECT event_key, version FROM chaos_latest"))
    assert latest == last_version, "chaos_latest does not hold each key's last version"
    letters = read_topic(kafka.address, dlq)
    origins = {
        (int(m.headers["offsetkeeper.dlq.partition"]), int(m.headers["offsetkeeper.dlq.offset"]))
        for m in letters
    }
    assert origins == bad, f"dead letters lost: {sorted(bad - origins)[:3]}"
    return {"good": len(good), "bad": len(bad), "dead_letters": len(letters)}


def _figures(
    duration: float,
    stream: SteadyStream,
    rebalances: list[tuple[float, dict[int, int]]],
    catch_ups: list[float | None],
    resources: ResourceVerdict,
    verified: dict[str, int],
    sampler: Sampler,
) -> dict[str, object]:
    reached = [s for s in catch_ups if s is not None]
    return {
        "form": "long" if long_form() else "short",
        "duration_s": duration,
        "rate_per_s": stream.rate,
        "records": stream.produced,
        **verified,
        "rebalances": len(rebalances),
        "catch_up_s": {
            "median": round(statistics.median(reached), 2) if reached else None,
            "max": round(max(reached), 2) if reached else None,
            "each": [None if s is None else round(s, 2) for s in catch_ups],
        },
        "rss_mib": {
            "after_warm_up": round(resources.rss_after_warm_up_kib / 1024, 1),
            "at_end": round(resources.rss_at_end_kib / 1024, 1),
            "growth_percent": round(100 * resources.rss_growth, 2),
            "max": round(max(s.rss_kib for s in sampler.samples) / 1024, 1),
        },
        "open_fds": {"after_warm_up": resources.fds_after_warm_up, "at_end": resources.fds_at_end},
        "samples": len(sampler.samples),
    }


def _write_figures(figures: dict[str, object], tmp_path: Path) -> None:
    text = json.dumps(figures, indent=2) + "\n"
    (tmp_path / "soak.json").write_text(text)
    if long_form():
        RESULTS.mkdir(parents=True, exist_ok=True)
        (RESULTS / "soak.json").write_text(text)
        (RESULTS / "soak.md").write_text(_markdown(figures))


def _markdown(figures: dict[str, object]) -> str:
    rss, fds, catch_up = figures["rss_mib"], figures["open_fds"], figures["catch_up_s"]
    assert isinstance(rss, dict)
    assert isinstance(fds, dict)
    assert isinstance(catch_up, dict)
    return "\n".join(
        [
            "# Soak (tests/chaos/test_soak.py, long form: ops/chaos)",
            "",
            f"One member for {figures['duration_s']} s at {figures['rate_per_s']} records/s"
            f" ({figures['records']} records, {figures['bad']} bad ones dead-lettered), a second"
            f" member joining and leaving: {figures['rebalances']} rebalances.",
            "",
            "| measure | value |",
            "|---|---|",
            f"| resident memory after warm-up | {rss['after_warm_up']} MiB |",
            f"| resident memory at the end | {rss['at_end']} MiB |",
            f"| growth | {rss['growth_percent']} % (limit 10 %) |",
            f"| open descriptors after warm-up / at the end | {fds['after_warm_up']} /"
            f" {fds['at_end']} |",
            f"| lag back to 0 after a rebalance, median / max | {catch_up['median']} s /"
            f" {catch_up['max']} s |",
            f"| rows checked exactly once | {figures['good']} |",
            f"| dead letters (each bad record at least once) | {figures['dead_letters']} |",
            "",
        ]
    )
