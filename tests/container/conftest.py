"""Container tests: podman builds the real images (ops/image) and runs them.

Podman runs with ops/images/containers.conf (runc, no default ulimits) and host networking, so
a container reaches the session's Kafka broker and PostgreSQL on 127.0.0.1. Under CI=true a
missing podman or a failed build fails the run; it is never skipped there.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from tests.conftest import IN_CI
from tests.fixtures.services import REPO

CONTAINERS_CONF = REPO / "ops" / "images" / "containers.conf"
PODMAN_ENV = {**os.environ, "CONTAINERS_CONF": str(CONTAINERS_CONF)}


def podman(
    *args: str, timeout: float = 120, check: bool = True
) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(
        ["podman", *args],
        capture_output=True,
        text=True,
        env=PODMAN_ENV,
        timeout=timeout,
        check=False,
    )
    if check and done.returncode != 0:
        raise AssertionError(f"podman {' '.join(args)} failed ({done.returncode}): {done.stderr}")
    return done


@dataclass(frozen=True)
class Built:
    name: str
    seconds: float


def build_image(*targets: str) -> list[Built]:
    """Run ops/image for the targets; fail (CI) or skip (elsewhere) when it cannot."""
    if shutil.which("podman") is None:
        message = "podman is not installed (ops/system-packages.d/containers.txt lists it)"
        if IN_CI:
            pytest.fail(message, pytrace=False)
        pytest.skip(message)
    started = time.monotonic()
    done = subprocess.run(
        [str(REPO / "ops" / "image"), *targets],
        capture_output=True,
        text=True,
        env=PODMAN_ENV,
        timeout=900,
        check=False,
    )
    if done.returncode != 0:
        pytest.fail(f"ops/image {' '.join(targets)} failed:\n{done.stderr[-4000:]}", pytrace=False)
    seconds = time.monotonic() - started
    print(done.stderr)  # sizes and build times, shown with -s or on failure
    return [Built(line, seconds) for line in done.stdout.split()]


@pytest.fixture(scope="session")
def offsetkeeper_image() -> str:
    (built,) = build_image("offsetkeeper")
    return built.name


class Containers:
    """Every container a test starts, removed by ID when the test ends."""

    def __init__(self) -> None:
        self.ids: list[str] = []

    def run(self, image: str, *args: str, options: tuple[str, ...] = ()) -> str:
        container_id = podman(
            "run", "--detach", "--network=host", *options, image, *args
        ).stdout.strip()
        self.ids.append(container_id)
        return container_id

    def remove_all(self) -> None:
        for container_id in self.ids:
            podman("rm", "--force", "--time", "0", container_id, check=False)


@pytest.fixture
def containers() -> Iterator[Containers]:
    started = Containers()
    yield started
    started.remove_all()
