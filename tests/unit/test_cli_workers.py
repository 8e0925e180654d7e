"""consumer.cli.workers: each worker's command line, read back by the real parser and settings
(flags, environment and config file together), and the `workers` setting."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from consumer import ConfigError
from consumer.cli.common import cli_values
from consumer.cli.main import build_parser
from consumer.cli.run import RUN_SETTINGS
from consumer.cli.workers import python_command, run_arguments, worker_arguments
from consumer.core.settings import RunSettings, load_settings

REPO = Path(__file__).resolve().parents[2]
REQUIRED = ("--app", "a:b", "--group", "g", "--topic", "t")


@pytest.fixture(autouse=True)
def _clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("OFFSETKEEPER_"):
            monkeypatch.delenv(name)


def _settings(*argv: str) -> RunSettings:
    args = build_parser().parse_args(["run", *argv])
    return load_settings(RunSettings, cli_values(args, RUN_SETTINGS), args.config)


def test_workers_defaults_to_one_and_is_bounded() -> None:
    assert _settings(*REQUIRED).workers == 1
    assert _settings(*REQUIRED, "--workers", "4").workers == 4
    for wrong in ("0", "257"):
        with pytest.raises(ConfigError, match="workers"):
            _settings(*REQUIRED, "--workers", wrong)


def test_the_run_arguments_lose_the_workers_flag_in_both_spellings() -> None:
    line = ["run", "--workers", "4", *REQUIRED, "--workers=3", "-X", "a=b"]
    assert run_arguments(line) == [*REQUIRED, "-X", "a=b"]
    assert run_arguments(REQUIRED) == list(REQUIRED)


def test_each_worker_gets_its_client_id_and_port_and_no_supervisor_of_its_own(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = tmp_path / "offsetkeeper.toml"
    config.write_text("workers = 3\nmetrics_port = 9000\n", encoding="utf-8")
    monkeypatch.setenv("OFFSETKEEPER_CONFIG", str(config))
    monkeypatch.setenv("OFFSETKEEPER_WORKERS", "5")
    monkeypatch.setenv("OFFSETKEEPER_METRICS_HOST", "0.0.0.0")  # noqa: S104 - the image's value
    monkeypatch.setenv("OFFSETKEEPER_KAFKA_CONFIG", '{"client.id": "orders-eu"}')
    given = ["run", *REQUIRED, "--workers", "4", "-X", "session.timeout.ms=6000"]
    supervisor = _settings(*given[1:])
    assert supervisor.workers == 4

    argv = worker_arguments(
        run_arguments(given), index=2, kafka_config=supervisor.kafka_config, metrics_port=41234
    )
    worker = _settings(*argv)

    assert worker.workers == 1, "a worker never supervises"
    assert worker.kafka_config == {"client.id": "orders-eu-w2", "session.timeout.ms": "6000"}
    assert (worker.metrics_port, worker.metrics_host) == (41234, "127.0.0.1")
    assert (worker.app, worker.group, worker.topics) == ("a:b", "g", ["t"])


def test_static_membership_ids_are_per_worker_and_the_client_id_has_a_default() -> None:
    argv = worker_arguments(
        list(REQUIRED),
        index=0,
        kafka_config={"group.instance.id": "pod-7"},
        metrics_port=None,
    )
    worker = _settings(*argv)
    assert worker.kafka_config == {"client.id": "offsetkeeper-w0", "group.instance.id": "pod-7-w0"}
    assert worker.metrics_port is None, "no supervisor endpoint, no worker endpoints"


def test_workers_import_like_the_console_script(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    assert python_command("py") == ["py", "-P", "-m", "consumer.cli.main", "run"]
    monkeypatch.chdir(REPO)  # a checkout: offsetkeeper itself is found in the directory
    assert python_command("py") == ["py", "-m", "consumer.cli.main", "run"]


def test_a_worker_says_which_it_is_on_every_log_line(tmp_path: Path) -> None:
    script = (
        "import structlog\n"
        "from consumer.runtime.logs import configure_logging\n"
        "configure_logging('info', 'json', context={'worker': 3})\n"
        "structlog.get_logger('x').info('hello', n=1)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True, timeout=60
    )
    line = json.loads(done.stderr.strip())
    assert (line["event"], line["worker"], line["n"]) == ("hello", 3, 1)


def test_log_lines_of_processes_sharing_one_file_never_interleave(tmp_path: Path) -> None:
    """The workers share the supervisor's stderr: each line must be one write, or two
    processes logging at once glue their lines together (as a test once saw)."""
    log = tmp_path / "shared.log"
    script = (
        "import structlog, sys\n"
        "from consumer.runtime.logs import configure_logging\n"
        "configure_logging('info', 'json', context={'worker': int(sys.argv[1])})\n"
        "for i in range(3000): structlog.get_logger('x').info('line', i=i, pad='x' * 200)\n"
    )
    with log.open("ab") as shared:
        writers = [
            subprocess.Popen([sys.executable, "-c", script, str(worker)], stderr=shared)
            for worker in (0, 1, 2)
        ]
        for writer in writers:
            assert writer.wait(timeout=120) == 0
    lines = log.read_text().splitlines()
    parsed = [json.loads(line) for line in lines]  # a glued line would not parse
    assert len(parsed) == 9000
    assert sorted({(e["worker"], e["i"]) for e in parsed}) == sorted(
        (w, i) for w in (0, 1, 2) for i in range(3000)
    )
