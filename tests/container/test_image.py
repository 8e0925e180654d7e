"""The real offsetkeeper image (built by ops/image) against the session's Kafka and PostgreSQL,
on the host network: it consumes a topic exactly once, row by row; runs as uid 10001 with a
read-only root filesystem and no capabilities; its HEALTHCHECK answers for the live endpoint;
`podman stop` commits the batch in hand and exits 0; `replay` runs as a one-shot job."""

from __future__ import annotations

import json
import time
from typing import Any

import pytest

from tests.container.conftest import Containers, podman
from tests.fixtures.kafka_tools import create_topic, end_offsets, produce, unique_name
from tests.fixtures.pg import checkpoints, create_database, query
from tests.fixtures.processes import wait_until
from tests.fixtures.services import Service, free_port

pytestmark = [pytest.mark.integration, pytest.mark.fault]

PARTITIONS = 3
# How Kubernetes runs it (ops/k8s/deployment.yaml): non-root, read-only, no capabilities.
LOCKED_DOWN = ("--read-only", "--cap-drop=all", "--security-opt=no-new-privileges")


def _orders(first: int, count: int) -> list[tuple[bytes, bytes]]:
    """One distinct order per record, so each record is one row with its own values."""
    return [
        (
            f"order-{n:06d}".encode(),
            json.dumps(
                {
                    "order_id": f"order-{n:06d}",
                    "customer": f"c{n % 7}",
                    "amount_cents": n * 3,
                    "status": "created",
                }
            ).encode(),
        )
        for n in range(first, first + count)
    ]


def _expected(first: int, count: int) -> set[tuple[Any, ...]]:
    return {(f"order-{n:06d}", f"c{n % 7}", n * 3, "created") for n in range(first, first + count)}


def _rows(dsn: str) -> list[tuple[Any, ...]]:
    try:
        return query(dsn, "SELECT order_id, customer, amount_cents, status FROM orders")
    except Exception:  # the table is made by the consumer's first open
        return []


def _env(kafka: Service, dsn: str, group: str, topic: str, port: int) -> tuple[str, ...]:
    settings = {
        "OFFSETKEEPER_APP": "consumer.examples.orders:app",
        "OFFSETKEEPER_BOOTSTRAP_SERVERS": kafka.address,
        "OFFSETKEEPER_SINK": dsn,
        "OFFSETKEEPER_GROUP": group,
        "OFFSETKEEPER_TOPICS": topic,
        "OFFSETKEEPER_METRICS_PORT": str(port),
        "OFFSETKEEPER_SHUTDOWN_DEADLINE_S": "30",
        "OFFSETKEEPER_BATCH_MAX_RECORDS": "500",
    }
    return tuple(option for key, value in settings.items() for option in ("-e", f"{key}={value}"))


def _state(container_id: str) -> dict[str, Any]:
    state: dict[str, Any] = json.loads(
        podman("inspect", "--format", "{{json .State}}", container_id).stdout
    )
    return state


def _events(container_id: str) -> list[dict[str, Any]]:
    lines = podman("logs", container_id).stdout.splitlines()
    lines += podman("logs", container_id).stderr.splitlines()
    events = []
    for line in lines:
        try:
            events.append(json.loads(line))
        except ValueError:
            continue
    return events


def _wait_caught_up(dsn: str, group: str, kafka: Service, topic: str, timeout: float) -> None:
    ends = end_offsets(kafka.address, topic, PARTITIONS)
    wait_until(lambda: checkpoints(dsn, group) == ends, timeout=timeout, what="caught up")


def test_run_consumes_a_topic_exactly_once_as_uid_10001_read_only_without_capabilities(
    offsetkeeper_image: str, kafka: Service, postgres: Service, containers: Containers
) -> None:
    topic, group = unique_name("image-run"), unique_name("image-group")
    create_topic(kafka.address, topic, PARTITIONS)
    produce(kafka.address, topic, _orders(0, 3000))
    dsn = create_database(postgres.address)
    port = free_port()

    cid = containers.run(
        offsetkeeper_image, "run", options=(*LOCKED_DOWN, *_env(kafka, dsn, group, topic, port))
    )
    _wait_caught_up(dsn, group, kafka, topic, timeout=120)
    produce(kafka.address, topic, _orders(3000, 1000))  # a second wave into the live member
    _wait_caught_up(dsn, group, kafka, topic, timeout=120)

    rows = _rows(dsn)
    assert len(rows) == 4000
    assert set(rows) == _expected(0, 4000)
    assert sum(checkpoints(dsn, group).values()) == 4000
    # Who and how it ran: uid 10001 (the image's USER), nothing writable, no capabilities.
    assert podman("exec", cid, "id", "-u").stdout.strip() == "10001"
    status = podman("exec", cid, "cat", "/proc/1/status").stdout
    assert "\nUid:\t10001\t10001\t10001\t10001" in status
    assert "\nCapEff:\t0000000000000000" in status
    assert "\nCapBnd:\t0000000000000000" in status
    refused = podman("exec", cid, "touch", "/opt/offsetkeeper/x", check=False)
    assert refused.returncode != 0
    assert "Read-only file system" in refused.stderr
    assert _state(cid)["Running"]


