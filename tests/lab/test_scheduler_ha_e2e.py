"""Issue 16's scheduler HA acceptance, end to end: "killing the scheduler mid-stream loses and
double-binds nothing; two replicas: only the Lease holder binds".

A ``kubernetes: true`` lab (written by the fixture: one cluster ``east``, nodes e1 and e2) runs
its scheduler as a deployment does, with leader election on (Lease
``kube-system/kosmos-scheduler``, 15 s lease, 10 s renew deadline, 2 s retry). The fixture
starts a second replica with the lab's own command line (:func:`tools.lab.schedulers.scheduler_argv`)
and so its own identity (``<hostname>_<uuid>``). The tests run in file order, each in its own
namespace (deleted at its end):

1. only the Lease holder binds: with the lab's replica holding the Lease and the second
   standing by, every pod gets exactly one ``Scheduled`` Event, all reported by the holder
   (``reportingInstance`` names the replica's identity), the holder's bind counter
   (``fabric_scheduler_binding_duration_seconds_count`` on its ``--listen`` endpoint) grows by
   the pods and the standby's stays 0, with no scheduling attempt at all;
2. the holder SIGKILLed mid-stream (held with SIGSTOP while the pods are created, let go and
   killed the moment a watch shows the first bound, as in ``test_scheduler_e2e``), more pods
   created while nobody leads: the standby takes the Lease over no sooner than a full lease
   duration after the dead holder's last renewal (it must wait the lease out) and no later than
   the lease duration plus two jittered retry periods; it binds every pod the dead one had not
   bound, and nothing else (its bind counter equals its successful scheduling attempts and the
   pods left; no 409 Conflict, which is what kubeemu answers a second ``pods/binding``), every pod
   is bound, at most one ``Scheduled`` Event each, none moved;
3. ``lab up`` restarts the killed scheduler (a new process, a new identity): it stands by while
   the second replica holds the Lease and binds nothing; the holder SIGTERMed exits 0 and
   releases the Lease (upstream's ``ReleaseOnCancel``), so the restarted one takes it at its next
   try, well before a lapsed lease would allow, and binds the pods created then.

Needs root (the lab).
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import os
import signal
import subprocess
import time
import urllib.error
import urllib.request
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from scheduler.kube import Api, ApiError, resource_path
from tests.lab.conftest import KubeLab, kube_lab_running, new_lab_name
from tests.lab.test_scheduler_e2e import EAST, _bound, _kill_at_first_bind
from tests.waiting import wait_until
from tools import nsutil
from tools.lab.schedulers import scheduler_argv

TOPOLOGY = """underlay: 198.18.0.0/16
kubernetes: true
clusters:
  - name: east
    mode: p2p
    podCIDRs: [10.10.0.0/16]
    nodes:
      - {name: e1}
      - {name: e2}
