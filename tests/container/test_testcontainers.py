"""The integration suite's services through testcontainers, for real: podman serves the
Docker-compatible API (`podman system service`), testcontainers-python starts the local Kafka and
PostgreSQL images (ops/image kafka postgres) through it, and a real part of the integration
suite runs against them in a child pytest: PostgreSQL exactly once across kill -9 at the two
kill points, and across a broker and a database restart (the containers stopped and started).
Afterwards no container and no `conmon` of theirs is left."""

from __future__ import annotations

import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.container.conftest import PODMAN_ENV, build_image, podman
from tests.fixtures.services import LOCAL_POSTGRES_IMAGE, REPO, SERVICES_CHOICE, local_kafka_image

pytestmark = [pytest.mark.integration, pytest.mark.fault]

SUITE = [
    "tests/integration/test_postgres_exactly_once.py::test_crash_at_kill_point_recovers_exactly_once",
    "tests/integration/test_postgres_exactly_once.py::test_restart_mid_run_loses_and_repeats_nothing",
]


@pytest.fixture(scope="module")
def docker_host(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """podman's Docker-compatible API on a private socket, stopped (by PID) afterwards."""
    build_image("kafka", "postgres")
    socket = tmp_path_factory.mktemp("podman") / "podman.sock"
    service = subprocess.Popen(
        ["podman", "system", "service", "--time=0", f"unix://{socket}"],
        env=PODMAN_ENV,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 30
        while not socket.exists():
            if service.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"podman system service did not start: {service.stderr}")
            time.sleep(0.1)
        yield f"unix://{socket}"
    finally:
        service.terminate()
        try:
            service.wait(timeout=30)
        except subprocess.TimeoutExpired:
            service.kill()
            service.wait(timeout=30)


def _orphaned_conmons() -> set[int]:
    """PIDs of `conmon` processes whose container no longer exists. An exec through podman's
    Docker-compatible API leaves one behind per exec (podman 4.3), so the services' readiness
    checks run from the host and must leave none."""
    existing = set(podman("ps", "--all", "--no-trunc", "--format", "{{.ID}}").stdout.split())
    orphans = set()
    for process in Path("/proc").iterdir():
        try:
            if not process.name.isdigit() or (process / "comm").read_text().strip() != "conmon":
                continue
            # A conmon that has exited but is not yet reaped (a zombie: in a container whose
            # PID 1 reaps nothing it can stay one) has an empty cmdline: it left, it is no leak.
            if (process / "stat").read_text().rsplit(")", 1)[1].split()[0] in ("Z", "X"):
                continue
            argv = (process / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue  # it ended meanwhile
        container = next(
            (argv[i + 1].decode() for i, arg in enumerate(argv[:-1]) if arg == b"-c"), None
        )
        if container not in existing:
            orphans.add(int(process.name))
    return orphans


def _ours() -> set[str]:
    listed = podman("ps", "--all", "--format", "{{.ID}} {{.Image}}").stdout.splitlines()
    images = (local_kafka_image(), LOCAL_POSTGRES_IMAGE)
    return {line.split()[0] for line in listed if any(image in line for image in images)}


def test_the_postgres_exactly_once_suite_runs_on_testcontainers_through_podman(
    docker_host: str, tmp_path: Path
) -> None:
    before = _ours()
    orphans_before = _orphaned_conmons()
    environment = {
        key: value
        for key, value in PODMAN_ENV.items()
        if key not in ("KAFKA_BOOTSTRAP_SERVERS", "OFFSETKEEPER_TEST_PG_DSN")
    }
    environment.update(
        {
            "DOCKER_HOST": docker_host,
            "TESTCONTAINERS_RYUK_DISABLED": "true",  # the reaper's image cannot be pulled
            SERVICES_CHOICE: "testcontainers",
            "CI": "true",  # a service that cannot be had fails the child run
        }
    )
    started = time.monotonic()
    child = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", "-rA", *SUITE],
        cwd=REPO,
        env=environment,
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    output = child.stdout + child.stderr
    (tmp_path / "child.log").write_text(output)
    print(f"child pytest took {time.monotonic() - started:.0f}s")
    assert child.returncode == 0, _failures(output)
    assert re.search(
        rf"Kafka broker: 127\.0\.0\.1:\d+ via testcontainers \({re.escape(local_kafka_image())}",
        output,
    ), output[-3000:]
    assert re.search(
        rf"PostgreSQL: postgresql://offsetkeeper:\*+@127\.0\.0\.1:\d+/offsetkeeper via"
        rf" testcontainers \({re.escape(LOCAL_POSTGRES_IMAGE)}",
        output,
    ), output[-3000:]
    summary = re.search(r"^=* ?(\d+) passed", output, re.MULTILINE) or re.search(
        r"(\d+) passed", output
    )
    assert summary is not None
    assert int(summary.group(1)) == 6  # 2 backends x 2 kill points, and 2 outages
    assert " skipped" not in output.splitlines()[-1]
    assert " failed" not in output.splitlines()[-1]
    # testcontainers removed what it started, and nothing of theirs is left running.
    assert _ours() <= before
    # A conmon outlives its container's removal by a moment: wait for it, briefly.
    deadline = time.monotonic() + 15
    while not _orphaned_conmons() <= orphans_before and time.monotonic() < deadline:
        time.sleep(0.5)
    assert _orphaned_conmons() <= orphans_before


# librdkafka's own log lines ("%3|1796224735.784|FAIL|rdkafka#producer-33| ...") during an outage
# would crowd out the consumer logs of a failure.
_LIBRDKAFKA_LOG_LINE = re.compile(r"^(E\s+)?%\d\|\d+\.\d+\|")


def _failures(output: str, limit: int = 40_000) -> str:
    """The child run's failures section and summary, librdkafka's log lines left out."""
    start = output.find("= FAILURES =")
    kept = [
        line
        for line in output[max(start, 0) :].splitlines()
        if not _LIBRDKAFKA_LOG_LINE.match(line)
    ]
    text = "\n".join(kept)
    return text if len(text) <= limit else text[: limit // 2] + "\n[…]\n" + text[-limit // 2 :]