def test_the_healthcheck_passes_on_the_live_endpoint_and_fails_when_the_loop_is_stuck(
    offsetkeeper_image: str, kafka: Service, postgres: Service, containers: Containers
) -> None:
    topic, group = unique_name("image-health"), unique_name("image-group")
    create_topic(kafka.address, topic, PARTITIONS)
    produce(kafka.address, topic, _orders(0, 500))
    dsn = create_database(postgres.address)
    port = free_port()
    cid = containers.run(
        offsetkeeper_image, "run", options=(*LOCKED_DOWN, *_env(kafka, dsn, group, topic, port))
    )
    _wait_caught_up(dsn, group, kafka, topic, timeout=120)

    # The image's own HEALTHCHECK, run by podman inside the container, against /healthz.
    assert podman("healthcheck", "run", cid, check=False).returncode == 0
    assert _state(cid)["Health"]["Status"] == "healthy"
    # The loop stuck: the whole process frozen, its endpoint answers nothing within the timeout.
    podman("kill", "--signal", "STOP", cid)
    try:
        stuck = podman("healthcheck", "run", cid, check=False, timeout=60)
        assert stuck.returncode != 0, stuck.stdout
    finally:
        podman("kill", "--signal", "CONT", cid)
    wait_until(
        lambda: podman("healthcheck", "run", cid, check=False).returncode == 0,
        timeout=30,
        what="healthy again",
    )


def test_podman_stop_commits_the_batch_in_hand_and_exits_0_within_the_deadline(
    offsetkeeper_image: str, kafka: Service, postgres: Service, containers: Containers
) -> None:
    topic, group = unique_name("image-stop"), unique_name("image-group")
    create_topic(kafka.address, topic, PARTITIONS)
    produce(kafka.address, topic, _orders(0, 20000))
    dsn = create_database(postgres.address)
    port = free_port()
    cid = containers.run(
        offsetkeeper_image, "run", options=(*LOCKED_DOWN, *_env(kafka, dsn, group, topic, port))
    )
    # Stop it mid-stream: some batches committed, more in hand.
    wait_until(lambda: len(_rows(dsn)) > 0, timeout=120, what="first commit")

    started = time.monotonic()
    podman("stop", "--time", "45", cid, timeout=90)
    took = time.monotonic() - started

    state = _state(cid)
    assert state["ExitCode"] == 0, _events(cid)[-5:]
    assert took < 30, f"the stop took {took:.1f}s, past the 30 s shutdown deadline"
    names = [event.get("event") for event in _events(cid)]
    assert "shutdown_requested" in names, names[-10:]
    # What was committed is exactly the records below the checkpoints: nothing half-written.
    stored = checkpoints(dsn, group)
    committed = sum(stored.values())
    rows = _rows(dsn)
    assert len(rows) == committed
    assert committed > 0
    # And a restart finishes the topic exactly once.
    containers.run(
        offsetkeeper_image, "run", options=(*LOCKED_DOWN, *_env(kafka, dsn, group, topic, port))
    )
    _wait_caught_up(dsn, group, kafka, topic, timeout=180)
    assert set(_rows(dsn)) == _expected(0, 20000)
    assert len(_rows(dsn)) == 20000


def test_replay_runs_as_a_one_shot_job_and_exits_0(
    offsetkeeper_image: str, kafka: Service, postgres: Service, containers: Containers
) -> None:
    topic = unique_name("image-replay")
    create_topic(kafka.address, topic, PARTITIONS)
    produce(kafka.address, topic, _orders(0, 2000))
    dsn = create_database(postgres.address)

    cid = containers.run(
        offsetkeeper_image,
        "replay",
        "--app",
        "consumer.examples.orders:app",
        "--bootstrap-servers",
        kafka.address,
        "--sink",
        dsn,
        "--topic",
        topic,
        "--from-offset",
        "0",
        "--to-end",
        options=LOCKED_DOWN,
    )
    wait_until(lambda: not _state(cid)["Running"], timeout=180, what="the replay to finish")
    assert _state(cid)["ExitCode"] == 0, _events(cid)[-5:]
    assert set(_rows(dsn)) == _expected(0, 2000)
    assert len(_rows(dsn)) == 2000
