"""Container probes (``httpGet``, ``tcpSocket``, ``exec``) and their thresholds, as the kubelet's prober.

:class:`ProbeWorker` keeps one probe's schedule and counters (``initialDelaySeconds``,
``periodSeconds``, ``successThreshold``, ``failureThreshold``) and the result the kubelet acts
on (readiness -> the container's ``ready``; liveness/startup failure -> restart). :func:`run_probe`
does one attempt; it blocks (the kubelet runs it in a thread). Network probes run inside the
pod's network namespace (a short-lived thread that ``setns``'d into it, so no thread of the
kubelet ever changes namespace) against the pod IP, as upstream probes from the node to the
pod IP; exec probes run the command inside the container's namespaces.
"""

from __future__ import annotations

import ctypes
import http.client
import os
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

T = TypeVar("T")
_CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)


def run_in_netns(netns_path: str, fn: Callable[[], T]) -> T:
    """``fn()`` in a fresh thread that first entered the network namespace at ``netns_path``."""
    result: list[T] = []
    failure: list[BaseException] = []

    def run() -> None:
        try:
            fd = os.open(netns_path, os.O_RDONLY | os.O_CLOEXEC)
            try:
                if _libc.setns(fd, _CLONE_NEWNET) != 0:
                    err = ctypes.get_errno()
                    raise OSError(err, f"setns({netns_path}): {os.strerror(err)}")
            finally:
                os.close(fd)
            result.append(fn())
        except BaseException as e:  # handed to the caller's thread
            failure.append(e)

    t = threading.Thread(target=run, name="probe-netns", daemon=True)
    t.start()
    t.join()
    if failure:
        raise failure[0]
    return result[0]


def _port(value: Any, container: Mapping[str, Any]) -> int:
    if isinstance(value, int):
        return value
    if isinstance(value, str) and value.isdigit():
        return int(value)
    for p in container.get("ports") or []:
        if p.get("name") == value:
            return int(p["containerPort"])
    raise ValueError(f"port {value!r} is not a number nor the name of a port of container {container.get('name')!r}")


def run_probe(probe: Mapping[str, Any], container: Mapping[str, Any], pod_ip: str, netns_path: str | None,
              exec_prefix: list[str] | None) -> tuple[bool, str]:
    """One attempt: (success, message). Blocking; never raises."""
    timeout = float(probe.get("timeoutSeconds") or 1)
    try:
        if "exec" in probe:
            if exec_prefix is None:
                return False, "container is not running"
            cmd = list((probe["exec"] or {}).get("command") or [])
            res = subprocess.run([*exec_prefix, *cmd], capture_output=True, timeout=timeout, check=False)
            return res.returncode == 0, (res.stdout + res.stderr).decode(errors="replace")[:1024]
        if "httpGet" in probe:
            h = probe["httpGet"] or {}
            host = h.get("host") or pod_ip
            port = _port(h.get("port"), container)
            headers = {x["name"]: x["value"] for x in h.get("httpHeaders") or []}
            headers.setdefault("User-Agent", "kube-probe/1.32")

            def get() -> int:
                conn = http.client.HTTPConnection(host, port, timeout=timeout)
                if (h.get("scheme") or "HTTP").upper() == "HTTPS":
                    import ssl

                    conn = http.client.HTTPSConnection(host, port, timeout=timeout,
                                                       context=ssl._create_unverified_context())
                try:
                    conn.request("GET", h.get("path") or "/", headers=headers)
                    return conn.getresponse().status
                finally:
                    conn.close()

            status = run_in_netns(netns_path, get) if netns_path else get()
            return 200 <= status < 400, f"HTTP probe failed with statuscode: {status}" if status >= 400 else ""
        if "tcpSocket" in probe:
            t = probe["tcpSocket"] or {}
            host, port = t.get("host") or pod_ip, _port(t.get("port"), container)

            def connect() -> None:
                socket.create_connection((host, port), timeout=timeout).close()

            run_in_netns(netns_path, connect) if netns_path else connect()
            return True, ""
        if "grpc" in probe:
            return False, "grpc probes are not supported by the lab runtime"
        return False, "probe has no handler (exec, httpGet, tcpSocket)"
    except subprocess.TimeoutExpired:
        return False, f"command timed out after {timeout:g}s"
    except (OSError, ValueError, http.client.HTTPException) as e:
        return False, f"{type(e).__name__}: {e}"


@dataclass
class ProbeWorker:
    """One probe of one container attempt: its schedule and counters (upstream ``prober.worker``)."""

    kind: str  # readiness | liveness | startup
    probe: Mapping[str, Any]
    started: float  # when the container attempt started (monotonic)
    next_due: float = 0.0
    successes: int = 0
    failures: int = 0
    result: bool | None = None  # None until the thresholds decide
    running: bool = False
    message: str = ""

    def __post_init__(self) -> None:
        self.next_due = self.started + float(self.probe.get("initialDelaySeconds") or 0)
        if self.kind == "liveness" or self.kind == "startup":
            self.result = True if self.kind == "liveness" else None

    @property
    def period(self) -> float:
        return float(self.probe.get("periodSeconds") or 10)

    def due(self, now: float) -> bool:
        return not self.running and now >= self.next_due

    def record(self, ok: bool, message: str, now: float | None = None) -> None:
        """Apply one attempt's outcome to the thresholds (upstream: a result flips only after
        ``successThreshold`` successes or ``failureThreshold`` failures in a row)."""
        now = time.monotonic() if now is None else now
        self.running = False
        self.next_due = now + self.period
        self.message = message
        if ok:
            self.successes += 1
            self.failures = 0
            if self.successes >= int(self.probe.get("successThreshold") or 1):
                self.result = True
        else:
            self.failures += 1
            self.successes = 0
            if self.failures >= int(self.probe.get("failureThreshold") or 3):
                self.result = False
