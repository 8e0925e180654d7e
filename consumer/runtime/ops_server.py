"""The operations HTTP endpoint of `offsetkeeper run`: one port (`--metrics-port`) serving

    GET /             the status page (`consumer.runtime.status_page`), HTML
    GET /status.json  what the page shows, as JSON (`consumer.runtime.status`)
    GET /metrics      Prometheus text format (OpenMetrics when the scraper asks for it)
    GET /healthz      liveness:  200 while the partition loop is alive, else 503
    GET /readyz       readiness: 200 while ready (see `consumer.runtime.health`), else 503

Health answers are small JSON documents that say why. The server runs on daemon threads and
only reads state; it never calls into the engine, the sink or Kafka.

`HttpEndpoint` is the server itself, answering GET and HEAD from one function; `OpsServer`
answers from a process's own registry and health, and the supervisor of `run --workers N`
answers from its workers' endpoints (`consumer.runtime.worker_endpoint`).
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import structlog
from prometheus_client import CollectorRegistry
from prometheus_client.exposition import choose_encoder

from consumer.core.errors import ConfigError
from consumer.runtime import status_page
from consumer.runtime.health import Health, Verdict
from consumer.runtime.status import StatusSource

log = structlog.get_logger("offsetkeeper.ops")

ENDPOINTS = ("/", "/status.json", "/metrics", "/healthz", "/readyz")
# Every answer: the page loads nothing from anywhere (its style is inline, it has no script).
SECURITY_HEADERS = (
    ("Content-Security-Policy", "default-src 'none'; style-src 'unsafe-inline'"),
    ("X-Content-Type-Options", "nosniff"),
)


@dataclass(frozen=True, slots=True)
class Answer:
    """One HTTP answer: status, content type and body."""

    status: int
    content_type: str
    body: bytes

    @classmethod
    def of_json(cls, status: int, document: Any) -> Answer:
        return cls(
            status, "application/json", json.dumps(document, sort_keys=True).encode() + b"\n"
        )

    @classmethod
    def of_verdict(cls, verdict: Verdict) -> Answer:
        return cls.of_json(200 if verdict.ok else 503, verdict.body)

    @classmethod
    def of_html(cls, page: str) -> Answer:
        return cls(200, status_page.CONTENT_TYPE, page.encode())


# (path without the query string, the request's Accept header) -> the answer.
Responder = Callable[[str, str], Answer]


def not_found() -> Answer:
    return Answer.of_json(404, {"error": "not found", "paths": list(ENDPOINTS)})


class HttpEndpoint:
    """Serves GET and HEAD on `host:port` (port 0: any free port; see `port` once started),
    each answered by `respond`, on daemon threads."""

    def __init__(self, host: str, port: int, respond: Responder) -> None:
        self._host = host
        self._requested_port = port
        self._respond = respond
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def host(self) -> str:
        """The address the server is bound to (once started)."""
        if self._server is None:
            raise ConfigError("the metrics server is not started")
        return str(self._server.server_address[0])

    @property
    def port(self) -> int:
        if self._server is None:
            raise ConfigError("the metrics server is not started")
        return int(self._server.server_address[1])

    def start(self) -> None:
        handler = _handler_class(self._respond)
        try:
            self._server = ThreadingHTTPServer((self._host, self._requested_port), handler)
        except OSError as exc:
            raise ConfigError(
                "cannot listen on the metrics port",
                host=self._host,
                port=self._requested_port,
                reason=exc.strerror or str(exc),
            ) from None
        self._server.daemon_threads = True
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": 0.5},
            name="offsetkeeper-ops-http",
            daemon=True,
        )
        self._thread.start()
        log.info("ops_server_listening", host=self._host, port=self.port, paths=list(ENDPOINTS))

    def stop(self) -> None:
        if self._server is None:
            return
        self._server.shutdown()
        self._server.server_close()
        if self._thread is not None:
            self._thread.join(5)


class OpsServer(HttpEndpoint):
    """Serves `ENDPOINTS` from this process's metrics registry and health (`/` and
    `/status.json` only when given a `status` source)."""

    def __init__(
        self,
        host: str,
        port: int,
        registry: CollectorRegistry,
        health: Health,
        status: StatusSource | None = None,
    ) -> None:
        checks: dict[str, Callable[[], Verdict]] = {
            "/healthz": health.liveness,
            "/readyz": health.readiness,
        }

        def respond(path: str, accept: str) -> Answer:
            if path == "/metrics":
                encoder, content_type = choose_encoder(accept)
                return Answer(200, content_type, encoder(registry))
            if path in checks:
                return Answer.of_verdict(checks[path]())
            if status is not None and path == "/":
                return Answer.of_html(status_page.render_process(status.report()))
            if status is not None and path == "/status.json":
                return Answer.of_json(200, status.report().to_json())
            return not_found()

        super().__init__(host, port, respond)


def _handler_class(respond: Responder) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        server_version = "offsetkeeper"

        def do_GET(self) -> None:
            self._answer(with_body=True)

        def do_HEAD(self) -> None:
            self._answer(with_body=False)

        def _answer(self, *, with_body: bool) -> None:
            path = self.path.split("?", 1)[0]
            answer = respond(path, self.headers.get("Accept", ""))
            self.send_response(answer.status)
            self.send_header("Content-Type", answer.content_type)
            self.send_header("Content-Length", str(len(answer.body)))
            self.send_header("Cache-Control", "no-store")
            for name, value in SECURITY_HEADERS:
                self.send_header(name, value)
            self.end_headers()
            if with_body:
                self.wfile.write(answer.body)

        def log_message(self, format: str, *args: Any) -> None:
            pass  # probes every few seconds would drown the structured log

    return Handler
