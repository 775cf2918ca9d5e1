"""What ``kubectl get pods`` shows in its STATUS and RESTARTS columns, as upstream's ``printPod``.

The server-side Table of pods (``kubeemu.server``) uses these, so ``kubectl get pods`` says
``CrashLoopBackOff``, ``Completed``, ``Init:0/1``, ``OutOfcpu``, ``ContainerCreating`` or
``Terminating`` and ``2 (5s ago)`` exactly where a real cluster would: the reason comes from the
pod's ``status.reason``, then the init containers (the first not yet done), then the app
containers (the last one with a waiting or terminated reason wins).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any


def _restartable(spec: Mapping[str, Any] | None) -> bool:
    return bool(spec) and (spec or {}).get("restartPolicy") == "Always"


def status_and_restarts(pod: Mapping[str, Any]) -> tuple[str, int, str]:
    """``(STATUS, restarts, last restart time)``: upstream ``printPod``'s reason and restart count."""
    status = pod.get("status") or {}
    spec = pod.get("spec") or {}
    meta = pod.get("metadata") or {}
    phase = str(status.get("phase") or "Pending")
    reason = str(status.get("reason") or phase)
    restarts = 0
    last = ""
    sidecar_restarts = 0
    sidecar_last = ""
    inits = {c.get("name"): c for c in spec.get("initContainers") or []}
    initializing = False
    for i, c in enumerate(status.get("initContainerStatuses") or []):
        restarts += int(c.get("restartCount") or 0)
        fin = ((c.get("lastState") or {}).get("terminated") or {}).get("finishedAt") or ""
        last = max(last, fin)
        if _restartable(inits.get(c.get("name"))):
            sidecar_restarts += int(c.get("restartCount") or 0)
            sidecar_last = max(sidecar_last, fin)
        state = c.get("state") or {}
        term, wait = state.get("terminated"), state.get("waiting")
        if term and term.get("exitCode") == 0:
            continue
        if _restartable(inits.get(c.get("name"))) and c.get("started"):
            continue
        if term:
            if term.get("reason"):
                reason = "Init:" + term["reason"]
            elif term.get("signal"):
                reason = f"Init:Signal:{term['signal']}"
            else:
                reason = f"Init:ExitCode:{term.get('exitCode')}"
        elif wait and wait.get("reason") and wait["reason"] != "PodInitializing":
            reason = "Init:" + wait["reason"]
        else:
            reason = f"Init:{i}/{len(inits)}"
        initializing = True
        break
    initialized = any(c.get("type") == "Initialized" and c.get("status") == "True"
                      for c in status.get("conditions") or [])
    if not initializing or initialized:
        restarts, last = sidecar_restarts, sidecar_last
        has_running = False
        for c in reversed(status.get("containerStatuses") or []):
            restarts += int(c.get("restartCount") or 0)
            last = max(last, ((c.get("lastState") or {}).get("terminated") or {}).get("finishedAt") or "")
            state = c.get("state") or {}
            term, wait = state.get("terminated"), state.get("waiting")
            if wait and wait.get("reason"):
                reason = wait["reason"]
            elif term and term.get("reason"):
                reason = term["reason"]
            elif term:
                reason = f"Signal:{term['signal']}" if term.get("signal") else f"ExitCode:{term.get('exitCode')}"
            elif c.get("ready") and state.get("running") is not None:
                has_running = True
        if reason == "Completed" and has_running:
            ready = any(c.get("type") == "Ready" and c.get("status") == "True" for c in status.get("conditions") or [])
            reason = "Running" if ready else "NotReady"
    if meta.get("deletionTimestamp") and status.get("reason") == "NodeLost":
        reason = "Unknown"
    elif meta.get("deletionTimestamp") and phase not in ("Succeeded", "Failed"):
        reason = "Terminating"
    return reason, restarts, last


def pod_status(pod: Mapping[str, Any]) -> str:
    """The STATUS column."""
    return status_and_restarts(pod)[0]


def pod_restarts(pod: Mapping[str, Any], age: Callable[[str | None], str]) -> str:
    """The RESTARTS column: ``2`` or, with a known last restart, ``2 (5s ago)``."""
    _, n, last = status_and_restarts(pod)
    return f"{n} ({age(last[:19] + 'Z')} ago)" if n and last else str(n)
