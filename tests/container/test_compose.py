"""docker-compose.yml itself, run with podman-compose (from requirements.lock): the broker, the
database and the consumer on the stack's own bridge network (service names resolve through CNI's
dnsname plugin, ops/system-packages.d/containers.txt), the `demo` profile's sample-orders job
producing 4000 events into `orders` from inside that network, and the consumer writing every
order to PostgreSQL: each row is checked against the last event of its order read back from the
topic (through the published 127.0.0.1 ports). Everything the stack made (containers, its pod,
network, volumes) is removed by ID afterwards, and no conmon of theirs is left.

Nothing can be pulled here, so the compose file's public images are the local ones ops/image
builds, given the public names for the length of the test (`podman tag`, untagged afterwards):
offsetkeeper-kafka reads apache/kafka's KAFKA_* settings and offsetkeeper-postgres the official
image's POSTGRES_* ones. Where the engine already has the public images, they are used as they
are. Where this run departs from the file's own instructions, and why (podman 4.3):
- the consumer is started with `run -d` and one published port, not `up -d`: podman 4.3 refuses
  the host-port range `127.0.0.1:9108-9110:9108` ("host and container port ranges have different
  lengths");
- podman runs no healthchecks without systemd, and podman-compose ignores
  `condition: service_healthy` before podman 4.6, so the test waits for the broker from the host
  and creates `orders` (3 partitions, as ops/sample_orders.py does) before the consumer starts:
  a consumer subscribed to a topic that does not exist yet sees it only at its next metadata
  refresh (librdkafka: 5 minutes).
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import yaml

from tests.container.conftest import PODMAN_ENV, build_image, podman
from tests.container.test_testcontainers import _orphaned_conmons
from tests.fixtures.kafka_tools import end_offsets, partition_contents
from tests.fixtures.pg import checkpoints, query
from tests.fixtures.processes import wait_until
from tests.fixtures.services import LOCAL_POSTGRES_IMAGE, REPO, local_kafka_image

pytestmark = [pytest.mark.integration, pytest.mark.fault]

COMPOSE_FILE = REPO / "docker-compose.yml"
# What the host reaches: the ports docker-compose.yml publishes on 127.0.0.1.
KAFKA_FROM_HOST = "127.0.0.1:29092"
SINK_FROM_HOST = "postgresql://offsetkeeper:offsetkeeper@127.0.0.1:5432/offsetkeeper"
HOST_PORTS = (29092, 5432, 9108)


def _services() -> dict[str, Any]:
    services: dict[str, Any] = yaml.safe_load(COMPOSE_FILE.read_text())["services"]
    return services


def _podman_compose(project: str, *args: str, timeout: float = 180) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "podman_compose", "-p", project, "-f", str(COMPOSE_FILE), *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        env=PODMAN_ENV,
        timeout=timeout,
        check=False,
    )
    if done.returncode != 0:
        raise AssertionError(
            f"podman-compose {' '.join(args)} failed ({done.returncode}):\n"
            f"{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
        )
    return done.stdout + done.stderr


def _port_free(port: int) -> bool:
    with socket.socket() as probe:
        return probe.connect_ex(("127.0.0.1", port)) != 0


@dataclass
class Stack:
    project: str
    log: str = ""

    def by_label(self, kind: str) -> list[str]:
        label = f"label=io.podman.compose.project={self.project}"
        if kind == "container":
            listed = podman("ps", "--all", "--filter", label, "--format", "{{.ID}}")
        elif kind == "pod":  # podman-compose puts the project's containers in pod_PROJECT
            listed = podman("pod", "ls", "--filter", f"name=^pod_{self.project}$", "--quiet")
        else:
            listed = podman(kind, "ls", "--filter", label, "--quiet")
        return listed.stdout.split()

    def logs(self) -> str:
        """The last lines of each container's log, for a failure's message."""
        shown = []
        for container_id in self.by_label("container"):
            done = podman("logs", "--tail", "20", container_id, check=False)
            shown.append(f"--- {container_id}\n{done.stdout}{done.stderr}")
        return "\n".join(shown)


def _tag_local_images() -> list[str]:
    """Give the local images the compose file's public names where the engine lacks those."""
    services = _services()
    public = {
        services["kafka"]["image"]: local_kafka_image(),
        services["postgres"]["image"]: LOCAL_POSTGRES_IMAGE,
    }
    tagged = []
    for name, local in public.items():
        if podman("image", "exists", name, check=False).returncode == 0:
            continue  # the real public image: used as it is
        qualified = name if "/" in name.split(":")[0] else f"library/{name}"
        podman("tag", local, f"docker.io/{qualified}")
        tagged.append(f"docker.io/{qualified}")
    return tagged


