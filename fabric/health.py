"""Agent metrics and the small HTTP server for ``/metrics``, ``/healthz`` and ``/readyz``.

Metric names follow ``fabric_<component>_<what>_<unit>``. They are module-level singletons in
the default Prometheus registry because a process runs one agent; tests that build several
agents in one process share them, which is harmless.

``/healthz`` (liveness) fails when no reconcile pass has succeeded within the resync period
plus a grace: a wedged agent gets restarted. ``/readyz`` succeeds once the first snapshot has
been applied. The reflector serves the same endpoints from its own registry (:func:`serve`
takes one).

``/debug/NAME`` serves a JSON document from a provider the process registers (the agent's
``/debug/state``: planned state, desired kernel tables and a fresh read of the kernel, for
``fabric-tool diagnose state``). Debug documents are read-only views.

Metrics that need a per-sample feed (probe RTTs) are updated by the agent as samples arrive;
metrics that are a function of time (seconds since the last sync) are computed at scrape time.
"""

from __future__ import annotations

import http.server
import json
import logging
import threading
from collections.abc import Callable, Mapping

import prometheus_client
from prometheus_client.registry import CollectorRegistry

_log = logging.getLogger(__name__)

Check = Callable[[], tuple[bool, str]]
#: A ``/debug/NAME`` provider: returns a JSON-serialisable document (called per request, in the
#: HTTP thread; it must be thread-safe).
DebugProvider = Callable[[], object]

#: Gateway roles an agent can report (see ``fabric_agent_gateway_role``).
ROLES = ("active", "standby", "none", "endpoint")

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
_ERRORS = prometheus_client.Counter(
    "fabric_agent_kernel_errors_total",
    "Kernel entries that failed to program, by table and errno name (the total is fabric_agent_kernel_failures_total)",
    ["table", "errno"],
)
_SYNC_AGE = prometheus_client.Gauge(
    "fabric_agent_last_sync_age_seconds",
    "Seconds since the last clean reconcile pass (since start while none succeeded)",
)
_TUNNEL_UP = prometheus_client.Gauge(
    "fabric_agent_tunnel_up",
    "1 while at least one probed peer of the cluster answers through the tunnel, 0 when none does",
    ["cluster"],
)
_PEER_UP = prometheus_client.Gauge(
    "fabric_agent_tunnel_peer_up", "1 while the probed peer answers through the tunnel", ["peer"]
)
_PROBE_RTT = prometheus_client.Histogram(
    "fabric_agent_probe_rtt_seconds",
    "Round trip of tunnel probes (ICMP echo to the peer's overlay address), by peer cluster",
    ["cluster"],
    buckets=(0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25),
)
_PROBES_SENT = prometheus_client.Counter(
    "fabric_agent_probes_sent_total", "Tunnel probes sent, by peer cluster", ["cluster"]
)
_PROBES_LOST = prometheus_client.Counter(
    "fabric_agent_probes_lost_total", "Tunnel probes not answered within the detection time, by peer cluster",
    ["cluster"],
)
_PROBE_LOSS = prometheus_client.Gauge(
    "fabric_agent_probe_loss_ratio",
    "Share of the recent tunnel probes (last window per peer) that went unanswered, by peer cluster",
    ["cluster"],
)
_CERT_EXPIRY = prometheus_client.Gauge(
    "fabric_agent_certificate_expiry_timestamp_seconds",
    "Unix time the node certificate this agent connects with expires (its notAfter; the file in --tls-dir, "
    "renewed by the agent); 0 until it has one",
)
_CERT_RENEWALS = prometheus_client.Counter(
    "fabric_agent_certificate_renewals_total",
    "Certificate requests to the reflector (the bootstrap exchange, then each renewal), by result (ok, error)",
    ["result"],
)
_ROLE = prometheus_client.Gauge(
    "fabric_agent_gateway_role",
    "1 for this node's gateway role as its plan shows it: active, standby, none (an internal node of a "
    "gateway-mode cluster) or endpoint (a P2P node; the elected service gateway is in fabric_reflector_gateway)",
    ["role"],
)

_MP_SEED = prometheus_client.Gauge(
    "fabric_agent_multipath_hash_seed_set",
    "1 while this node's namespace holds the fabric's multipath hash seed (set only while the node routes over "
    "several active gateways; see fabric.agent.multipath), 0 otherwise",
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
    kernel_errors = _ERRORS
    last_sync_age = _SYNC_AGE
    tunnel_up = _TUNNEL_UP
    peer_up = _PEER_UP
    probe_rtt = _PROBE_RTT
    probes_sent = _PROBES_SENT
    probes_lost = _PROBES_LOST
    probe_loss = _PROBE_LOSS
    gateway_role = _ROLE
    certificate_expiry = _CERT_EXPIRY
    certificate_renewals = _CERT_RENEWALS
    multipath_hash_seed_set = _MP_SEED

    def set_role(self, role: str) -> None:
        """Exactly one role series is 1 (a dashboard can sum by role over the fleet)."""
        if role not in ROLES:
            raise ValueError(f"gateway role {role!r} is not one of {', '.join(ROLES)}")
        for r in ROLES:
            self.gateway_role.labels(role=r).set(1 if r == role else 0)


class _Handler(http.server.BaseHTTPRequestHandler):
    healthy: Check
    ready: Check
    registry: CollectorRegistry
    debug: Mapping[str, DebugProvider]

    def do_GET(self) -> None:
        path = self.path.split("?", 1)[0]
        if path == "/metrics":
            body = prometheus_client.generate_latest(self.registry)
            self._send(200, body, prometheus_client.CONTENT_TYPE_LATEST)
        elif path in ("/healthz", "/readyz"):
            ok, why = (self.healthy if path == "/healthz" else self.ready)()
            self._send(200 if ok else 503, (why + "\n").encode(), "text/plain")
        elif path.startswith("/debug/") and path[len("/debug/") :] in self.debug:
            try:
                doc = self.debug[path[len("/debug/") :]]()
            except TimeoutError as e:
                self._send(503, f"{path}: {e}\n".encode(), "text/plain")
                return
            self._send(200, json.dumps(doc, indent=1, sort_keys=True).encode(), "application/json")
        else:
            extra = "".join(f", /debug/{name}" for name in sorted(self.debug))
            self._send(404, f"not found: try /metrics, /healthz, /readyz{extra}\n".encode(), "text/plain")

    def _send(self, code: int, body: bytes, ctype: str) -> None:
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        _log.debug("http: " + format, *args)


def serve(
    listen: str,
    healthy: Check,
    ready: Check,
    *,
    registry: CollectorRegistry = prometheus_client.REGISTRY,
    debug: Mapping[str, DebugProvider] | None = None,
) -> http.server.ThreadingHTTPServer:
    """Serve the endpoints on ``HOST:PORT`` in a daemon thread; ``.shutdown()`` stops it.

    ``registry``: the metrics behind ``/metrics`` (the agent's live in the default registry,
    next to the translation counters other modules register there). ``debug``: ``/debug/NAME``
    JSON providers."""
    host, _, port = listen.rpartition(":")
    attrs = {
        "healthy": staticmethod(healthy),
        "ready": staticmethod(ready),
        "registry": registry,
        "debug": dict(debug or {}),
    }
    handler = type("Handler", (_Handler,), attrs)
    server = http.server.ThreadingHTTPServer((host.strip("[]"), int(port)), handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, name="http", daemon=True).start()
    _log.info("serving /metrics, /healthz, /readyz%s on %s", "".join(f", /debug/{n}" for n in sorted(debug or {})),
              listen)
    return server
