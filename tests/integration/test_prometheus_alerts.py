"""The alert rules and the dashboard's queries in a real Prometheus server (Debian's
`prometheus`) scraping a live consumer on 127.0.0.1: a bad record stops a partition, and the
"partition stopped" alert fires (read from the server's /api/v1/alerts); every dashboard query
runs, and the consumer's own /metrics holds every metric they name."""

from __future__ import annotations

import json
import subprocess
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from tests.fixtures.monitoring import RULES, dashboard_queries, named_in_monitoring
from tests.fixtures.processes import ConsumerProcess, wait_until
from tests.fixtures.services import Service, free_port
from tests.fixtures.stopped_partition import PARTITIONS, start_stopped_consumer
from tests.fixtures.tools import require_tool

pytestmark = pytest.mark.integration


@dataclass
class PrometheusServer:
    process: subprocess.Popen[bytes]
    port: int
    log: Path

    def api(self, path: str, **params: str) -> Any:
        query = f"?{urllib.parse.urlencode(params)}" if params else ""
        url = f"http://127.0.0.1:{self.port}/api/v1/{path}{query}"
        with urllib.request.urlopen(url, timeout=10) as answer:
            document = json.loads(answer.read())
        assert document["status"] == "success", document
        return document["data"]

    def ready(self) -> bool:
        try:
            url = f"http://127.0.0.1:{self.port}/-/ready"
            with urllib.request.urlopen(url, timeout=2) as answer:
                return bool(answer.status == 200)
        except OSError:
            return False


@contextmanager
def prometheus(work_dir: Path, target_port: int) -> Iterator[PrometheusServer]:
    """A Prometheus server on 127.0.0.1 scraping `target_port` and evaluating the shipped
    rules every second; stopped (by its own pid) afterwards."""
    binary = require_tool("prometheus", "the alert rules' tests")
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(RULES)],
        "scrape_configs": [
            {
                "job_name": "offsetkeeper",
                "static_configs": [{"targets": [f"127.0.0.1:{target_port}"]}],
            }
        ],
    }
    (work_dir / "prometheus.yml").write_text(yaml.safe_dump(config))
    port = free_port()
    log = work_dir / "prometheus.log"
    process = subprocess.Popen(
        [
            binary,
            f"--config.file={work_dir / 'prometheus.yml'}",
            f"--storage.tsdb.path={work_dir / 'prometheus-data'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        stdout=subprocess.DEVNULL,
        stderr=log.open("ab"),
    )
    server = PrometheusServer(process, port, log)
    try:
        wait_until(
            lambda: server.ready() or process.poll() is not None,
            timeout=60,
            what="Prometheus to be ready",
        )
        assert process.poll() is None, log.read_text()[-3000:]
        yield server
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)


def _firing(server: PrometheusServer, name: str) -> list[dict[str, Any]]:
    return [
        alert
        for alert in server.api("alerts")["alerts"]
        if alert["labels"]["alertname"] == name and alert["state"] == "firing"
    ]


def _exported_by(text: str) -> set[str]:
    """The sample names a /metrics text can hold (families without samples yet included)."""
    suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count")}
    names = set()
    for family in text_string_to_metric_families(text):
        names.update(family.name + s for s in suffixes.get(family.type, ("",)))
        names.update(sample.name for sample in family.samples)
    return names


def test_the_partition_stopped_alert_fires_in_a_real_prometheus(
    kafka: Service, tmp_path: Path, consumers: list[ConsumerProcess]
) -> None:
    consumer = start_stopped_consumer(kafka.address, tmp_path, consumers, "prom-alerts")
    target = f"127.0.0.1:{consumer.ops.port}"

    with prometheus(tmp_path, consumer.ops.port) as server:
        started = time.monotonic()
        wait_until(
            lambda: bool(_firing(server, "OffsetkeeperPartitionStopped")),
            timeout=60,
            what="OffsetkeeperPartitionStopped to fire",
        )
        fired_after = time.monotonic() - started
        (alert,) = _firing(server, "OffsetkeeperPartitionStopped")
        alerts = server.api("alerts")["alerts"]
        (scraped,) = server.api("targets")["activeTargets"]
        throughput = dashboard_queries()["Throughput/A"]
        wait_until(  # two scrapes at least: the dashboard's rates need them
            lambda: bool(server.api("query", query=throughput)["result"]),
            timeout=30,
            what=f"a throughput series ({throughput})",
        )
        results = {
            title: server.api("query", query=expr)["result"]
            for title, expr in dashboard_queries().items()
        }
    print(f"OffsetkeeperPartitionStopped fired {fired_after:.1f}s after Prometheus was ready")

    assert alert["labels"] == {
        "alertname": "OffsetkeeperPartitionStopped",
        "instance": target,
        "job": "offsetkeeper",
        "severity": "critical",
    }
    assert float(alert["value"]) == 1
    assert alert["annotations"]["summary"] == f"{target}: 1 partition(s) stopped"
    others = {a["labels"]["alertname"] for a in alerts if a["state"] == "firing"}
    assert others == {"OffsetkeeperPartitionStopped"}, alerts
    assert (scraped["health"], scraped["scrapeUrl"]) == ("up", f"http://{target}/metrics")
    # The dashboard's panels show this consumer: a lag line per partition, its throughput.
    lag = results["Lag per partition/A"]
    assert {r["metric"]["partition"] for r in lag} == {str(p) for p in range(PARTITIONS)}
    assert {r["metric"]["topic"] for r in lag} == {consumer.topic}
    assert results["Partitions stopped/A"][0]["value"][1] == "1"
    assert results["Throughput/A"], "no committed records seen"
    assert consumer.process.alive()

    status, text = consumer.ops.get("/metrics")
    assert status == 200
    missing = {
        name for name in named_in_monitoring() if not name.startswith("offsetkeeper_worker")
    } - _exported_by(text)
    assert missing == set(), "named by the dashboard or rules, not served by the consumer"
