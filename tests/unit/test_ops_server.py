"""consumer.runtime.ops_server: the real HTTP endpoint on a free local port."""

from __future__ import annotations

import json
import socket
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from consumer import ConfigError, SinkError, TopicPartition
from consumer.core.settings import CONFIG_FILE_ENV, RunSettings, load_settings
from consumer.runtime.health import Health
from consumer.runtime.metrics import Metrics
from consumer.runtime.ops_server import ENDPOINTS, OpsServer
from consumer.runtime.telemetry import Telemetry
from tests.fixtures.fake_backend import FakeClock


@dataclass
class Served:
    server: OpsServer
    health: Health
    metrics: Metrics
    clock: FakeClock

    def get(self, path: str, accept: str | None = None) -> tuple[int, str, bytes]:
        request = urllib.request.Request(f"http://127.0.0.1:{self.server.port}{path}")
        if accept is not None:
            request.add_header("Accept", accept)
        try:
            with urllib.request.urlopen(request, timeout=5) as answer:  # noqa: S310 - our server
                return answer.status, answer.headers["Content-Type"], answer.read()
        except urllib.error.HTTPError as error:
            return error.code, error.headers["Content-Type"], error.read()


@pytest.fixture
def served() -> Iterator[Served]:
    clock = FakeClock()
    health = Health(readiness_timeout_s=30, liveness_timeout_s=120, clock=clock.now)
    metrics = Metrics(app="orders", group="g", process_metrics=False)
    metrics.bind(sink_failing_s=health.sink_failing_for, ready=lambda: health.readiness().ok)
    server = OpsServer("127.0.0.1", 0, metrics.registry, health)
    server.start()
    yield Served(server, health, metrics, clock)
    server.stop()


def test_the_server_listens_on_loopback_unless_told_otherwise(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("OFFSETKEEPER_METRICS_HOST", raising=False)
    monkeypatch.delenv(CONFIG_FILE_ENV, raising=False)
    settings = load_settings(
        RunSettings, {"app": "a:b", "group": "g", "topics": ["t"], "metrics_port": 0}
    )
    registry = Metrics(app="a", group="g", process_metrics=False).registry
    server = OpsServer(settings.metrics_host, settings.metrics_port or 0, registry, Health())
    server.start()
    try:
        assert server.host == "127.0.0.1"
        with urllib.request.urlopen(f"http://127.0.0.1:{server.port}/healthz", timeout=5) as answer:
            assert answer.status == 200
    finally:
        server.stop()


def test_readyz_reports_a_failing_sink_without_the_row_values_in_its_message(
    served: Served,
) -> None:
    row_value = "4111-1111-1111-1111"
    try:
        try:
            raise ValueError(f"numeric field overflow: {row_value}")
        except ValueError as driver_error:
            raise SinkError(
                f"cannot write rows: {row_value}",
                sqlstate="22003",
                reason=f'ERROR: numeric field overflow DETAIL: value "{row_value}"',
            ) from driver_error
    except SinkError as error:
        Telemetry(served.metrics, served.health, clock=served.clock.now).sink_failed(
            "commit", error
        )
    served.health.mark_joined()
    served.clock.sleep(31)

    status, content_type, body = served.get("/readyz")

    assert (status, content_type) == (503, "application/json")
    assert row_value.encode() not in body
    assert b"overflow" not in body
    assert json.loads(body)["reasons"] == [
        "the sink has been failing for 31s: commit failed with SinkError "
        "(ValueError, SQLSTATE 22003)"
    ]


def test_metrics_are_served_in_the_prometheus_text_format(served: Served) -> None:
    served.metrics.committed(TopicPartition("orders", 3)).inc(7)

    status, content_type, body = served.get("/metrics")

    assert status == 200
    assert content_type.startswith("text/plain; version=")
    text = body.decode()
    assert 'offsetkeeper_records_committed_total{partition="3",topic="orders"} 7.0' in text
    assert "offsetkeeper_ready 0.0" in text  # not joined yet
    assert "# HELP offsetkeeper_consumer_lag " in text


def test_openmetrics_is_served_when_the_scraper_asks_for_it(served: Served) -> None:
    status, content_type, body = served.get(
        "/metrics", accept="application/openmetrics-text; version=1.0.0"
    )

    assert status == 200
    assert content_type.startswith("application/openmetrics-text")
    assert body.rstrip().endswith(b"# EOF")


def test_healthz_answers_200_while_alive_and_503_when_the_loop_stalls(served: Served) -> None:
    status, content_type, body = served.get("/healthz")
    assert (status, content_type) == (200, "application/json")
    assert json.loads(body)["status"] == "alive"

    served.clock.sleep(121)
    status, _, body = served.get("/healthz")

    assert status == 503
    assert json.loads(body)["status"] == "stalled"


def test_readyz_says_why_it_is_not_ready(served: Served) -> None:
    status, _, body = served.get("/readyz")
    assert status == 503
    assert json.loads(body)["reasons"] == ["joining the consumer group"]

    served.health.assigned({TopicPartition("orders", 0): 5})
    served.health.ends_sampled({TopicPartition("orders", 0): 9})
    status, _, body = served.get("/readyz")

    assert status == 200
    assert json.loads(body) == {
        "status": "ready",
        "reasons": [],
        "partitions": 1,
        "lag": 4,
        "lag_unknown_partitions": 0,
    }
    assert b"offsetkeeper_ready 1.0" in served.get("/metrics")[2]


def test_head_requests_and_query_strings_work_and_unknown_paths_are_404(served: Served) -> None:
    request = urllib.request.Request(
        f"http://127.0.0.1:{served.server.port}/healthz?verbose=1", method="HEAD"
    )
    with urllib.request.urlopen(request, timeout=5) as answer:  # noqa: S310 - our server
        assert answer.status == 200
        assert answer.read() == b""

    status, _, body = served.get("/nope")

    assert status == 404
    assert json.loads(body)["paths"] == list(ENDPOINTS)


def test_a_port_in_use_is_a_clear_config_error() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        server = OpsServer(
            "127.0.0.1", port, Metrics(app="a", group="g", process_metrics=False).registry, Health()
        )

        with pytest.raises(ConfigError, match="cannot listen on the metrics port") as caught:
            server.start()

    assert caught.value.context["port"] == port
