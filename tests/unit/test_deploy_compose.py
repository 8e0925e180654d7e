"""docker-compose.yml, checked against the CLI's real settings and parser (no Docker needed):
services and their dependencies, ports, environment, healthchecks, shutdown timing, replay."""

from __future__ import annotations

import re
from typing import Any
from urllib.parse import urlsplit

import pytest

from consumer.cli.main import build_parser
from consumer.core.settings import ReplaySettings, RunSettings
from consumer.runtime.shutdown import ABORT_GRACE_S
from tests.fixtures.deploy import (
    REPO,
    compose,
    dockerfile,
    interpolate,
    setting_names,
    settings_from,
)
from tests.fixtures.services import KAFKA_IMAGE, POSTGRES_IMAGE


def _service(name: str) -> dict[str, Any]:
    service: dict[str, Any] = compose()["services"][name]
    return service


def _seconds(duration: str) -> float:
    found = re.fullmatch(r"(\d+)(s|m)", duration)
    assert found, duration
    return int(found.group(1)) * (60 if found.group(2) == "m" else 1)


def test_the_topology_is_broker_database_consumer_and_replay() -> None:
    services = compose()["services"]

    assert set(services) == {"kafka", "postgres", "consumer", "replay", "sample-orders"}
    assert services["replay"]["profiles"] == ["replay"]
    assert services["sample-orders"]["profiles"] == ["demo"]
    assert "profiles" not in services["consumer"]  # `docker compose up` starts it
    # The same images the testcontainers fixtures use, so CI has tried them.
    assert services["kafka"]["image"] == KAFKA_IMAGE
    assert services["postgres"]["image"] == POSTGRES_IMAGE


def test_kafka_runs_in_kraft_mode_and_advertises_what_the_consumer_dials() -> None:
    kafka = _service("kafka")["environment"]

    assert kafka["KAFKA_PROCESS_ROLES"] == "broker,controller"
    assert kafka["KAFKA_CONTROLLER_QUORUM_VOTERS"] == "1@kafka:9093"
    assert not any("ZOOKEEPER" in key for key in kafka)
    advertised = dict(
        (item.split("://")[0], item.split("://")[1])
        for item in kafka["KAFKA_ADVERTISED_LISTENERS"].split(",")
    )
    for name in ("consumer", "replay"):
        dialled = _service(name)["environment"]["OFFSETKEEPER_BOOTSTRAP_SERVERS"]
        assert dialled == advertised["PLAINTEXT"] == "kafka:9092"
    host_port = advertised["HOST"].rsplit(":", 1)[1]
    assert f"127.0.0.1:{host_port}:{host_port}" in _service("kafka")["ports"]


@pytest.mark.parametrize("name", ["consumer", "replay"])
def test_the_sink_dsn_matches_the_postgres_service(name: str) -> None:
    postgres = _service("postgres")["environment"]
    dsn = urlsplit(_service(name)["environment"]["OFFSETKEEPER_SINK"])

    assert dsn.scheme == "postgresql"
    assert (dsn.hostname, dsn.port) == ("postgres", 5432)
    assert dsn.username == postgres["POSTGRES_USER"]
    assert dsn.password == postgres["POSTGRES_PASSWORD"]
    assert dsn.path == f"/{postgres['POSTGRES_DB']}"


@pytest.mark.parametrize("name", ["consumer", "replay"])
def test_it_starts_after_a_healthy_broker_and_database(name: str) -> None:
    assert _service(name)["depends_on"] == {
        "kafka": {"condition": "service_healthy"},
        "postgres": {"condition": "service_healthy"},
    }
    assert "healthcheck" in _service("kafka")
    assert "healthcheck" in _service("postgres")


def test_the_consumer_environment_is_made_of_real_run_settings() -> None:
    environment = _service("consumer")["environment"]

    assert setting_names(environment) <= set(RunSettings.model_fields)
    settings = settings_from(RunSettings, environment)  # the CLI's own loader accepts it
    assert isinstance(settings, RunSettings)
    assert (settings.group, settings.topics) == ("orders", ["orders"])
    assert settings.app == "consumer.examples.orders:app"
    assert settings.metrics_port == 9108
    # Set here, not only in the image: the default (127.0.0.1) would hide the published port.
    assert environment["OFFSETKEEPER_METRICS_HOST"] == "0.0.0.0"  # noqa: S104 - a container
    assert settings.metrics_host == "0.0.0.0"  # noqa: S104
    assert settings.log_format == "json"


def test_the_consumer_command_parses_as_the_run_command() -> None:
    consumer = _service("consumer")
    args = build_parser().parse_args(consumer["command"])
    assert args.command == "run"
    assert consumer["build"] == {"context": ".", "dockerfile": "ops/Dockerfile"}
    assert (REPO / consumer["build"]["dockerfile"]).is_file()


def test_the_metrics_port_is_published_for_each_replica() -> None:
    consumer = _service("consumer")
    port = consumer["environment"]["OFFSETKEEPER_METRICS_PORT"]

    [published] = consumer["ports"]
    host, host_ports, container_port = published.split(":")
    assert host == "127.0.0.1"
    assert container_port == port
    first, last = (int(p) for p in host_ports.split("-"))
    assert first == int(port)
    assert last - first + 1 >= 3, "room for `--scale consumer=3`"


def test_the_consumer_healthcheck_is_the_image_healthcheck_on_healthz() -> None:
    check = _service("consumer")["healthcheck"]
    [image_check] = [i for i in dockerfile() if i.keyword == "HEALTHCHECK"]

    assert check["test"] == ["CMD", *image_check.exec_form()]
    assert "/healthz" in check["test"][-1]
    assert "OFFSETKEEPER_METRICS_PORT" in check["test"][-1]


def test_the_consumer_restarts_and_gets_time_to_shut_down_gracefully() -> None:
    consumer = _service("consumer")
    deadline = float(consumer["environment"]["OFFSETKEEPER_SHUTDOWN_DEADLINE_S"])

    assert consumer["restart"] in ("unless-stopped", "always")
    assert _seconds(consumer["stop_grace_period"]) >= deadline + ABORT_GRACE_S


def test_the_replay_service_is_a_valid_replay_command() -> None:
    replay = _service("replay")
    argv = [interpolate(part) for part in replay["command"]]
    args = build_parser().parse_args(argv)

    assert args.command == "replay"
    assert (args.from_offset, args.to_end) == (0, True)
    overridden = [interpolate(p, {"REPLAY_FROM_OFFSET": "1234"}) for p in replay["command"]]
    assert build_parser().parse_args(overridden).from_offset == 1234
    environment = {k: interpolate(str(v)) for k, v in replay["environment"].items()}
    assert setting_names(environment) <= set(ReplaySettings.model_fields)
    settings = settings_from(ReplaySettings, environment)
    assert isinstance(settings, ReplaySettings)
    assert settings.topic == "orders"
    assert replay["restart"] == "no"
    assert replay["healthcheck"] == {"disable": True}  # it serves no endpoint
    assert replay["image"] == _service("consumer")["image"]


def test_the_readme_shows_how_to_use_each_service() -> None:
    deploying = (REPO / "README.md").read_text(encoding="utf-8").split("## Deploying", 1)[1]
    deploying = deploying.split("\n## ", 1)[0]
    assert "docker compose up -d --build" in deploying
    assert "docker compose --profile replay run --rm replay" in deploying
    assert "docker compose --profile demo run --rm sample-orders" in deploying
