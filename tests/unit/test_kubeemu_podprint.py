"""``kubectl get pods`` STATUS and RESTARTS as upstream's printPod computes them (kubeemu.podprint)."""

from __future__ import annotations

from typing import Any

import pytest

from kubeemu.podprint import pod_restarts, pod_status, status_and_restarts


def _pod(phase: str = "Running", containers: list[dict[str, Any]] | None = None,
         inits: list[dict[str, Any]] | None = None, **status: Any) -> dict[str, Any]:
    spec: dict[str, Any] = {"containers": [{"name": c["name"]} for c in containers or []]}
    if inits is not None:
        spec["initContainers"] = [{"name": c["name"]} for c in inits]
    st: dict[str, Any] = {"phase": phase, "containerStatuses": containers or [], **status}
    if inits is not None:
        st["initContainerStatuses"] = inits
    return {"metadata": {"name": "p"}, "spec": spec, "status": st}


RUNNING = {"name": "a", "ready": True, "restartCount": 0, "state": {"running": {}}}
CRASH = {"name": "b", "ready": False, "restartCount": 3,
         "state": {"waiting": {"reason": "CrashLoopBackOff"}},
         "lastState": {"terminated": {"exitCode": 1, "reason": "Error", "finishedAt": "2026-01-01T00:00:00Z"}}}
DONE = {"name": "a", "ready": False, "restartCount": 0, "state": {"terminated": {"exitCode": 0, "reason": "Completed"}}}


@pytest.mark.parametrize(("pod", "want"), [
    (_pod(containers=[RUNNING]), "Running"),
    (_pod(containers=[RUNNING, CRASH]), "CrashLoopBackOff"),
    (_pod("Succeeded", containers=[DONE]), "Completed"),
    (_pod("Failed", reason="OutOfcpu"), "OutOfcpu"),
    (_pod("Pending", containers=[{"name": "a", "state": {"waiting": {"reason": "ContainerCreating"}}}]),
     "ContainerCreating"),
    (_pod("Pending", containers=[{"name": "a", "state": {"waiting": {"reason": "PodInitializing"}}}],
          inits=[{"name": "i", "state": {"running": {}}}]), "Init:0/1"),
    (_pod("Pending", containers=[], inits=[{"name": "i", "state": {"waiting": {"reason": "CrashLoopBackOff"}}}]),
     "Init:CrashLoopBackOff"),
    (_pod("Failed", containers=[], inits=[{"name": "i", "state": {"terminated": {"exitCode": 2, "reason": "Error"}}}]),
     "Init:Error"),
    (_pod(containers=[{"name": "a", "state": {"terminated": {"exitCode": 137, "signal": 9}}}]), "Signal:9"),
])
def test_status_column(pod: dict[str, Any], want: str) -> None:
    assert pod_status(pod) == want


def test_terminating_and_restarts() -> None:
    pod = _pod(containers=[RUNNING, CRASH])
    assert status_and_restarts(pod)[1:] == (3, "2026-01-01T00:00:00Z")
    assert pod_restarts(pod, lambda ts: "5s") == "3 (5s ago)"
    assert pod_restarts(_pod(containers=[RUNNING]), lambda ts: "5s") == "0"
    pod["metadata"]["deletionTimestamp"] = "2026-01-01T00:00:00Z"
    assert pod_status(pod) == "Terminating"