"""
_log = logging.getLogger(__name__)

#: The scheduler's defaults (upstream kube-scheduler's), which the lab runs with.
LEASE = "kube-system/kosmos-scheduler"
LEASE_DURATION_S, RETRY_PERIOD_S, JITTER_FACTOR = 15.0, 2.0, 1.2
PROFILE = "default-scheduler"


@dataclass
class Replica:
    """One scheduler process, known by PID and log (identity and port are in the log)."""

    pid: int
    log: Path

    def _lines(self) -> list[str]:
        # the lab's log file gathers every start of its scheduler: only the last one counts
        lines = self.log.read_text(errors="replace").splitlines()
        starts = [i for i, ln in enumerate(lines) if ln.startswith("--- ") and " starting " in ln]
        return lines[starts[-1]:] if starts else lines

    def identity(self) -> str | None:
        for ln in self._lines():
            if ": profiles " in ln and "kosmos-scheduler " in ln:
                return ln.split("kosmos-scheduler ", 1)[1].split(":", 1)[0]
        return None

    def url(self) -> str | None:
        for ln in self._lines():
            if "/metrics and /healthz on " in ln:
                return ln.rsplit(" on ", 1)[1].strip()
        return None

    def get(self, path: str) -> tuple[int, str]:
        try:
            with urllib.request.urlopen(f"{self.url()}{path}", timeout=5) as r:
                return r.status, r.read().decode()
        except urllib.error.HTTPError as e:
            return e.code, e.read().decode(errors="replace")

    def role(self) -> str | None:
        """``leader`` or ``standby`` from a healthy /healthz (None: not up or not healthy)."""
        if self.url() is None:
            return None
        try:
            code, body = self.get("/healthz")
        except OSError:
            return None
        if code != 200:
            return None
        return "leader" if "(leader" in body else "standby" if "(standby" in body else None

    def metrics(self) -> dict[str, float]:
        """``name{label=value,...}`` -> value, labels sorted."""
        code, text = self.get("/metrics")
        assert code == 200, text
        out: dict[str, float] = {}
        for fam in text_string_to_metric_families(text):
            for s in fam.samples:
                labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()))
                out[f"{s.name}{{{labels}}}"] = s.value
        return out

    def binds(self) -> int:
        """Successful ``pods/binding`` requests (each one's duration is observed once)."""
        return int(self.metrics().get("fabric_scheduler_binding_duration_seconds_count{}", 0))

    def attempts(self, result: str) -> int:
        key = f"fabric_scheduler_schedule_attempts_total{{profile={PROFILE},result={result}}}"
        return int(self.metrics().get(key, 0))

    def conflicts(self) -> list[str]:
        """Log lines of binds the API server refused with 409 (the pod was bound already)."""
        return [ln for ln in self._lines() if "binding " in ln and ": 409 " in ln]


class HaLab(KubeLab):
    api: Api
    url: str

    def lab_replica(self) -> Replica:
        k = self.kube(EAST)
        assert k["scheduler"] == "kosmos" and k["scheduler_pid"] and k["scheduler_log"], k
        return Replica(int(k["scheduler_pid"]), Path(k["scheduler_log"]))

    def lease(self) -> dict[str, Any]:
        ns, name = LEASE.split("/")
        spec: dict[str, Any] = self.api.get(resource_path("coordination.k8s.io/v1", "leases", ns, name))["spec"]
        return spec

    def holder(self) -> str:
        return str(self.lease().get("holderIdentity") or "")

    def kpods(self, ns: str) -> list[dict[str, Any]]:
        items: list[dict[str, Any]] = self.api.get(resource_path("v1", "pods", ns))["items"]
        return items

    def create_pods(self, ns: str, prefix: str, count: int) -> None:
        for i in range(count):
            self.api.create(resource_path("v1", "pods", ns), {
                "apiVersion": "v1", "kind": "Pod", "metadata": {"name": f"{prefix}-{i}", "namespace": ns},
                "spec": {"terminationGracePeriodSeconds": 0, "containers": [{
                    "name": "c", "image": "registry.k8s.io/pause:3.10",
                    "resources": {"requests": {"cpu": "10m", "memory": "16Mi"}}}]}})

    def wait_bound(self, ns: str, count: int, timeout: float = 60) -> dict[str, str]:
        """Pod name -> node once ``count`` pods of ``ns`` are bound."""
        def done() -> dict[str, str] | None:
            pods = self.kpods(ns)
            bound = {p["metadata"]["name"]: p["spec"]["nodeName"] for p in _bound(pods)}
            return bound if len(pods) == count == len(bound) else None

        out: dict[str, str] = wait_until(done, timeout, f"{count} pods of {ns} bound", interval=0.3)
        return out

    def scheduled(self, ns: str, pods: set[str]) -> dict[str, list[str]]:
        """Pod name -> the ``reportingInstance`` of each of its ``Scheduled`` Events (an
        aggregated one counted ``count`` times), for every pod of ``ns``, once each of ``pods``
        has one (Events are written after the bind, asynchronously)."""
        def events() -> dict[str, list[str]] | None:
            out: dict[str, list[str]] = {}
            for e in self.api.get(resource_path("v1", "events", ns))["items"]:
                if e.get("reason") == "Scheduled":
                    n = int(e.get("count") or (e.get("series") or {}).get("count") or 1)
                    out.setdefault(e["involvedObject"]["name"], []).extend([str(e.get("reportingInstance"))] * n)
            return out if pods <= set(out) else None

        got: dict[str, list[str]] = wait_until(events, 30, f"a Scheduled event for each of {sorted(pods)}",
                                               interval=0.3)
        return got


class StartedReplica(Replica):
    """The second replica: started by the fixture, stopped by PID."""

    proc: subprocess.Popen[bytes]


@pytest.fixture(scope="module")
def halab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[HaLab]:
    d = tmp_path_factory.mktemp("sched-ha")
    topo = d / "sched-ha.yaml"
    topo.write_text(TOPOLOGY)
    lab = HaLab(new_lab_name(), topo)
    with kube_lab_running(lab, "--grace-period", "30", "--timeout", "120") as running:
        running.url = running.kube(EAST)["url"]
        running.api = Api(running.url)
        yield running


@pytest.fixture(scope="module")
def second(halab: HaLab, tmp_path_factory: pytest.TempPathFactory) -> Iterator[StartedReplica]:
    """A second scheduler replica with the lab's own command line, in the root namespace like the
    lab's (it talks to the API server on 127.0.0.1); stopped (SIGTERM, then SIGKILL) at the end."""
    log = tmp_path_factory.mktemp("sched-ha-second") / "scheduler-second.log"
    with open(log, "ab") as f:
        proc = subprocess.Popen(scheduler_argv(halab.url), stdin=subprocess.DEVNULL, stdout=f,
                                stderr=subprocess.STDOUT, start_new_session=True)
    rep = StartedReplica(proc.pid, log)
    rep.proc = proc
    try:
        wait_until(rep.role, 60, "the second replica up and healthy", interval=0.3)
        yield rep
    finally:
        if proc.poll() is None:
            nsutil.terminate([(proc.pid, nsutil.start_time(proc.pid))])
        proc.wait(10)


@pytest.fixture
def ns(halab: HaLab, request: pytest.FixtureRequest) -> Iterator[str]:
    name = "ha-" + uuid.uuid4().hex[:6]
    halab.api.create("/api/v1/namespaces", {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}})
    yield name
    with contextlib.suppress(ApiError):
        halab.api.request("DELETE", f"/api/v1/namespaces/{name}")


