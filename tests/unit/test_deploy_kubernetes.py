"""ops/k8s manifests, checked at the schema level and against the project: required fields,
selectors, probes on real endpoints and ports, the grace period against the shutdown deadline,
the Secret for the DSN, and the settings and commands the containers are given."""

from __future__ import annotations

import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest

from consumer import __version__
from consumer.cli.main import build_parser
from consumer.cli.replay import EXIT_PARTITIONS_STOPPED as REPLAY_EXIT_PARTITIONS_STOPPED
from consumer.core.settings import ReplaySettings, RunSettings
from consumer.runtime.health import Health
from consumer.runtime.metrics import Metrics
from consumer.runtime.ops_server import ENDPOINTS, OpsServer
from consumer.runtime.shutdown import ABORT_GRACE_S
from tests.fixtures.deploy import (
    dockerfile,
    k8s_object,
    k8s_objects,
    manifests,
    setting_names,
    settings_from,
)

API_VERSIONS = {
    "ConfigMap": "v1",
    "Secret": "v1",
    "Service": "v1",
    "Deployment": "apps/v1",
    "Job": "batch/v1",
    "PodDisruptionBudget": "policy/v1",
}
VERSION = __version__  # written once, in consumer/_version.py


def _deployment() -> dict[str, Any]:
    return k8s_object("Deployment", "offsetkeeper")


def _job() -> dict[str, Any]:
    return k8s_object("Job")


def _container(workload: dict[str, Any]) -> dict[str, Any]:
    [container] = workload["spec"]["template"]["spec"]["containers"]
    return dict(container)


def _environment(container: dict[str, Any]) -> dict[str, str]:
    """What the container's env would be: envFrom ConfigMaps and Secrets, then env."""
    found: dict[str, str] = {}
    for source in container.get("envFrom", []):
        if "configMapRef" in source:
            found.update(k8s_object("ConfigMap", source["configMapRef"]["name"])["data"])
        else:
            found.update(k8s_object("Secret", source["secretRef"]["name"])["stringData"])
    for item in container.get("env", []):
        found[item["name"]] = item["value"]
    return found


def test_every_object_has_the_required_fields_and_a_known_api_version() -> None:
    objects = k8s_objects()
    assert {doc["kind"] for doc in objects} == set(API_VERSIONS)
    for doc in objects:
        assert doc["apiVersion"] == API_VERSIONS[doc["kind"]], doc["kind"]
        assert doc["metadata"]["name"]
        assert doc["kind"] in ("ConfigMap", "Secret") or "spec" in doc


def test_the_kustomization_lists_every_manifest() -> None:
    [kustomization] = manifests()["kustomization.yaml"]
    assert kustomization["kind"] == "Kustomization"
    assert sorted(kustomization["resources"]) == sorted(
        name for name in manifests() if name != "kustomization.yaml"
    )


def test_the_deployment_runs_replicas_of_one_consumer_group() -> None:
    deployment = _deployment()
    spec = deployment["spec"]
    assert spec["replicas"] >= 2
    labels = spec["template"]["metadata"]["labels"]
    assert spec["selector"]["matchLabels"].items() <= labels.items()
    container = _container(deployment)
    assert build_parser().parse_args(container["args"]).command == "run"
    environment = _environment(container)
    # One group for all: it comes from the shared ConfigMap, never per pod.
    assert "OFFSETKEEPER_GROUP" in k8s_object("ConfigMap")["data"]
    assert not any(item["name"] == "OFFSETKEEPER_GROUP" for item in container.get("env", []))
    assert setting_names(environment) <= set(RunSettings.model_fields)
    settings = settings_from(RunSettings, environment)  # the CLI's own loader accepts it
    assert isinstance(settings, RunSettings)
    assert settings.group == "orders"
    assert container["image"] == f"offsetkeeper:{VERSION}"


def test_the_sink_dsn_is_a_secret_and_only_a_secret() -> None:
    secret = k8s_object("Secret", "offsetkeeper-sink")
    assert set(secret["stringData"]) == {"OFFSETKEEPER_SINK"}
    assert secret["stringData"]["OFFSETKEEPER_SINK"].startswith("postgresql://")
    assert "OFFSETKEEPER_SINK" not in k8s_object("ConfigMap")["data"]
    for workload in (_deployment(), _job()):
        refs = [s.get("secretRef", {}).get("name") for s in _container(workload)["envFrom"]]
        assert "offsetkeeper-sink" in refs


