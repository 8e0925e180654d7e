"""consumer.core.settings: CLI > OFFSETKEEPER_* env > TOML file > defaults; secrets stay secret."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
from pydantic import SecretStr

from consumer import ConfigError, mask_url
from consumer.core.settings import CONFIG_FILE_ENV, CheckpointSettings, RunSettings, load_settings

REQUIRED = {"app": "consumer.examples.orders:app", "group": "g", "topics": ["orders"]}


@pytest.fixture(autouse=True)
def _clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """No OFFSETKEEPER_* variable of the machine running the tests leaks into a test."""
    for name in list(os.environ):
        if name.startswith("OFFSETKEEPER_"):
            monkeypatch.delenv(name)


def _config_file(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "offsetkeeper.toml"
    path.write_text(text, encoding="utf-8")
    return path


def _cli(**values: Any) -> dict[str, Any]:
    return {**REQUIRED, **values}


def test_defaults() -> None:
    settings = load_settings(RunSettings, _cli())

    assert settings.bootstrap_servers == "127.0.0.1:9092"
    assert settings.sink.get_secret_value() == "sqlite:///offsetkeeper.db"
    assert settings.kafka_config == {}
    assert settings.log_level == "info"
    assert settings.log_format == "auto"
    assert settings.reset_policy == "earliest"
    assert settings.batch_max_records == 2000
    assert settings.poll_timeout_s == 0.5
    assert settings.stop_when_idle_s is None
    assert settings.sink_retry_deadline_s == 120.0
    assert settings.metrics_host == "127.0.0.1"  # the ops server is not exposed by default
    assert (settings.app, settings.group, settings.topics) == (
        "consumer.examples.orders:app",
        "g",
        ["orders"],
    )


def test_precedence_cli_over_env_over_file_over_defaults(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = _config_file(
        tmp_path,
        'batch_max_records = 10\npoll_timeout_s = 1.5\nreset_policy = "latest"\n'
        'log_level = "warning"\n',
    )
    monkeypatch.setenv("OFFSETKEEPER_BATCH_MAX_RECORDS", "20")
    monkeypatch.setenv("OFFSETKEEPER_POLL_TIMEOUT_S", "2.5")

    settings = load_settings(RunSettings, _cli(batch_max_records=30), config)

    assert settings.batch_max_records == 30  # CLI beats env and file
    assert settings.poll_timeout_s == 2.5  # env beats file
    assert settings.reset_policy == "latest"  # file beats the default
    assert settings.log_level == "warning"
    assert settings.sink_retry_deadline_s == 120.0  # nobody set it: the default


def test_a_cli_value_of_none_means_not_given(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OFFSETKEEPER_GROUP", "from-env")
    monkeypatch.setenv("OFFSETKEEPER_BATCH_MAX_RECORDS", "20")

    settings = load_settings(RunSettings, _cli(group=None, batch_max_records=None))

    assert settings.group == "from-env"
    assert settings.batch_max_records == 20


def test_the_config_file_can_come_from_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = _config_file(tmp_path, 'group = "from-file"\nbootstrap_servers = "kafka:29092"\n')
    monkeypatch.setenv(CONFIG_FILE_ENV, str(config))

    settings = load_settings(RunSettings, {"app": "a:b", "topics": ["t"]})

    assert settings.group == "from-file"
    assert settings.bootstrap_servers == "kafka:29092"


def test_an_explicit_config_file_wins_over_the_environment_variable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    env_file = _config_file(tmp_path, 'group = "env-file"\n')
    explicit = tmp_path / "explicit.toml"
    explicit.write_text('group = "explicit-file"\n', encoding="utf-8")
    monkeypatch.setenv(CONFIG_FILE_ENV, str(env_file))

    settings = load_settings(RunSettings, {"app": "a:b", "topics": ["t"]}, explicit)

    assert settings.group == "explicit-file"


def test_topics_from_env_are_comma_separated(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OFFSETKEEPER_TOPICS", "a,b, c ,")

    settings = load_settings(RunSettings, {"app": "x:y", "group": "g"})

    assert settings.topics == ["a", "b", "c"]


def test_topics_from_the_file_may_be_a_string_or_a_list(tmp_path: Path) -> None:
    as_string = _config_file(tmp_path, 'app = "x:y"\ngroup = "g"\ntopics = "a,b"\n')
    assert load_settings(RunSettings, {}, as_string).topics == ["a", "b"]

    as_list = tmp_path / "list.toml"
    as_list.write_text('app = "x:y"\ngroup = "g"\ntopics = ["c", "d"]\n', encoding="utf-8")
    assert load_settings(RunSettings, {}, as_list).topics == ["c", "d"]


def test_cli_topics_replace_env_topics(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OFFSETKEEPER_TOPICS", "a,b")
    assert load_settings(RunSettings, _cli(topics=["z"])).topics == ["z"]


def test_no_topic_at_all_is_a_config_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OFFSETKEEPER_TOPICS", " , ")
    with pytest.raises(ConfigError, match=r"topics: .*at least one topic"):
        load_settings(RunSettings, {"app": "x:y", "group": "g"})


def test_missing_required_settings_are_named() -> None:
    with pytest.raises(ConfigError) as caught:
        load_settings(RunSettings, {})
    message = str(caught.value)
    assert message.startswith("invalid settings:")
    assert "app: Field required" in message
    assert "group: Field required" in message
    assert "topics: Field required" in message


def test_out_of_range_and_wrong_values_are_config_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ConfigError, match="batch_max_records"):
        load_settings(RunSettings, _cli(batch_max_records=0))
    with pytest.raises(ConfigError, match="reset_policy"):
        load_settings(RunSettings, _cli(reset_policy="sometimes"))
    monkeypatch.setenv("OFFSETKEEPER_POLL_TIMEOUT_S", "soon")
    with pytest.raises(ConfigError, match="poll_timeout_s"):
        load_settings(RunSettings, _cli())


def test_an_unknown_config_file_key_is_a_config_error(tmp_path: Path) -> None:
    config = _config_file(tmp_path, 'group = "g"\nbatch_size = 10\nzzz = 1\n')

    with pytest.raises(ConfigError, match="unknown keys in config file") as caught:
        load_settings(RunSettings, _cli(), config)

    assert caught.value.context["keys"] == ["batch_size", "zzz"]
    assert caught.value.context["path"] == str(config)


def test_an_unreadable_or_invalid_config_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_settings(RunSettings, _cli(), tmp_path / "missing.toml")
    broken = _config_file(tmp_path, "group = \n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_settings(RunSettings, _cli(), broken)


def test_a_run_only_key_in_the_file_is_ignored_by_the_checkpoint_command(tmp_path: Path) -> None:
    config = _config_file(tmp_path, 'group = "g"\nbatch_max_records = 5\napp = "x:y"\n')

    settings = load_settings(CheckpointSettings, {}, config)

    assert settings.group == "g"
    assert not hasattr(settings, "batch_max_records")


def test_kafka_config_passes_through_from_file_and_cli(tmp_path: Path) -> None:
    config = _config_file(tmp_path, '[kafka_config]\n"session.timeout.ms" = "6000"\n')

    from_file = load_settings(RunSettings, _cli(), config)
    from_cli = load_settings(RunSettings, _cli(kafka_config={"fetch.min.bytes": "1"}))

    assert from_file.kafka_config == {"session.timeout.ms": "6000"}
    assert from_cli.kafka_config == {"fetch.min.bytes": "1"}


def test_kafka_config_from_env_is_json(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OFFSETKEEPER_KAFKA_CONFIG", '{"client.id": "me"}')
    assert load_settings(RunSettings, _cli()).kafka_config == {"client.id": "me"}


# -- secrets ---------------------------------------------------------------------------------


def test_the_sink_is_a_secret_that_never_shows_its_password(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    url = "postgresql://writer:s3cr3t-pw@db.internal:5432/offsets"
    monkeypatch.setenv("OFFSETKEEPER_SINK", url)

    settings = load_settings(RunSettings, _cli())

    assert isinstance(settings.sink, SecretStr)
    assert settings.sink.get_secret_value() == url
    for shown in (repr(settings), str(settings), repr(settings.sink), str(settings.sink)):
        assert "s3cr3t-pw" not in shown
    assert "s3cr3t-pw" not in settings.model_dump_json()


def test_a_config_error_does_not_show_the_sink_password() -> None:
    with pytest.raises(ConfigError) as caught:
        load_settings(RunSettings, _cli(sink="postgresql://u:hunter2@h/db", batch_max_records=-1))
    assert "hunter2" not in str(caught.value)


@pytest.mark.parametrize(
    ("url", "masked"),
    [
        ("postgresql://user:secret@host:5432/db", "postgresql://user:***@host:5432/db"),
        (
            "postgres://user:p%40ss%2Fw@host/db?sslmode=require",
            "postgres://user:***@host/db?sslmode=require",
        ),
        ("postgresql://:secret@host/db", "postgresql://:***@host/db"),
        ("postgresql://user@host/db", "postgresql://user@host/db"),
        ("postgresql://host:5432/db", "postgresql://host:5432/db"),
        ("sqlite:///relative.db", "sqlite:///relative.db"),
        ("sqlite:////abs/path.db", "sqlite:////abs/path.db"),
    ],
)
def test_mask_url_masks_passwords_only(url: str, masked: str) -> None:
    assert mask_url(url) == masked


@pytest.mark.parametrize(
    ("url", "masked"),
    [
        (
            "postgresql://h/db?password=hunter2&sslmode=require",
            "postgresql://h/db?password=***&sslmode=require",
        ),
        (
            "kafka://h:9092/t?sasl.password=hunter2&sasl.username=me@corp&linger.ms=5",
            "kafka://h:9092/t?sasl.password=***&sasl.username=me@corp&linger.ms=5",
        ),
        (
            "kafka://h:9092/t?ssl.key.password=hunter2&ssl.keystore.location=/k.p12",
            "kafka://h:9092/t?ssl.key.password=***&ssl.keystore.location=/k.p12",
        ),
        (
            "kafka://h:9/t?SASL.PASSWORD=hunter2&sasl.oauthbearer.client.secret=hunter2",
            "kafka://h:9/t?SASL.PASSWORD=***&sasl.oauthbearer.client.secret=***",
        ),
        ("http://h/x?passwd=hunter2&pwd=hunter2", "http://h/x?passwd=***&pwd=***"),
        ("http://h/x?token=hunter2;api_token=hunter2", "http://h/x?token=***;api_token=***"),
        ("http://h/x?client_secret=hunter2&x=1", "http://h/x?client_secret=***&x=1"),
        ("http://h/x?sasl%2Epassword=hunter2", "http://h/x?sasl%2Epassword=***"),
        ("postgresql://u:pw@h/db?password=hunter2", "postgresql://u:***@h/db?password=***"),
        ("postgresql://h?password=hunter2", "postgresql://h?password=***"),
        (
            "postgresql://h/db?passfile=/home/me/.pgpass",
            "postgresql://h/db?passfile=/home/me/.pgpass",
        ),
        ("sqlite:///x.db?password=hunter2", "sqlite:///x.db?password=***"),
        # A raw "?", "@" or "/" in a password: the whole user info is masked.
        ("postgresql://u:hunt?er2@h/db", "postgresql://u:***@h/db"),
        ("postgresql://u:hunt@er2@h/db", "postgresql://u:***@h/db"),
        ("postgresql://u:hunt/er2@h/db", "postgresql://u:***@h/db"),
        # Not a URL: a libpq conninfo given where a URL belongs.
        ("host=h password=hunter2 dbname=d", "host=h password=*** dbname=d"),
        ("host=h password = 'hunter2 x' user=u", "host=h password = *** user=u"),
    ],
)
def test_mask_url_masks_secret_query_parameters(url: str, masked: str) -> None:
    shown = mask_url(url)

    assert shown == masked
    assert "hunter2" not in shown
    assert "hunt" not in shown
