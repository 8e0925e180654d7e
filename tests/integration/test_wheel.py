"""The package as users get it: the wheel built from this tree, installed into a clean venv
(runtime dependencies resolved from pyproject's ranges, constrained to requirements.lock),
runs `offsetkeeper --help`, `--version`, a short real run against the broker into SQLite, and
the test kit, with nothing from the source tree on its path."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from consumer import __version__
from tests.fixtures.kafka_tools import create_topic, encode, order_event, produce, unique_name
from tests.fixtures.processes import FAST_GROUP_SETTINGS
from tests.fixtures.services import Service
from tests.integration.conftest import sqlite_checkpoints, sqlite_rows

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
LOCK = REPO / "requirements.lock"
# Dependency wheels downloaded once and kept (gitignored), so later runs install offline.
WHEELHOUSE = REPO / ".local" / "wheelhouse"
# What the wheel is built from: the package's sources and metadata, nothing else.
SOURCES = ("consumer", "sinks", "schemas", "pyproject.toml", "README.md")


def _pip(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pip", "--disable-pip-version-check", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def _checked(completed: subprocess.CompletedProcess[str]) -> str:
    assert completed.returncode == 0, f"{completed.args}:\n{completed.stderr[-3000:]}"
    return completed.stdout


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A venv with the wheel installed; its bin directory."""
    work = tmp_path_factory.mktemp("wheel")
    source = work / "source"
    source.mkdir()
    for name in SOURCES:
        origin = REPO / name
        if origin.is_dir():
            shutil.copytree(origin, source / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(origin, source / name)
    _checked(_pip("wheel", "--no-deps", "--quiet", "--wheel-dir", str(work / "dist"), str(source)))
    [wheel] = (work / "dist").glob("offsetkeeper-*.whl")
    assert wheel.name == f"offsetkeeper-{__version__}-py3-none-any.whl"
    venv = work / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    # pip runs from this venv (the new one has none) and installs into the new one.
    install = ("--python", str(venv / "bin" / "python"), "install", "--quiet", "-c", str(LOCK))
    offline = _pip(*install, "--no-index", "--find-links", str(WHEELHOUSE), str(wheel))
    if offline.returncode != 0:  # first run, or the lock changed: fetch what is missing
        _checked(_pip("download", "--quiet", "-d", str(WHEELHOUSE), "-c", str(LOCK), str(wheel)))
        for copied in WHEELHOUSE.glob("offsetkeeper-*"):  # only the dependencies are kept
            copied.unlink()
        _checked(_pip(*install, "--no-index", "--find-links", str(WHEELHOUSE), str(wheel)))
    return venv / "bin"


def _run(command: list[str], cwd: Path, timeout: float = 120) -> str:
    completed = subprocess.run(
        command, cwd=cwd, capture_output=True, text=True, timeout=timeout, check=False
    )
    assert completed.returncode == 0, f"{command}:\n{completed.stderr[-3000:]}"
    return completed.stdout


def test_the_installed_command_answers_help_and_version(installed: Path, tmp_path: Path) -> None:
    assert "checkpoint" in _run([str(installed / "offsetkeeper"), "--help"], tmp_path)
    version = _run([str(installed / "offsetkeeper"), "--version"], tmp_path)
    assert version.strip() == f"offsetkeeper {__version__}"
    where = _run(
        [str(installed / "python"), "-c", "import consumer; print(consumer.__file__)"], tmp_path
    )
    assert where.startswith(str(installed.parent)), "consumer came from outside the venv"


def test_the_installed_command_consumes_into_sqlite(
    installed: Path, kafka: Service, tmp_path: Path
) -> None:
    topic, group = unique_name("wheel-orders"), unique_name("wheel")
    create_topic(kafka.address, topic, 2)
    produce(
        kafka.address,
        topic,
        ((f"o-{n}".encode(), encode(order_event(f"o-{n}", 1))) for n in range(40)),
        partition_of={f"o-{n}".encode(): n % 2 for n in range(40)},
    )
    db = tmp_path / "orders.db"
    _run(
        [
            str(installed / "offsetkeeper"),
            "run",
            "--app",
            "consumer.examples.orders:app",
            "--bootstrap-servers",
            kafka.address,
            "--group",
            group,
            "--topic",
            topic,
            "--sink",
            f"sqlite:///{db}",
            "--stop-when-idle",
            "1",
            "--log-format",
            "json",
            *FAST_GROUP_SETTINGS,
        ],
        tmp_path,
    )
    assert sqlite_rows(db, "SELECT count(*) FROM orders") == [(40,)]
    assert sqlite_checkpoints(db, group) == {0: 20, 1: 20}


def test_the_installed_test_kit_runs_an_example_app(installed: Path, tmp_path: Path) -> None:
    script = (
        "import json\n"
        "from consumer.examples.totals import app\n"
        "from consumer.testing import Message, run_app\n"
        "run = run_app(app, [Message({'customer': 'ann', 'amount_cents': 5}, key='ann')] * 2)\n"
        "print(json.dumps(run.table('customer_totals')))\n"
    )
    printed = _run([str(installed / "python"), "-c", script], tmp_path).strip().splitlines()
    assert json.loads(printed[-1]) == [{"customer": "ann", "total_cents": 10, "currency": "EUR"}]