def _time(stamp: str) -> float:
    """A Lease's MicroTime (``2026-12-05T19:00:00.123456Z``) as epoch seconds."""
    return datetime.datetime.strptime(stamp, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=datetime.UTC).timestamp()


def test_only_the_lease_holder_binds(halab: HaLab, second: StartedReplica, ns: str) -> None:
    lab = halab.lab_replica()
    wait_until(lambda: lab.role() == "leader" or None, 30, "the lab's scheduler leading")
    assert second.role() == "standby"
    a, b = lab.identity(), second.identity()
    assert a and b and a != b, (a, b)
    assert halab.holder() == a
    a_binds, b_before = lab.binds(), second.metrics()
    assert b_before.get("fabric_scheduler_leader{}") == 0 and lab.metrics().get("fabric_scheduler_leader{}") == 1
    halab.create_pods(ns, "p", 12)
    bound = halab.wait_bound(ns, 12)
    per_pod = halab.scheduled(ns, set(bound))
    assert per_pod == {name: [f"{PROFILE}-{a}"] for name in bound}, per_pod
    assert lab.binds() - a_binds == 12
    # the standby saw the same pods (its informers are synced: /healthz) and touched none
    assert second.binds() == 0
    assert sum(second.attempts(r) for r in ("scheduled", "unschedulable", "error")) == 0
    assert second.role() == "standby" and halab.holder() == a


