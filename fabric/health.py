"""Agent metrics and the small HTTP server for ``/metrics``, ``/healthz`` and ``/readyz``.

Metric names follow ``fabric_<component>_<what>_<unit>``. They are module-level singletons in
the default Prometheus registry because a process runs one agent; tests that build several
agents in one process share them, which is harmless.

``/healthz`` (liveness) fails when no reconcile pass has succeeded within the resync period
plus a grace: a wedged agent gets restarted. ``/readyz`` succeeds once the first snapshot has
been applied.
"""

from __future__ import annotations

import http.server
import logging
import threading
from collections.abc import Callable

import prometheus_client

_log = logging.getLogger(__name__)

Check = Callable[[], tuple[bool, str]]

_RECONCILE = prometheus_client.Histogram(
    "fabric_agent_reconcile_duration_seconds",
    "Duration of one reconcile pass (render, diff, apply)",
    buckets=(0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
_FAILURES = prometheus_client.Counter(
    "fabric_agent_kernel_failures_total", "Kernel entries that failed to program (retried with a resync)"
)
_DRIFT = prometheus_client.Counter(
    "fabric_agent_drift_repairs_total", "Kernel entries put back after something outside the fabric changed them"
)
_DESIRED = prometheus_client.Gauge("fabric_agent_desired_entries", "Entries the plan asks for, by table", ["table"])
_PROGRAMMED = prometheus_client.Gauge(
    "fabric_agent_programmed_entries", "Entries of ours found in the kernel at the last pass, by table", ["table"]
)
_LAST_SUCCESS = prometheus_client.Gauge(
    "fabric_agent_last_success_timestamp_seconds", "Unix time of the last clean reconcile pass"
)
_CONNECTED = prometheus_client.Gauge("fabric_agent_session_connected", "1 while a session to the reflector is open")
_RECONNECTS = prometheus_client.Counter("fabric_agent_session_connects_total", "Sessions established to the reflector")
_REJECTIONS = prometheus_client.Counter(
    "fabric_agent_announcement_rejections_total", "Announcements the reflector refused"
)


class AgentMetrics:
    """Handles to the agent's metrics (one place to find them all)."""

    reconcile_duration = _RECONCILE
    kernel_failures = _FAILURES
    drift_repairs = _DRIFT
    desired_entries = _DESIRED
    programmed_entries = _PROGRAMMED
    last_success = _LAST_SUCCESS
    session_connected = _CONNECTED
    session_reconnects = _RECONNECTS
    rejections = _REJECTIONS


class _Handler(http.server.BaseHTTPRequestHandler):
    healthy: Check
    ready: Check

    def do_GET(self) -> None:
        path = self.path.split("?", 1)[0]
        if path == "/metrics":
            body = prometheus_client.generate_latest()
            self._send(200, body, prometheus_client.CONTENT_TYPE_LATEST)
        elif path in ("/healthz", "/readyz"):
            ok, why = (self.healthy if path == "/healthz" else self.ready)()
            self._send(200 if ok else 503, (why + "\n").encode(), "text/plain")
        else:
            self._send(404, b"not found: try /metrics, /healthz, /readyz\n", "text/plain")

    def _send(self, code: int, body: bytes, ctype: str) -> None:
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        _log.debug("http: " + format, *args)


def serve(listen: str, healthy: Check, ready: Check) -> http.server.ThreadingHTTPServer:
    """Serve the endpoints on ``HOST:PORT`` in a daemon thread; ``.shutdown()`` stops it."""
    host, _, port = listen.rpartition(":")
    handler = type("Handler", (_Handler,), {"healthy": staticmethod(healthy), "ready": staticmethod(ready)})
    server = http.server.ThreadingHTTPServer((host.strip("[]"), int(port)), handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, name="http", daemon=True).start()
    _log.info("serving /metrics, /healthz, /readyz on %s", listen)
    return server
