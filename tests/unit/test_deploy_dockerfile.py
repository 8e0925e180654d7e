"""ops/Dockerfile, checked without a Docker engine: its structure, that the entrypoint is the
console script the tests run, that it installs exactly the locked dependency set, and that its
HEALTHCHECK command really works against the real health endpoint."""

from __future__ import annotations

import importlib.metadata
import re
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from consumer.core.settings import RunSettings
from consumer.runtime.health import Health
from consumer.runtime.metrics import Metrics
from consumer.runtime.ops_server import OpsServer
from tests.fixtures.deploy import (
    REPO,
    Instruction,
    dockerfile,
    dockerfile_args,
    run_commands,
)
from tests.fixtures.fake_backend import FakeClock
from tests.fixtures.processes import OFFSETKEEPER

PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))


def _only(keyword: str, stage: int | None = None) -> Instruction:
    found = [i for i in dockerfile() if i.keyword == keyword and stage in (None, i.stage)]
    assert len(found) == 1, f"expected one {keyword}, found {len(found)}"
    return found[0]


def _final_stage() -> int:
    return max(i.stage for i in dockerfile())


def _env(stage: int) -> dict[str, str]:
    found: dict[str, str] = {}
    for instruction in dockerfile():
        if instruction.keyword == "ENV" and instruction.stage == stage:
            found.update(re.findall(r"(\w+)=(\S+)", instruction.text))
    return found


def _locked() -> dict[str, str]:
    pins = {}
    for line in (REPO / "requirements.lock").read_text(encoding="utf-8").splitlines():
        if line and not line.startswith("#"):
            name, _, version = line.partition("==")
            pins[canonicalize_name(name)] = version
    return pins


def _stage_named(name: str) -> int:
    (found,) = [
        i.stage for i in dockerfile() if i.keyword == "FROM" and i.text.endswith(f" AS {name}")
    ]
    return found


def _run_text(stage: int) -> str:
    return " ".join(i.text for i in dockerfile() if i.keyword == "RUN" and i.stage == stage)


def test_stages_on_a_debian_base_with_debians_python_a_build_arg_selects_the_base() -> None:
    froms = [i.text for i in dockerfile() if i.keyword == "FROM"]
    assert froms == ["${BASE_IMAGE} AS python", "python AS build", "python"]
    # A public default for users; ops/image passes its local debootstrap-made base.
    assert dockerfile_args()["BASE_IMAGE"] == "debian:bookworm-slim"
    assert "BASE_IMAGE=$BASE" in (REPO / "ops" / "image").read_text(encoding="utf-8")
    # The lock was resolved on Python 3.11; bookworm's python3 is 3.11.
    assert sys.version_info[:2] == (3, 11)
    assert PYPROJECT["project"]["requires-python"] == ">=3.11"
    installs = [argv for argv in run_commands(_stage_named("python")) if "install" in argv]
    assert installs == [
        [
            "DEBIAN_FRONTEND=noninteractive",
            "apt-get",
            "install",
            "-y",
            "--no-install-recommends",
            "python3",
        ]
    ]


def test_the_build_stage_installs_the_project_constrained_by_the_lock() -> None:
    build = _stage_named("build")
    copied = " ".join(i.text for i in dockerfile() if i.keyword == "COPY" and i.stage == build)
    for needed in ("requirements.lock", "pyproject.toml", "README.md"):
        assert needed in copied
    for package in ("consumer", "sinks", "schemas"):
        assert f"{package} ./{package}" in copied
    assert "ops/images/wheelhouse /wheelhouse" in copied
    install = _run_text(build)
    # From the wheelhouse only when there is one; always constrained by the lock; pip runs from
    # its wheel with the virtualenv's python and is not installed into it.
    assert "set -- --no-index --find-links /wheelhouse" in install
    assert '/opt/offsetkeeper/bin/python "$pip" install "$@" --constraint requirements.lock .' in (
        install
    )
    assert ["python3", "-m", "venv", "--without-pip", "/opt/offsetkeeper"] in run_commands(build)
    # Every package setuptools ships must come from a directory the image copies.
    found = PYPROJECT["tool"]["setuptools"]["packages"]["find"]["include"]
    shipped = {name.split(".")[0] for name in found}
    assert shipped == {"consumer", "sinks", "schemas"}
    # The wheelhouse directory is in git (empty but for its notes); ops/image fills it.
    ignored = (REPO / "ops/images/wheelhouse/.gitignore").read_text(encoding="utf-8")
    assert "*.whl" in ignored.split()


def test_the_lock_pins_every_runtime_dependency_so_the_image_gets_exactly_those() -> None:
    locked = _locked()
    for requirement in PYPROJECT["project"]["dependencies"]:
        # pyproject gives compatible ranges (so users' installs resolve); the lock picks one
        # version inside each, the one tested.
        parsed = Requirement(requirement)
        assert parsed.specifier.contains(locked[canonicalize_name(parsed.name)]), requirement
    # Walk the installed runtime dependency tree: every package in it is pinned by the lock at
    # the installed version, so `--constraint requirements.lock` leaves pip no choice at all.
    seen: set[str] = set()
    pending = [Requirement(r) for r in PYPROJECT["project"]["dependencies"]]
    while pending:
        requirement = pending.pop()
        name = canonicalize_name(requirement.name)
        if name in seen:
            continue
        seen.add(name)
        distribution = importlib.metadata.distribution(name)
        assert locked.get(name) == distribution.version, f"{name} is not locked as installed"
        for raw in distribution.requires or []:
            child = Requirement(raw)
            extras = requirement.extras or {""}
            if child.marker is None or any(
                child.marker.evaluate({"extra": extra}) for extra in extras
            ):
                pending.append(child)
    assert {"confluent-kafka", "psycopg-binary", "prometheus-client"} <= seen
    assert "pytest" not in seen, "test tools must not reach the image"