def test_killing_the_holder_mid_stream_hands_over_and_loses_and_double_binds_nothing(
        halab: HaLab, second: StartedReplica, ns: str) -> None:
    lab = halab.lab_replica()
    a, b = lab.identity(), second.identity()
    assert a and b and halab.holder() == a and second.role() == "standby"
    b_binds, b_scheduled = second.binds(), second.attempts("scheduled")
    stream, meanwhile = 40, 8
    os.kill(lab.pid, signal.SIGSTOP)  # the stream queues up; SIGCONT in _kill_at_first_bind
    try:
        halab.create_pods(ns, "s", stream)
        bound_at_kill = _kill_at_first_bind(halab.url, ns, lab.pid, stream)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(lab.pid, signal.SIGCONT)
    halab.create_pods(ns, "m", meanwhile)  # while nobody leads
    # Until the Lease changes hands every bound pod is the dead holder's: a snapshot taken between
    # two reads that both show it holding is its final tally (it is dead: nothing changes), and
    # the Lease then carries its last renewal.
    by_a: dict[str, str] = {}
    last_renew = 0.0
    deadline = time.monotonic() + LEASE_DURATION_S + 2 * JITTER_FACTOR * RETRY_PERIOD_S + 3 * RETRY_PERIOD_S + 10

    while True:
        before = halab.lease()
        snap = {p["metadata"]["name"]: p["spec"]["nodeName"] for p in _bound(halab.kpods(ns))}
        after = halab.lease()
        if before.get("holderIdentity") == after.get("holderIdentity") == a:
            by_a, last_renew = snap, _time(after["renewTime"])
        elif after.get("holderIdentity") == b:
            break
        assert time.monotonic() < deadline, f"the standby did not take the Lease over: {after}"
        time.sleep(0.2)
    taken = _time(after["acquireTime"])
    # it waited a full lease duration from the dead holder's last renewal, and not much longer
    waited = taken - last_renew
    assert waited >= LEASE_DURATION_S - 0.01, f"took the Lease over {waited:.2f} s after the last renewal"
    assert waited <= LEASE_DURATION_S + 2 * (1 + JITTER_FACTOR) * RETRY_PERIOD_S + 2, f"waited {waited:.2f} s"
    _log.info("the standby took the Lease over %.2f s after the dead holder's last renewal; the holder had bound "
              "%d of %d stream pods (%d when the watch saw the first)", waited, len(by_a), stream, bound_at_kill)
    # How far the stream got before the kill depends on the machine's load (the watch lags); the
    # pods created after it leave the successor work in any case.
    assert 1 <= bound_at_kill <= len(by_a), (bound_at_kill, len(by_a))
    # lost nothing: every pod bound, the dead holder's where it put them
    total = stream + meanwhile
    bound = halab.wait_bound(ns, total, timeout=60)
    assert {n: bound[n] for n in by_a} == by_a
    # double-bound nothing: the new holder bound exactly the rest, every bind it tried succeeded
    # (a bind of a bound pod is a 409 in kubeemu), and no pod has two Scheduled events
    rest = total - len(by_a)
    per_pod = halab.scheduled(ns, set(bound) - set(by_a))
    assert second.binds() - b_binds == rest
    assert second.attempts("scheduled") - b_scheduled == rest
    assert second.conflicts() == [] and lab.conflicts() == []
    assert {n: r for n, r in per_pod.items() if len(r) > 1} == {}
    assert {n for n, r in per_pod.items() if r == [f"{PROFILE}-{b}"]} == set(bound) - set(by_a)
    assert set(per_pod) - set(bound) == set()
    assert Counter(r[0] for r in per_pod.values()) - Counter({f"{PROFILE}-{a}": len(by_a), f"{PROFILE}-{b}": rest}) \
        == Counter()
    assert second.role() == "leader"


def test_a_restarted_scheduler_stands_by_and_takes_a_released_lease_at_once(
        halab: HaLab, second: StartedReplica, ns: str) -> None:
    b = second.identity()
    assert b
    wait_until(lambda: not halab.kube(EAST).get("scheduler_pid") or None, 10, "the killed scheduler gone")
    halab.lab("up", str(halab.topology), "--timeout", "120")  # restarts what died: the scheduler
    lab = halab.lab_replica()
    wait_until(lab.role, 60, "the restarted scheduler up and healthy", interval=0.3)
    a2 = lab.identity()
    assert a2 and a2 != b
    assert lab.role() == "standby" and halab.holder() == b
    halab.create_pods(ns, "b", 6)
    halab.wait_bound(ns, 6)
    assert halab.scheduled(ns, {f"b-{i}" for i in range(6)}) == {f"b-{i}": [f"{PROFILE}-{b}"] for i in range(6)}
    assert lab.binds() == 0
    # SIGTERM: the holder finishes, releases the Lease and exits 0; the standby takes it at its
    # next try (2 to 4.4 s apart), long before the 15 s a lapsed lease would need
    stopped = time.time()
    second.proc.send_signal(signal.SIGTERM)
    assert second.proc.wait(30) == 0
    assert any(f"{b} released lease {LEASE}" in ln for ln in second._lines())
    wait_until(lambda: halab.holder() == a2 or None, LEASE_DURATION_S, "the restarted scheduler taking the Lease")
    took = _time(halab.lease()["acquireTime"]) - stopped
    _log.info("the restarted scheduler took the released Lease %.2f s after the holder's SIGTERM", took)
    assert took < LEASE_DURATION_S - RETRY_PERIOD_S, f"took the released Lease {took:.2f} s after SIGTERM"
    wait_until(lambda: lab.role() == "leader" or None, 10, "the restarted scheduler leading")
    halab.create_pods(ns, "a", 6)
    halab.wait_bound(ns, 12)
    per_pod = halab.scheduled(ns, {f"a-{i}" for i in range(6)})
    assert {n: r for n, r in per_pod.items() if n.startswith("a-")} == {f"a-{i}": [f"{PROFILE}-{a2}"] for i in range(6)}
    assert lab.binds() == 6 and lab.conflicts() == []
