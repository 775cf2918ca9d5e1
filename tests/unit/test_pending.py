"""``fabric-tool pending`` (tools/diagnose/pending.py): Pending pods joined with the scheduler's
FailedScheduling Events and PodScheduled condition, the upstream message taken apart into its
per-node reasons, against a real kubeemu API server (the Events are written here the way a
scheduler writes them; the scheduler itself is tested elsewhere).
"""

from __future__ import annotations

import datetime
import json
import urllib.request
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from kubeemu.runner import ServerThread
from tools import cli
from tools.diagnose import pending

pytestmark = pytest.mark.unit

MSG = ("0/5 nodes are available: 1 node(s) had untolerated taint {kosmos.io/node: true}, 3 Insufficient cpu, "
       "1 node(s) didn't match Pod's node affinity/selector. preemption: 0/5 nodes are available: "
       "5 Preemption is not helpful for scheduling.")


def test_parse_upstream_message() -> None:
    p = pending.parse_message(MSG)
    assert (p.available, p.total) == (0, 5)
    assert [(r.nodes, r.reason) for r in p.reasons] == [
        (1, "node(s) had untolerated taint {kosmos.io/node: true}"), (3, "Insufficient cpu"),
        (1, "node(s) didn't match Pod's node affinity/selector")]
    assert p.preemption == "0/5 nodes are available: 5 Preemption is not helpful for scheduling."
    # commas inside a taint's braces stay in the reason
    p = pending.parse_message("0/2 nodes are available: 2 node(s) had untolerated taint {a: b, c: d}.")
    assert [(r.nodes, r.reason) for r in p.reasons] == [(2, "node(s) had untolerated taint {a: b, c: d}")]
    assert p.preemption is None
    assert pending.parse_message("0/0 nodes are available.").reasons == []
    other = pending.parse_message("running PreBind plugin \"VolumeBinding\": binding volumes: timed out")
    assert other.total is None and other.reasons[0].nodes == 0


@pytest.fixture(scope="module")
def emu() -> Iterator[ServerThread]:
    with ServerThread(name="pending") as s:
        yield s


def _post(url: str, path: str, body: dict[str, Any]) -> dict[str, Any]:
    req = urllib.request.Request(f"{url}{path}", data=json.dumps(body).encode(), method="POST",
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=5) as r:
        doc: dict[str, Any] = json.loads(r.read())
        return doc


def _ns(url: str) -> str:
    ns = f"p{uuid.uuid4().hex[:8]}"
    _post(url, "/api/v1/namespaces", {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}})
    return ns


def _pod(url: str, ns: str, name: str, **spec: Any) -> dict[str, Any]:
    body = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "namespace": ns},
            "spec": {"containers": [{"name": "c", "image": "x"}], **spec}}
    return _post(url, f"/api/v1/namespaces/{ns}/pods", body)


def _unschedulable(url: str, pod: dict[str, Any], message: str, count: int = 1) -> None:
    """What a scheduler writes: the PodScheduled condition and a FailedScheduling Event."""
    ns, name = pod["metadata"]["namespace"], pod["metadata"]["name"]
    now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    status = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "namespace": ns},
              "status": {"phase": "Pending", "conditions": [{"type": "PodScheduled", "status": "False",
                                                              "reason": "Unschedulable", "message": message,
                                                              "lastTransitionTime": now}]}}
    req = urllib.request.Request(f"{url}/api/v1/namespaces/{ns}/pods/{name}/status", method="PATCH",
                                 data=json.dumps(status).encode(),
                                 headers={"Content-Type": "application/merge-patch+json"})
    urllib.request.urlopen(req, timeout=5).close()
    _post(url, f"/api/v1/namespaces/{ns}/events", {
        "apiVersion": "v1", "kind": "Event", "metadata": {"name": f"{name}.{uuid.uuid4().hex[:8]}", "namespace": ns},
        "involvedObject": {"kind": "Pod", "namespace": ns, "name": name, "uid": pod["metadata"]["uid"],
                           "apiVersion": "v1"},
        "reason": "FailedScheduling", "message": message, "type": "Warning", "count": count,
        "source": {"component": "default-scheduler"}, "firstTimestamp": now, "lastTimestamp": now})


def test_explain_joins_pods_events_and_conditions(emu: ServerThread) -> None:
    ns = _ns(emu.url)
    big = _pod(emu.url, ns, "big")
    _unschedulable(emu.url, big, MSG, count=4)
    _pod(emu.url, ns, "unseen", schedulerName="nobody")
    _pod(emu.url, ns, "gated", schedulingGates=[{"name": "example.com/wait"}])
    _pod(emu.url, ns, "pinned", nodeName="n1")  # bound: not Pending-without-a-node
    out = pending.explain("east", emu.url, ns)
    assert [p["name"] for p in out] == ["big", "gated", "unseen"]
    b = out[0]
    assert b["cluster"] == "east" and b["message"] == MSG and b["event"]["count"] == 4
    assert b["event"]["source"] == "default-scheduler"
    assert (b["nodesAvailable"], b["nodesTotal"]) == (0, 5)
    assert {"nodes": 3, "reason": "Insufficient cpu"} in b["reasons"]
    assert b["podScheduled"]["reason"] == "Unschedulable"
    text = pending.render(out)
    assert f"east {ns}/big: Pending for " in text
    assert "FailedScheduling (x4, last " in text and MSG in text
    assert "nodes available: 0 of 5; why not the others:\n    3 node(s): Insufficient cpu\n" in text
    assert "preemption: 0/5 nodes are available: 5 Preemption is not helpful for scheduling." in text
    assert "scheduling gated (example.com/wait)" in text
    assert "is a scheduler named 'nobody' running in this cluster" in text
    # One pod by name, the latest event wins; a bound pod named explicitly says so.
    _unschedulable(emu.url, big, "0/5 nodes are available: 5 Insufficient memory.")
    one = pending.explain("east", emu.url, ns, "big")
    assert one[0]["reasons"] == [{"nodes": 5, "reason": "Insufficient memory"}]
    assert "not pending: bound to node n1" in pending.render(pending.explain("east", emu.url, ns, "pinned"))
    with pytest.raises(pending.PendingError, match="404"):
        pending.explain("east", emu.url, ns, "nope")


def test_cli_pending_json_and_text(emu: ServerThread, capsys: pytest.CaptureFixture[str]) -> None:
    ns = _ns(emu.url)
    _unschedulable(emu.url, _pod(emu.url, ns, "big"), MSG)
    assert cli.main(["pending", "--server", emu.url, "-n", ns, "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert [p["name"] for p in doc] == ["big"] and doc[0]["nodesTotal"] == 5
    assert cli.main(["pending", "--server", emu.url, "-n", ns, "big"]) == 0
    assert "1 node(s): node(s) had untolerated taint {kosmos.io/node: true}" in capsys.readouterr().out
    empty = _ns(emu.url)
    assert cli.main(["pending", "--server", emu.url, "-n", empty]) == 0
    assert capsys.readouterr().out.strip() == "no Pending pods without a node"
    assert cli.main(["pending", "--lab", "nolabxyz"]) == 1
    assert "nolabxyz" in capsys.readouterr().err
    assert cli.main(["pending", "--help"]) == 0
    assert "fabric-tool pending --lab demo --context east -n apps big-pod" in capsys.readouterr().out