def test_the_probes_point_at_the_health_endpoints_on_the_metrics_port() -> None:
    container = _container(_deployment())
    metrics_port = int(k8s_object("ConfigMap")["data"]["OFFSETKEEPER_METRICS_PORT"])
    ports = {port["name"]: port["containerPort"] for port in container["ports"]}
    expected = {
        "startupProbe": "/healthz",
        "livenessProbe": "/healthz",
        "readinessProbe": "/readyz",
    }
    for probe, path in expected.items():
        http = container[probe]["httpGet"]
        assert http["path"] == path
        assert http["path"] in ENDPOINTS
        assert ports[http["port"]] == metrics_port, probe
    annotations = _deployment()["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/port"] == str(metrics_port)
    assert annotations["prometheus.io/path"] == "/metrics"


def test_the_endpoint_listens_on_all_interfaces_for_the_probes_and_the_scraper() -> None:
    # The kubelet and Prometheus come from outside the pod; the default (127.0.0.1) would fail
    # every probe. Set in the manifests, not only in the image.
    environment = _environment(_container(_deployment()))
    assert environment["OFFSETKEEPER_METRICS_HOST"] == "0.0.0.0"  # noqa: S104 - a pod's probes
    settings = settings_from(RunSettings, environment)
    assert isinstance(settings, RunSettings)
    assert settings.metrics_host == "0.0.0.0"  # noqa: S104


def test_the_grace_period_outlasts_the_shutdown_deadline_and_the_abort() -> None:
    deadline = float(k8s_object("ConfigMap")["data"]["OFFSETKEEPER_SHUTDOWN_DEADLINE_S"])
    for workload in (_deployment(), _job()):
        grace = workload["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
        assert grace >= deadline + ABORT_GRACE_S + 1, workload["kind"]


def test_pods_run_as_the_image_user_without_privileges() -> None:
    [user] = [i.text for i in dockerfile() if i.keyword == "USER"]
    uid, _, gid = user.partition(":")
    for workload in (_deployment(), _job()):
        pod = workload["spec"]["template"]["spec"]["securityContext"]
        assert pod["runAsNonRoot"] is True
        assert (pod["runAsUser"], pod["runAsGroup"]) == (int(uid), int(gid))
        container = _container(workload)["securityContext"]
        assert container["allowPrivilegeEscalation"] is False
        assert container["readOnlyRootFilesystem"] is True
        assert container["capabilities"]["drop"] == ["ALL"]


def test_the_metrics_service_and_the_disruption_budget_select_the_consumer_pods() -> None:
    pod_labels = _deployment()["spec"]["template"]["metadata"]["labels"]
    service = k8s_object("Service")
    assert service["spec"]["selector"].items() <= pod_labels.items()
    [port] = service["spec"]["ports"]
    assert port["targetPort"] == "metrics"
    budget = k8s_object("PodDisruptionBudget")
    assert budget["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    assert budget["spec"]["maxUnavailable"] == 1


def test_the_replay_job_is_a_valid_replay_with_a_fixed_job_id() -> None:
    job = _job()
    spec = job["spec"]["template"]["spec"]
    assert spec["restartPolicy"] == "Never"
    container = _container(job)
    args = build_parser().parse_args(container["args"])
    assert args.command == "replay"
    assert args.topic == "orders"
    assert args.from_timestamp
    assert args.to_end
    assert args.job_id, "a fixed job id: a retried pod resumes the same job"
    environment = _environment(container)
    assert setting_names(environment) - set(ReplaySettings.model_fields) <= set(
        RunSettings.model_fields
    ), "every variable is a setting of replay or of run (the shared ConfigMap)"
    settings = settings_from(ReplaySettings, {**environment, "OFFSETKEEPER_TOPIC": args.topic})
    assert isinstance(settings, ReplaySettings)
    assert job["spec"]["backoffLimit"] >= 1
    [rule] = job["spec"]["podFailurePolicy"]["rules"]
    assert rule["action"] == "FailJob"
    assert rule["onExitCodes"]["containerName"] == container["name"]
    assert rule["onExitCodes"]["values"] == [REPLAY_EXIT_PARTITIONS_STOPPED]


# -- the probe paths on the real server ---------------------------------------------------------


@pytest.fixture
def server() -> Iterator[OpsServer]:
    health = Health()
    health.mark_joined()
    running = OpsServer(
        "127.0.0.1", 0, Metrics(app="a", group="g", process_metrics=False).registry, health
    )
    running.start()
    yield running
    running.stop()


def test_every_probe_path_is_served_by_the_real_endpoint(server: OpsServer) -> None:
    container = _container(_deployment())
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        path = container[probe]["httpGet"]["path"]
        try:
            with urllib.request.urlopen(
                f"http://127.0.0.1:{server.port}{path}", timeout=5
            ) as answer:
                status = answer.status
        except urllib.error.HTTPError as error:
            status = error.code
        assert status == 200, (probe, path, status)