def test_the_final_stage_is_the_virtualenv_a_non_root_user_and_no_installer() -> None:
    final = _final_stage()
    assert [i.text for i in dockerfile() if i.keyword == "FROM"][final] == "python"
    copies = [i for i in dockerfile() if i.keyword == "COPY" and i.stage == final]
    assert [(c.flags(), c.text.split()[-2:]) for c in copies] == [
        ({"from": "build"}, ["/opt/offsetkeeper", "/opt/offsetkeeper"])
    ]
    assert not run_commands(final)  # nothing installed, nothing run: the base plus the venv
    assert "pip" not in _run_text(_stage_named("python"))
    user = _only("USER", final).text
    uid, _, gid = user.partition(":")
    assert uid.isdigit()
    assert int(uid) != 0, "the image must not run as root"
    assert gid.isdigit()
    commands = run_commands(_stage_named("python"))
    assert any(argv[:2] == ["useradd", "--system"] and uid in argv for argv in commands)
    assert _env(final)["PATH"].startswith("/opt/offsetkeeper/bin:")


def test_the_entrypoint_is_the_console_script_the_tests_run() -> None:
    final = _final_stage()
    assert _only("ENTRYPOINT", final).exec_form() == ["offsetkeeper"]
    assert _only("CMD", final).exec_form() == ["run"]
    assert _only("STOPSIGNAL", final).text == "SIGTERM"
    # The name the image runs is the project's console script ...
    assert PYPROJECT["project"]["scripts"] == {"offsetkeeper": "consumer.cli.main:main"}
    (script,) = [
        ep
        for ep in importlib.metadata.distribution("offsetkeeper").entry_points
        if ep.group == "console_scripts"
    ]
    assert (script.name, script.value) == ("offsetkeeper", "consumer.cli.main:main")
    # ... and the very executable every integration test starts.
    assert OFFSETKEEPER.endswith("/offsetkeeper")
    assert "from consumer.cli.main import main" in Path(OFFSETKEEPER).read_text(encoding="utf-8")


def test_the_metrics_port_is_exposed_and_served_on_all_interfaces() -> None:
    final = _final_stage()
    env = _env(final)
    assert env["OFFSETKEEPER_METRICS_PORT"] == _only("EXPOSE", final).text == "9108"
    # offsetkeeper itself listens on loopback only; the image opens it to the probes.
    assert RunSettings.model_fields["metrics_host"].default == "127.0.0.1"
    assert env["OFFSETKEEPER_METRICS_HOST"] == "0.0.0.0"  # noqa: S104 - a container's probes
    assert env["OFFSETKEEPER_LOG_FORMAT"] == "json"


def test_the_dockerignore_keeps_local_state_out_of_the_build_context() -> None:
    ignored = (REPO / ".dockerignore").read_text(encoding="utf-8").split()
    assert {".git", ".venv", ".local", "ops/kafka/.jars"} <= set(ignored)
    assert not {"consumer", "sinks", "schemas", "requirements.lock"} & set(ignored)


# -- the HEALTHCHECK command, run for real ------------------------------------------------------


@pytest.fixture
def endpoint() -> Iterator[tuple[OpsServer, FakeClock]]:
    clock = FakeClock()
    health = Health(liveness_timeout_s=120, clock=clock.now)
    server = OpsServer(
        "127.0.0.1", 0, Metrics(app="a", group="g", process_metrics=False).registry, health
    )
    server.start()
    yield server, clock
    server.stop()


def healthcheck_command() -> list[str]:
    instruction = _only("HEALTHCHECK", _final_stage())
    assert instruction.flags() == {
        "interval": "15s",
        "timeout": "5s",
        "start-period": "30s",
        "retries": "3",
    }
    return instruction.exec_form()


def _run_check(command: list[str], port: int) -> int:
    assert command[0] == "python"  # the image's python: the virtualenv's, first on PATH
    return subprocess.run(
        [sys.executable, *command[1:]],
        env={"OFFSETKEEPER_METRICS_PORT": str(port)},
        capture_output=True,
        timeout=30,
        check=False,
    ).returncode


def test_the_healthcheck_passes_while_the_loop_is_alive_and_fails_otherwise(
    endpoint: tuple[OpsServer, FakeClock],
) -> None:
    server, clock = endpoint
    command = healthcheck_command()
    assert "/healthz" in command[-1]

    assert _run_check(command, server.port) == 0
    clock.sleep(121)  # the partition loop stalls: /healthz answers 503
    assert _run_check(command, server.port) != 0
    server.stop()  # nothing listens at all
    assert _run_check(command, server.port) != 0
