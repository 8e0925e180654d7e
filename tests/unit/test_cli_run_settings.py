"""`offsetkeeper run` settings end to end: every setting has a flag that reaches it, an
OFFSETKEEPER_* variable, a config-file key, and a row in the README's Configuration table."""

from __future__ import annotations

import argparse
import os
import re
from pathlib import Path

import pytest

from consumer import ConfigError
from consumer.cli.common import cli_values
from consumer.cli.main import build_parser
from consumer.cli.run import RUN_SETTINGS
from consumer.core.settings import RunSettings, load_settings

README = Path(__file__).resolve().parents[2] / "README.md"
REQUIRED = ("--app", "a:b", "--group", "g", "--topic", "t")
OPERATIONS = (
    "metrics_port",
    "metrics_host",
    "shutdown_deadline_s",
    "lag_interval_s",
    "readiness_timeout_s",
    "liveness_timeout_s",
)


@pytest.fixture(autouse=True)
def _clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("OFFSETKEEPER_"):
            monkeypatch.delenv(name)


def _run_parser() -> argparse.ArgumentParser:
    parser = build_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    run: argparse.ArgumentParser = commands.choices["run"]
    return run


def _settings(*argv: str) -> RunSettings:
    args = build_parser().parse_args(["run", *REQUIRED, *argv])
    return load_settings(RunSettings, cli_values(args, RUN_SETTINGS), args.config)


def test_every_run_setting_is_read_from_a_flag() -> None:
    dests = {action.dest for action in _run_parser()._actions}

    assert set(RUN_SETTINGS) == set(RunSettings.model_fields)
    assert set(RUN_SETTINGS) <= dests


def test_operations_defaults() -> None:
    settings = _settings()

    assert settings.metrics_port is None
    assert settings.metrics_host == "127.0.0.1"
    assert settings.shutdown_deadline_s == 30.0
    assert settings.lag_interval_s == 10.0
    assert settings.readiness_timeout_s == 30.0
    assert settings.liveness_timeout_s == 120.0


def test_operations_flags_reach_the_settings() -> None:
    settings = _settings(
        "--metrics-port",
        "9108",
        "--metrics-host",
        "127.0.0.1",
        "--shutdown-deadline",
        "12.5",
        "--lag-interval",
        "2",
        "--readiness-timeout",
        "45",
        "--liveness-timeout",
        "300",
    )

    assert (settings.metrics_port, settings.metrics_host) == (9108, "127.0.0.1")
    assert settings.shutdown_deadline_s == 12.5
    assert settings.lag_interval_s == 2
    assert settings.readiness_timeout_s == 45
    assert settings.liveness_timeout_s == 300


def test_operations_settings_from_env_and_file_with_cli_first(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = tmp_path / "offsetkeeper.toml"
    config.write_text(
        "metrics_port = 9000\nshutdown_deadline_s = 20.0\nlag_interval_s = 5.0\n",
        encoding="utf-8",
    )
    monkeypatch.setenv("OFFSETKEEPER_CONFIG", str(config))
    monkeypatch.setenv("OFFSETKEEPER_SHUTDOWN_DEADLINE_S", "25")
    monkeypatch.setenv("OFFSETKEEPER_READINESS_TIMEOUT_S", "8")

    settings = _settings("--lag-interval", "1")

    assert settings.metrics_port == 9000  # file
    assert settings.shutdown_deadline_s == 25  # env beats file
    assert settings.readiness_timeout_s == 8  # env
    assert settings.lag_interval_s == 1  # CLI beats file


@pytest.mark.parametrize(
    ("flag", "value", "setting"),
    [
        ("--metrics-port", "70000", "metrics_port"),
        ("--metrics-port", "-1", "metrics_port"),
        ("--shutdown-deadline", "0", "shutdown_deadline_s"),
        ("--lag-interval", "0", "lag_interval_s"),
        ("--readiness-timeout", "-3", "readiness_timeout_s"),
        ("--liveness-timeout", "0", "liveness_timeout_s"),
    ],
)
def test_out_of_range_operations_settings_are_config_errors(
    flag: str, value: str, setting: str
) -> None:
    with pytest.raises(ConfigError, match=setting):
        _settings(flag, value)


def _readme_rows() -> dict[str, tuple[str, str]]:
    """Configuration table rows: file key -> (flag column, env column)."""
    section = README.read_text(encoding="utf-8").split("## Configuration", 1)[1].split("\n## ")[0]
    rows: dict[str, tuple[str, str]] = {}
    for line in section.splitlines():
        found = re.match(r"\| `(\w+)` \| (.+?) \| (.+?) \| .+ \|$", line)
        if found:
            rows[found.group(1)] = (found.group(2), found.group(3))
    return rows


def test_the_readme_documents_every_run_setting_with_its_flag_and_variable() -> None:
    rows = _readme_rows()
    flags = {action.dest: action.option_strings for action in _run_parser()._actions}

    for name in RunSettings.model_fields:
        assert name in rows, f"README Configuration table lacks `{name}`"
        flag_column, env_column = rows[name]
        assert f"`OFFSETKEEPER_{name.upper()}" in env_column, name
        assert any(f"`{option}" in flag_column for option in flags[name]), (name, flag_column)


def test_the_operations_settings_are_documented_in_the_readme() -> None:
    assert set(OPERATIONS) <= set(_readme_rows())


def test_decoding_and_bad_record_flags_reach_the_settings(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    config = tmp_path / "offsetkeeper.toml"
    config.write_text('bad_record_retries = 7\n[reader_schema]\norders = "from-file.avsc"\n')
    monkeypatch.setenv("OFFSETKEEPER_CONFIG", str(config))
    monkeypatch.setenv("OFFSETKEEPER_DECODE", '{"orders": "avro", "clicks": "json"}')
    monkeypatch.setenv("OFFSETKEEPER_SCHEMA_REGISTRY_URL", "http://u:secret@127.0.0.1:8081")

    settings = _settings(
        "--decode",
        "clicks=avro-local",
        "--on-bad-record",
        "dead-letter",
        "--dead-letter-topic",
        "{topic}.bad",
        "--bad-record-backoff",
        "0.5",
    )

    # Per-topic maps merge across sources; for one topic the flag beats the environment.
    assert settings.decode == {"orders": "avro", "clicks": "avro-local"}
    assert settings.reader_schema == {"orders": "from-file.avsc"}
    assert settings.schema_registry_url is not None
    assert "secret" not in str(settings.schema_registry_url)
    assert settings.on_bad_record == "dead-letter"
    assert settings.dead_letter_topic == "{topic}.bad"
    assert settings.bad_record_retries == 7
    assert settings.bad_record_backoff_s == 0.5
    assert settings.bad_record_max_backoff_s == 5.0


def test_a_decode_flag_without_a_topic_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        _settings("--decode", "avro")
    assert "expected KEY=VALUE" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("flag", "value"),
    [("--on-bad-record", "skip"), ("--bad-record-retries", "-1"), ("--bad-record-backoff", "-2")],
)
def test_invalid_bad_record_settings_are_refused(flag: str, value: str) -> None:
    with pytest.raises((ConfigError, SystemExit)):
        _settings(flag, value)
