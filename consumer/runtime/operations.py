"""Start-up of a consumer's operations side: the metrics registry, health state, the HTTP
endpoint and the lag sampler, all created here, once per process, when `metrics_port` is set.
Without it the engine runs with no observer at all."""

from __future__ import annotations

from dataclasses import dataclass

from consumer.backends.confluent import ConfluentReader
from consumer.core.settings import RunSettings
from consumer.runtime.health import Health
from consumer.runtime.lag import LagSampler, WatermarkSource
from consumer.runtime.metrics import Metrics
from consumer.runtime.ops_server import OpsServer
from consumer.runtime.status import ConsumerInfo, StatusSource, offsetkeeper_version
from consumer.runtime.telemetry import Telemetry

# The lag sampler's client never joins the group: settings that would make it a member (or
# take this member's static identity) are not passed on to it.
_MEMBERSHIP_KEYS = frozenset({"group.id", "group.instance.id", "client.id"})


@dataclass(frozen=True, slots=True)
class Operations:
    telemetry: Telemetry
    server: OpsServer
    sampler: LagSampler

    def stop(self) -> None:
        # At most one watermark request (5 s) to wait for: the exit stays inside the pod's
        # grace period after a graceful stop.
        self.sampler.stop(timeout_s=5.0)
        self.server.stop()


def start_operations(settings: RunSettings) -> Operations | None:
    """Serve the status page, /metrics, /healthz and /readyz and start sampling lag; None when
    no port is set.
    A port that cannot be bound is a `ConfigError`."""
    if settings.metrics_port is None:
        return None
    health = Health(
        readiness_timeout_s=settings.readiness_timeout_s,
        liveness_timeout_s=settings.liveness_timeout_s,
    )
    metrics = Metrics(app=settings.app, group=settings.group)
    telemetry = Telemetry(metrics, health)
    info = ConsumerInfo(
        app=settings.app,
        group=settings.group,
        topics=tuple(settings.topics),
        version=offsetkeeper_version(),
    )
    status = StatusSource(info, health, metrics)
    server = OpsServer(
        settings.metrics_host, settings.metrics_port, metrics.registry, health, status
    )
    server.start()

    def open_reader() -> WatermarkSource:
        return ConfluentReader(
            bootstrap_servers=settings.bootstrap_servers,
            client_id=f"offsetkeeper-lag-{settings.group}",
            client_config={
                key: value
                for key, value in settings.kafka_config.items()
                if key not in _MEMBERSHIP_KEYS
            },
        )

    sampler = LagSampler(telemetry, open_reader, interval_s=settings.lag_interval_s)
    sampler.start()
    return Operations(telemetry, server, sampler)
