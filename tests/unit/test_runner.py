"""consumer.run / consumer.Runner without a broker: settings as the CLI takes them, and the
RunResult's account of how a run ended (the real runs are in tests/integration)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

import consumer
from consumer import ConfigError, KafkaError, Runner, RunSettings
from consumer.examples.orders import app
from consumer.runner.result import RunRecorder
from consumer.runtime.shutdown import ShutdownAborted


@pytest.fixture(autouse=True)
def _clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("OFFSETKEEPER_"):
            monkeypatch.delenv(name)


def test_keyword_settings_are_read_like_flags_over_environment_and_file(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    config = tmp_path / "offsetkeeper.toml"
    config.write_text('group = "from-file"\nbatch_max_records = 7\npoll_timeout_s = 2.0\n')
    monkeypatch.setenv("OFFSETKEEPER_BATCH_MAX_RECORDS", "9")

    runner = Runner(app, topics=["orders"], poll_timeout_s=0.25, config_file=config)

    settings = runner.settings
    assert (settings.group, settings.batch_max_records, settings.poll_timeout_s) == (
        "from-file",
        9,
        0.25,
    )
    assert settings.app == "orders"  # an App object: its name labels metrics and logs
    assert Runner("consumer.examples.orders:app", group="g", topics="a,b").settings.topics == [
        "a",
        "b",
    ]


def test_invalid_settings_raise_config_error_before_anything_runs() -> None:
    with pytest.raises(ConfigError, match="topics"):
        Runner(app, group="g")
    with pytest.raises(ConfigError, match="batch_max_records"):
        Runner(app, group="g", topics=["t"], batch_max_records=0)
    with pytest.raises(ConfigError, match="--workers N"):
        Runner(app, group="g", topics=["t"], workers=2)
    settings = RunSettings(app="a:b", group="g", topics=["t"])
    with pytest.raises(ConfigError, match="not both"):
        Runner(app, settings, group="other")
    assert Runner(app, settings).settings is settings


def test_a_run_ending_in_an_offsetkeeper_error_returns_it() -> None:
    def broker_gone() -> int:
        raise KafkaError("no broker answered", waited_s=300)

    result = RunRecorder().outcome(broker_gone)

    assert (result.stop_reason, result.exit_code, result.ok) == ("error", 1, False)
    assert isinstance(result.error, KafkaError)
    with pytest.raises(KafkaError, match="no broker answered"):
        result.raise_for_error()


def test_an_aborted_shutdown_and_a_clean_stop_say_so() -> None:
    def aborted() -> int:
        raise ShutdownAborted("second SIGTERM")

    assert RunRecorder().outcome(aborted).stop_reason == "aborted"
    assert RunRecorder().outcome(aborted).exit_code == 5
    clean = RunRecorder().outcome(lambda: 0)
    assert (clean.stop_reason, clean.exit_code, clean.committed, clean.records) == (
        "idle",
        0,
        {},
        0,
    )
    assert clean.raise_for_error() is clean


def test_a_bug_is_not_swallowed() -> None:
    def bug() -> int:
        raise ZeroDivisionError

    with pytest.raises(ZeroDivisionError):
        RunRecorder().outcome(bug)


def test_the_api_and_the_version_are_public() -> None:
    assert consumer.run.__module__ == "consumer"
    assert consumer.RunResult.__module__ == "consumer"
    assert consumer.__version__.count(".") == 2
