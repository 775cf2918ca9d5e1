"""Issue 15's acceptance, end to end: a user's ordinary application manifests, applied with the
real kubectl to a ``kubernetes: true`` lab, run as real processes and are used through the fabric.

Topology (written by the fixture): east (e1, e2) and west (w1, w2), one static lab pod per node;
w2 declares a small capacity (``resources: {pods: 3, cpu: "2"}``) for the admission test.

Everything is the lab's own: the scheduler (kosmos-scheduler, the lab default; the admission
test pins its pods with ``nodeName`` to get past it, as a user bypassing the scheduler would),
the controller-manager (Deployment, ReplicaSet, StatefulSet, EndpointSlice, PV binder,
provisioner), the kubelet's process runtime, the lab kube-proxy (nftables), the API server's
validation, logs and exec.

Order matters only where a test says so; each test cleans up what it made.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.lab.conftest import KubeLab, kube_lab_running, lab_mounts, needs_kubectl, new_lab_name, run
from tests.waiting import wait_until

NS = "apps"

pytestmark = needs_kubectl

TOPOLOGY = """underlay: 198.18.0.0/16
kubernetes: true
clusters:
  - name: east
    mode: p2p
    podCIDRs: [10.10.0.0/16]
    serviceCIDRs: [10.96.0.0/20]
    nodes:
      - {name: e1, pods: 1}
      - {name: e2, pods: 1}
  - name: west
    mode: p2p
    podCIDRs: [10.20.0.0/16]
    serviceCIDRs: [10.97.0.0/20]
    nodes:
      - {name: w1, pods: 1}
      - {name: w2, pods: 1, resources: {pods: 3, cpu: "2", memory: 4Gi}}