@pytest.fixture
def stack(offsetkeeper_image: str) -> Iterator[Stack]:
    build_image("kafka", "postgres")
    assert offsetkeeper_image == _services()["consumer"]["image"], (
        "docker-compose.yml's consumer image is not the version ops/image builds"
    )
    busy = [port for port in HOST_PORTS if not _port_free(port)]
    assert not busy, f"docker-compose.yml publishes 127.0.0.1 ports {busy}, already in use"
    tagged = _tag_local_images()
    orphans_before = _orphaned_conmons()
    started = Stack(f"okcompose{uuid.uuid4().hex[:8]}")
    try:
        yield started
    finally:
        failures = []
        for kind, remove in (
            ("container", ("rm", "--force", "--time", "0")),
            ("pod", ("pod", "rm", "--force")),
            ("network", ("network", "rm")),
            ("volume", ("volume", "rm")),
        ):
            for thing in started.by_label(kind):
                done = podman(*remove, thing, check=False, timeout=60)
                if done.returncode != 0:
                    failures.append(f"{kind} {thing}: {done.stderr.strip()[-500:]}")
        for name in tagged:
            podman("untag", name, name, check=False)
    left = {kind: started.by_label(kind) for kind in ("container", "pod", "network", "volume")}
    assert not any(left.values()), f"left behind: {left}; {failures}"
    # A removed container's conmon takes a moment to go.
    wait_until(lambda: _orphaned_conmons() <= orphans_before, timeout=30, what="conmons gone")


def _expected_rows(
    contents: dict[int, list[tuple[int, bytes | None, bytes | None]]],
) -> dict[str, tuple[Any, ...]]:
    """The last event of each order, in offset order (one order's events share a partition)."""
    last: dict[str, tuple[Any, ...]] = {}
    for records in contents.values():
        for _offset, _key, value in sorted(records, key=lambda record: record[0]):
            assert value is not None
            event = json.loads(value)
            last[event["order_id"]] = (
                event["order_id"],
                event["customer"],
                event["amount_cents"],
                event["status"],
            )
    return last


def _kafka_answers(bootstrap: str) -> bool:
    from confluent_kafka import KafkaException  # noqa: PLC0415
    from confluent_kafka.admin import AdminClient  # noqa: PLC0415

    if _port_free(int(bootstrap.rpartition(":")[2])):
        return False  # not listening yet: no client (and none of its log) before it is
    try:
        metadata = AdminClient({"bootstrap.servers": bootstrap}).list_topics(timeout=5)
    except KafkaException:
        return False
    return len(metadata.brokers) > 0


def _create_topic(bootstrap: str, topic: str, partitions: int) -> None:
    from confluent_kafka.admin import AdminClient, NewTopic  # noqa: PLC0415

    admin = AdminClient({"bootstrap.servers": bootstrap})
    admin.create_topics([NewTopic(topic, partitions, 1)])[topic].result(30)


def _metrics_answer(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=3) as response:  # noqa: S310 - 127.0.0.1
            return int(response.status) == 200
    except OSError:
        return False


def _partitions(bootstrap: str, topic: str) -> int:
    from confluent_kafka.admin import AdminClient  # noqa: PLC0415

    metadata = AdminClient({"bootstrap.servers": bootstrap}).list_topics(topic, timeout=10)
    return len(metadata.topics[topic].partitions)


def test_docker_compose_consumes_the_sample_orders_end_to_end(stack: Stack) -> None:
    started = time.monotonic()
    # docker-compose.yml's header says `up -d`; podman 4.3 refuses the consumer's published
    # host-port range (127.0.0.1:9108-9110:9108, for --scale): "host and container port ranges
    # have different lengths". So the broker and the database come up with `up -d`, and the
    # consumer service with `run -d` (the same service: image, command, environment, network,
    # restart policy) and one published port.
    stack.log += _podman_compose(stack.project, "up", "--detach", "kafka", "postgres")
    # The topic first, as ops/sample_orders.py makes it: a consumer subscribed to a topic that
    # does not exist yet sees it only at its next metadata refresh (librdkafka: 5 minutes).
    wait_until(lambda: _kafka_answers(KAFKA_FROM_HOST), timeout=120, what="the compose broker")
    _create_topic(KAFKA_FROM_HOST, "orders", 3)
    stack.log += _podman_compose(
        stack.project, "run", "--detach", "--publish", "127.0.0.1:9108:9108", "consumer"
    )
    running = {
        podman(
            "inspect", "--format", '{{index .Config.Labels "io.podman.compose.service"}}', i
        ).stdout.strip()
        for i in stack.by_label("container")
    }
    assert running == {"kafka", "postgres", "consumer"}, stack.log
    wait_until(
        lambda: _metrics_answer("http://127.0.0.1:9108/readyz"),
        timeout=120,
        what="the compose consumer's /readyz",
    )
    stack.log += _podman_compose(
        stack.project, "--profile", "demo", "run", "--rm", "sample-orders", timeout=240
    )

    partitions = _partitions(KAFKA_FROM_HOST, "orders")
    ends = end_offsets(KAFKA_FROM_HOST, "orders", partitions)
    assert sum(ends.values()) == 4000  # what sample-orders produces
    try:
        wait_until(
            lambda: _checkpoints_or_none(SINK_FROM_HOST, "orders") == ends,
            timeout=120,
            what="the compose consumer to catch up",
        )
    except Exception as exc:
        raise AssertionError(f"{exc}\n{stack.logs()}") from exc

    expected = _expected_rows(partition_contents(KAFKA_FROM_HOST, "orders", partitions))
    rows = query(SINK_FROM_HOST, "SELECT order_id, customer, amount_cents, status FROM orders")
    assert len(expected) == 1000
    assert len(rows) == len(expected)
    for row in rows:
        assert row == expected[row[0]], row
    print(f"compose stack up, 4000 sample orders consumed in {time.monotonic() - started:.0f}s")


def _checkpoints_or_none(dsn: str, group: str) -> dict[int, int] | None:
    try:
        return checkpoints(dsn, group)
    except Exception:  # the database or the consumer's tables not there yet
        return None