"""

#: A web server whose answer names its pod (the container's hostname is the pod name), so a
#: client can tell the backends apart. ``VERSION`` changes the command for the rolling update.
#: preStop keeps a leaving pod serving while the endpoint change travels (endpoints controller,
#: EndpointSlice, the lab kube-proxy's watch, its rules): 2 s was once not enough in CI, with
#: the whole suite on 2 cores (1 of 766 requests refused). Upstream's advice is the same: the
#: sleep must outlast the propagation, which no API reports.
WEB = """apiVersion: apps/v1
kind: Deployment
metadata: {{name: web, namespace: {ns}}}
spec:
  replicas: 3
  selector: {{matchLabels: {{app: web}}}}
  template:
    metadata: {{labels: {{app: web}}}}
    spec:
      terminationGracePeriodSeconds: 15
      containers:
        - name: web
          image: python:3
          command: [sh, -c, 'mkdir -p /tmp/www && echo "{version} $(hostname)" > /tmp/www/index.html &&
            cd /tmp/www && exec python3 -m http.server 8080']
          ports: [{{name: http, containerPort: 8080}}]
          readinessProbe: {{httpGet: {{path: /, port: 8080}}, periodSeconds: 1}}
          lifecycle: {{preStop: {{exec: {{command: [sleep, "5"]}}}}}}
---
apiVersion: v1
kind: Service
metadata: {{name: web, namespace: {ns}}}
spec:
  selector: {{app: web}}
  ports: [{{port: 80, targetPort: http}}]
"""


@pytest.fixture(scope="module")
def alab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[KubeLab]:
    topo = tmp_path_factory.mktemp("apps") / "lab.yaml"
    topo.write_text(TOPOLOGY)
    with kube_lab_running(KubeLab(new_lab_name(), topo), "--grace-period", "30", "--timeout", "120") as lab:
        for cluster in ("east", "west"):
            lab.kubectl(cluster, "create", "namespace", NS)
        yield lab


def _client_netns(lab: KubeLab) -> str:
    """A static lab pod of west: the client on the other side of the fabric."""
    return str(lab.pods()["west/w1/p0"]["netns"])


HTTP_LOOP = """
import json, sys, time, urllib.request
url, seconds = sys.argv[1], float(sys.argv[2])
out, end = [], time.monotonic() + seconds
while time.monotonic() < end:
    try:
        with urllib.request.urlopen(url, timeout=3) as r:
            out.append(r.read().decode().strip())
    except Exception as e:
        out.append("ERROR " + repr(e))
    time.sleep(0.05)
print(json.dumps(out))
"""


def _http_loop(lab: KubeLab, url: str, seconds: float) -> subprocess.Popen[str]:
    """Requests to ``url`` from west's pod for ``seconds``; ``communicate()`` gives their answers."""
    return subprocess.Popen(["ip", "netns", "exec", _client_netns(lab), sys.executable, "-c", HTTP_LOOP, url,
                             str(seconds)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _answers(lab: KubeLab, url: str, seconds: float) -> list[str]:
    p = _http_loop(lab, url, seconds)
    out, err = p.communicate(timeout=seconds + 60)
    assert p.returncode == 0, err
    answers: list[str] = json.loads(out)
    return answers


def _ready_replicas(lab: KubeLab, n: int) -> None:
    def done() -> bool:
        d: dict[str, Any] = lab.get("east", "deployment", "web", "-n", NS)
        st: dict[str, Any] = d.get("status", {})
        return (st.get("readyReplicas") == n and st.get("updatedReplicas") == n and st.get("replicas") == n
                and st.get("observedGeneration") == d["metadata"]["generation"])

    wait_until(done, 90, f"deployment web with {n} ready replicas", interval=0.5)


def _endpoints(lab: KubeLab) -> list[str]:
    slices = lab.get("east", "endpointslices", "-n", NS, "-l", "kubernetes.io/service-name=web")["items"]
    return sorted(a for s in slices for e in s.get("endpoints") or [] if (e.get("conditions") or {}).get("ready")
                  for a in e["addresses"])


def test_deployment_behind_a_service_from_another_cluster(alab: KubeLab) -> None:
    """3 replicas of http.server behind a ClusterIP Service of east, used from a pod of west:
    every backend answers; scale to 5 and back to 3; a rolling update to a new command loses no
    request (readiness gates the new pods; preStop keeps the old ones serving while the
    endpoint change reaches the kube-proxy)."""
    alab.apply("east", WEB.format(ns=NS, version="v1"))
    _ready_replicas(alab, 3)
    alab.kubectl("east", "rollout", "status", "deployment/web", "-n", NS, "--timeout=60s")
    ip = alab.get("east", "service", "web", "-n", NS)["spec"]["clusterIP"]
    url = f"http://{ip}/"
    wait_until(lambda: len(_endpoints(alab)) == 3, 30, "3 ready endpoints of web")

    def backends(n: int) -> set[str]:
        pods = {p["metadata"]["name"] for p in alab.get("east", "pods", "-n", NS, "-l", "app=web")["items"]
                if not p["metadata"].get("deletionTimestamp")}
        seen: set[str] = set()

        def all_seen() -> bool:
            for a in _answers(alab, url, 2):
                assert not a.startswith("ERROR"), a
                seen.add(a.split()[1])
            return seen == pods

        wait_until(all_seen, 60, f"answers from all {n} backends {sorted(pods)} (seen {sorted(seen)})")
        assert len(pods) == n
        return seen

    first = backends(3)
    alab.kubectl("east", "scale", "deployment", "web", "-n", NS, "--replicas", "5")
    _ready_replicas(alab, 5)
    assert first < backends(5)
    alab.kubectl("east", "scale", "deployment", "web", "-n", NS, "--replicas", "3")
    _ready_replicas(alab, 3)
    wait_until(lambda: len(_endpoints(alab)) == 3, 30, "3 ready endpoints of web after scaling down")
    backends(3)

    loop = _http_loop(alab, url, 40)
    time.sleep(2)
    alab.apply("east", WEB.format(ns=NS, version="v2"))
    alab.kubectl("east", "rollout", "status", "deployment/web", "-n", NS, "--timeout=90s", timeout=120)
    out, err = loop.communicate(timeout=120)
    assert loop.returncode == 0, err
    answers: list[str] = json.loads(out)
    failed = [a for a in answers if a.startswith("ERROR")]
    assert not failed, f"{len(failed)} of {len(answers)} requests failed during the rollout: {failed[:5]}"
    versions = [a.split()[0] for a in answers]
    assert versions[0] == "v1" and versions[-1] == "v2", versions
    assert len(alab.get("east", "replicasets", "-n", NS, "-l", "app=web")["items"]) == 2
    alab.kubectl("east", "delete", "-n", NS, "deployment/web", "service/web")


STS = """apiVersion: apps/v1
kind: StatefulSet
metadata: {{name: db, namespace: {ns}}}
spec:
  serviceName: db
  replicas: 1
  selector: {{matchLabels: {{app: db}}}}
  template:
    metadata: {{labels: {{app: db}}}}
    spec:
      terminationGracePeriodSeconds: 1
      containers:
        - name: db
          image: busybox
          command: [sh, -c, '[ -f /data/born ] || hostname > /data/born; exec sleep 3600']
          volumeMounts: [{{name: data, mountPath: /data}}]
  volumeClaimTemplates:
    - metadata: {{name: data}}
      spec: {{accessModes: [ReadWriteOnce], resources: {{requests: {{storage: 1Gi}}}}}}
"""


def _pod_running(lab: KubeLab, cluster: str, name: str, not_uid: str | None = None,
                 timeout: float = 60) -> dict[str, Any]:
    def running() -> dict[str, Any] | None:
        p = lab.kubectl(cluster, "get", "pod", name, "-n", NS, "-o", "json", check=False)
        if p.returncode != 0:
            return None
        pod: dict[str, Any] = json.loads(p.stdout)
        st = pod.get("status", {})
        ok = st.get("phase") == "Running" and all(c.get("ready") for c in st.get("containerStatuses") or [{}])
        return pod if ok and pod["metadata"]["uid"] != not_uid else None

    out: dict[str, Any] = wait_until(running, timeout, f"pod {cluster}/{name} Running and ready", interval=0.3)
    return out


def test_statefulset_data_survives_the_pod_and_the_claim_expands(alab: KubeLab) -> None:
    alab.apply("east", STS.format(ns=NS))
    pod = _pod_running(alab, "east", "db-0")
    claim = alab.get("east", "pvc", "data-db-0", "-n", NS)
    assert claim["status"]["phase"] == "Bound" and claim["spec"]["storageClassName"] == "lab-local"
    alab.kubectl("east", "exec", "-n", NS, "db-0", "--", "sh", "-c", "echo kept > /data/note")
    # Not kubectl's own wait (60 s of its timeout went by on a loaded CI machine): the new db-0
    # Running is what counts, and it comes only after the old one is gone.
    alab.kubectl("east", "delete", "pod", "db-0", "-n", NS, "--wait=false")
    again = _pod_running(alab, "east", "db-0", not_uid=pod["metadata"]["uid"], timeout=180)
    assert again["spec"]["volumes"][0]["persistentVolumeClaim"]["claimName"] == "data-db-0"
    assert alab.get("east", "pvc", "data-db-0", "-n", NS)["metadata"]["uid"] == claim["metadata"]["uid"]
    note = alab.kubectl("east", "exec", "-n", NS, "db-0", "--", "cat", "/data/note", "/data/born").stdout
    assert note.split() == ["kept", "db-0"]

    alab.kubectl("east", "patch", "pvc", "data-db-0", "-n", NS, "-p",
                 '{"spec": {"resources": {"requests": {"storage": "2Gi"}}}}')
    wait_until(lambda: alab.get("east", "pvc", "data-db-0", "-n", NS)["status"].get("capacity", {}).get("storage")
               == "2Gi", 60, "the claim's capacity to show 2Gi")
    pv = alab.get("east", "pv", claim["spec"]["volumeName"])
    assert pv["spec"]["capacity"]["storage"] == "2Gi"
    alab.kubectl("east", "delete", "-n", NS, "statefulset/db", "pvc/data-db-0")


def test_logs_exec_and_crash_loop_back_off(alab: KubeLab) -> None:
    alab.apply("east", f"""apiVersion: v1
kind: Pod
metadata: {{name: ticker, namespace: {NS}}}
spec:
  nodeName: e2
  containers:
    - {{name: t, image: busybox, command: [sh, -c, 'i=0; while true; do echo tick $i; i=$((i+1)); sleep 0.2; done']}}
---
apiVersion: v1
kind: Pod
metadata: {{name: crasher, namespace: {NS}}}
spec:
  nodeName: e1
  restartPolicy: Always
  containers:
    - {{name: c, image: busybox, command: [sh, -c, 'echo attempt at $(date +%s%N); exit 1']}}
""")
    _pod_running(alab, "east", "ticker")
    assert alab.kubectl("east", "exec", "-n", NS, "ticker", "--", "cat", "/etc/hostname").stdout.strip() == "ticker"
    assert alab.kubectl("east", "exec", "-n", NS, "ticker", "--", "sh", "-c", "exit 7", check=False).returncode == 7
    follow = subprocess.Popen(alab.kubectl_argv("east", "logs", "-f", "-n", NS, "ticker"), stdout=subprocess.PIPE,
                              text=True)
    try:
        assert follow.stdout is not None
        lines = [follow.stdout.readline() for _ in range(15)]  # 3 s of output: more than was logged at start
    finally:
        follow.kill()
        follow.wait(10)
    numbers = [int(line.split()[1]) for line in lines]
    assert numbers == list(range(numbers[0], numbers[0] + 15)), lines

    def backing_off() -> dict[str, Any] | None:
        cs = (alab.get("east", "pod", "crasher", "-n", NS)["status"].get("containerStatuses") or [{}])[0]
        waiting = (cs.get("state") or {}).get("waiting") or {}
        return cs if cs.get("restartCount", 0) >= 2 and waiting.get("reason") == "CrashLoopBackOff" else None

    cs = wait_until(backing_off, 60, "crasher in CrashLoopBackOff with 2 restarts", interval=0.5)
    assert cs["lastState"]["terminated"]["exitCode"] == 1
    previous = alab.kubectl("east", "logs", "-n", NS, "crasher", "--previous").stdout
    assert previous.startswith("attempt at "), previous
    table = alab.kubectl("east", "get", "pod", "crasher", "-n", NS).stdout
    assert "CrashLoopBackOff" in table, table
    alab.kubectl("east", "delete", "pod", "-n", NS, "ticker", "crasher", "--grace-period", "1")


def test_admission_fails_pods_that_do_not_fit(alab: KubeLab) -> None:
    """West's w2 has cpu 2 and room for 3 pods: a pod asking 3 CPUs fails OutOfcpu; of four small
    pods the fourth fails OutOfpods (the failed ones do not count)."""

    def pod(name: str, cpu: str) -> str:
        return (f"apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, namespace: {NS}}}\nspec:\n  nodeName: w2\n"
                f"  containers: [{{name: c, image: busybox, command: [sleep, '3600'],"
                f" resources: {{requests: {{cpu: '{cpu}'}}}}}}]\n")

    def failed(name: str) -> dict[str, Any] | None:
        st: dict[str, Any] = alab.get("west", "pod", name, "-n", NS)["status"]
        return st if st.get("phase") == "Failed" else None

    alab.apply("west", pod("huge", "3"))
    st = wait_until(lambda: failed("huge"), 30, "pod huge Failed")
    assert st["reason"] == "OutOfcpu" and "cpu, requested: 3000, used: 0, capacity: 2000" in st["message"], st
    for i in range(3):
        alab.apply("west", pod(f"small{i}", "100m"))
        _pod_running(alab, "west", f"small{i}")
    alab.apply("west", pod("one-too-many", "100m"))
    st = wait_until(lambda: failed("one-too-many"), 30, "pod one-too-many Failed")
    assert st["reason"] == "OutOfpods", st
    alab.kubectl("west", "delete", "pod", "-n", NS, "huge", "small0", "small1", "small2", "one-too-many",
                 "--grace-period", "1")


def _pod_processes(lab: KubeLab) -> set[int]:
    """Every process in the lab's kubelet pod network namespaces (the containers and shims)."""
    pids: set[int] = set()
    for ns in (n for n in os.listdir("/run/netns") if n.startswith(lab.name) and "-k" in n):
        out = run("ip", "netns", "pids", ns, check=False).stdout
        pids |= {int(x) for x in out.split()}
    return pids


def test_restarting_the_controller_manager_and_kubelet_duplicates_nothing(alab: KubeLab) -> None:
    alab.apply("east", WEB.format(ns=NS, version="v1"))
    _ready_replicas(alab, 3)
    wait_until(lambda: len(_endpoints(alab)) == 3, 30, "3 ready endpoints of web")
    # No pod still terminating from an earlier test: its going away later is not a duplicate.
    def terminating() -> list[str]:
        pods = alab.get("east", "pods", "-n", NS)["items"]
        return [p["metadata"]["name"] for p in pods if p["metadata"].get("deletionTimestamp")]

    wait_until(lambda: not terminating(), 60, f"no pod of {NS} terminating")
    before_uids = {p["metadata"]["uid"] for p in alab.get("east", "pods", "-n", NS)["items"]}
    before_procs = _pod_processes(alab)
    before_eps = _endpoints(alab)
    before_slices = {s["metadata"]["uid"] for s in alab.get("east", "endpointslices", "-n", NS)["items"]}
    assert before_procs
    # The kubelet keeps its root (volumes, records, logs) on a tmpfs of the lab's, which outlives it.
    tmpfs = [m for m in lab_mounts(alab.name) if m.startswith("tmpfs on ") and m.endswith("/kubelet-east")]
    assert tmpfs, f"the kubelet root is not a tmpfs: {lab_mounts(alab.name)}"
    k = alab.kube("east")
    for pid in (k["controller_manager_pid"], k["kubelet_pid"]):
        os.kill(pid, signal.SIGKILL)
    wait_until(lambda: not alab.kube("east")["kubelet_pid"] and not alab.kube("east")["controller_manager_pid"],
               10, "both processes gone")
    alab.lab("up", str(alab.topology), "--timeout", "60")
    k = alab.kube("east")
    assert k["controller_manager_pid"] and k["kubelet_pid"]
    wait_until(lambda: Path(k["controller_manager_log"]).read_text().count("deployment: caches synced") >= 2, 20,
               "the new controller-manager synced")
    time.sleep(3)  # let a duplicating controller or kubelet show itself
    _ready_replicas(alab, 3)
    assert {p["metadata"]["uid"] for p in alab.get("east", "pods", "-n", NS)["items"]} == before_uids
    assert _pod_processes(alab) == before_procs
    assert _endpoints(alab) == before_eps
    assert {s["metadata"]["uid"] for s in alab.get("east", "endpointslices", "-n", NS)["items"]} == before_slices
    assert [m for m in lab_mounts(alab.name) if m in tmpfs] == tmpfs  # the same mount, not a second one
    assert len([m for m in lab_mounts(alab.name) if m.endswith("/kubelet-east")]) == 1
    # Left running on purpose: `lab down` must stop these containers too (the fixture checks that
    # no process of the lab survives, including containers a kubelet could restart meanwhile).


@pytest.mark.parametrize(("manifest", "expected"), [
    ("apiVersion: v1\nkind: Widget\nmetadata: {name: w}\n", 'no matches for kind "Widget" in version "v1"'),
    ("apiVersion: v1\nkind: Pod\nmetadata: {name: p}\nspec:\n  containers: [{name: c, image: x, "
     "readinessProbe: {periodSeconds: 1}}]\n",
     "spec.containers[0].readinessProbe: Required value: must specify a handler type"),
    ("apiVersion: v1\nkind: Pod\nmetadata: {name: p}\nspec:\n  containers: [{name: c, image: x}]\n"
     "  volumes: [{name: v, configMap: {}}]\n", "spec.volumes[0].configMap.name: Required value"),
    ("apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: d}\nspec:\n  selector: {matchLabels: {a: b}}\n"
     "  template:\n    metadata: {labels: {a: c}}\n    spec: {containers: [{name: c, image: x}]}\n",
     "spec.template.metadata.labels: Invalid value"),
])
def test_bad_manifests_are_refused_naming_the_field(alab: KubeLab, manifest: str, expected: str) -> None:
    p = alab.kubectl("east", "apply", "-n", NS, "-f", "-", stdin=manifest, check=False)
    assert p.returncode != 0 and expected in p.stderr, p.stderr
