"""Multi-cluster services in the lab, end to end (issue 18's acceptance): the lab's ``kosmos-mcs``
imports an exported Service into every cluster, pods reach it by the imported ClusterIP and by
``<svc>.<ns>.svc.clusterset.local``, endpoints of several exporters merge, a scaled-down
exporter leaves, an unexported Service never leaks, unexport cleans up, and a cluster cut off
the underlay has its endpoints marked not ready in every importer (the time printed).

Topology (written by the fixture): three peer clusters ``ma``, ``mb``, ``mc``, one node each
(CI time), the Kosmos scheduler binding the Deployments' pods. Users' tools only: ``kubectl``,
``fabric-tool export|unexport|services`` and ``lab fail|heal``. The backends answer HTTP with
``<cluster>/<pod name>`` so every answer says where it came from.
"""

from __future__ import annotations

import datetime
import json
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest

from tests.lab.conftest import KubeLab, kube_lab_running, needs_kubectl, new_lab_name
from tests.waiting import wait_until

NS = "mcs"
ZONE = "svc.clusterset.local"

pytestmark = needs_kubectl

TOPOLOGY = """underlay: 198.18.0.0/16
kubernetes: true
clusters:
  - name: ma
    mode: p2p
    podCIDRs: [10.41.0.0/16]
    serviceCIDRs: [10.141.0.0/20]
    nodes:
      - {name: a1, pods: 1}
  - name: mb
    mode: p2p
    podCIDRs: [10.42.0.0/16]
    serviceCIDRs: [10.142.0.0/20]
    nodes:
      - {name: b1, pods: 1}
  - name: mc
    mode: p2p
    podCIDRs: [10.43.0.0/16]
    serviceCIDRs: [10.143.0.0/20]
    nodes:
      - {name: c1, pods: 1}
"""

#: An HTTP Deployment answering ``<cluster>/<pod name>``, gated by a readiness probe, and its Service.
#: A terminating backend serves 3 s more (a ``preStop`` sleep, the usual drain of a Deployment):
#: long enough for its endpoint to leave every importer, so no request fails while it goes.
WEB = """apiVersion: apps/v1
kind: Deployment
metadata: {{name: {name}, namespace: {ns}}}
spec:
  replicas: {replicas}
  selector: {{matchLabels: {{app: {name}}}}}
  template:
    metadata: {{labels: {{app: {name}}}}}
    spec:
      terminationGracePeriodSeconds: 6
      containers:
        - name: web
          image: python:3
          command: [sh, -c, 'mkdir -p /tmp/w-$(hostname) && echo {cluster}/$(hostname) > /tmp/w-$(hostname)/index.html
            && cd /tmp/w-$(hostname) && exec python3 -m http.server --bind 0.0.0.0 8080']
          lifecycle: {{preStop: {{exec: {{command: [sleep, "3"]}}}}}}
          ports: [{{name: http, containerPort: 8080}}]
          readinessProbe: {{httpGet: {{path: /, port: 8080}}, periodSeconds: 1}}
---
apiVersion: v1
kind: Service
metadata: {{name: {name}, namespace: {ns}}}
spec:
  selector: {{app: {name}}}
  ports: [{{name: http, port: 80, targetPort: http}}]
"""

CLIENT = """apiVersion: v1
kind: Pod
metadata: {{name: client, namespace: {ns}}}
spec:
  terminationGracePeriodSeconds: 1
  containers:
    - name: c
      image: python:3
      command: [python3, -c, 'import time; time.sleep(1e9)']
"""


#: Run inside a pod with ``kubectl exec``: GET the URL back to back for N seconds, print the answers.
HTTP_LOOP = """
import json, sys, time, urllib.request
url, until, out = sys.argv[1], time.monotonic() + float(sys.argv[2]), []
while time.monotonic() < until:
    try:
        with urllib.request.urlopen(url, timeout=2) as r:
            out.append(r.read().decode().strip())
    except Exception as e:
        out.append("ERROR " + repr(e))
    time.sleep(0.02)
print(json.dumps(out))
"""


class McsLab(KubeLab):
    def rounds(self, cluster: str, urls: list[str], n: int) -> dict[str, list[str]]:
        return self.http_rounds(cluster, NS, "client", urls, n, timeout=2)

    def services(self) -> list[dict[str, Any]]:
        entries: list[dict[str, Any]] = json.loads(self.tool("services", "--lab", self.name, "-o", "json").stdout)
        return entries

    def imported_ip(self, cluster: str, name: str) -> str | None:
        imp = self.get(cluster, "serviceimports.multicluster.x-k8s.io", name, "-n", NS, check=False)
        ips = ((imp or {}).get("spec") or {}).get("ips") or []
        return str(ips[0]) if ips else None

    def slices(self, cluster: str, name: str) -> dict[str, tuple[int, int]]:
        """Per exporting cluster: (ready, total) endpoints of the import ``name`` in ``cluster``,
        read straight from its API server (fast enough to time a change)."""
        url = next(c["kubernetes"]["url"] for c in self.status()["clusters"] if c["name"] == cluster)
        return _slices(url, name)


def _slices(api_url: str, name: str) -> dict[str, tuple[int, int]]:
    q = f"multicluster.kubernetes.io/service-name={name}"
    with urllib.request.urlopen(f"{api_url}/apis/discovery.k8s.io/v1/namespaces/{NS}/endpointslices"
                                f"?labelSelector={q}", timeout=5) as r:
        items = json.loads(r.read())["items"]
    out: dict[str, tuple[int, int]] = {}
    for s in items:
        src = s["metadata"]["labels"].get("multicluster.kubernetes.io/source-cluster", "?")
        eps = s.get("endpoints") or []
        ready = sum(1 for e in eps if (e.get("conditions") or {}).get("ready") is not False)
        r0, t0 = out.get(src, (0, 0))
        out[src] = (r0 + ready, t0 + len(eps))
    return out


def _namespaces_and_client(lab: McsLab, clusters: tuple[str, ...], client_cluster: str) -> None:
    """The test namespace in each of ``clusters`` and the :data:`CLIENT` pod in ``client_cluster``,
    waited for until it runs (the importer side's requests start from it)."""
    for c in clusters:
        lab.kubectl(c, "create", "namespace", NS)
    lab.apply(client_cluster, CLIENT.format(ns=NS))
    wait_until(lambda: (lab.get(client_cluster, "pod", "client", "-n", NS)["status"].get("phase") == "Running"), 90,
               f"the client pod of {client_cluster} running", interval=0.5)


@pytest.fixture(scope="module")
def mlab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[McsLab]:
    topo = tmp_path_factory.mktemp("mcs") / "lab.yaml"
    topo.write_text(TOPOLOGY)
    t0 = time.monotonic()
    with kube_lab_running(McsLab(new_lab_name(), topo), "--grace-period", "30", "--timeout", "150") as lab:
        print(f"lab up (3 clusters, kosmos-mcs): {time.monotonic() - t0:.1f} s")
        _namespaces_and_client(lab, ("ma", "mb", "mc"), "mb")
        yield lab


def test_the_lab_runs_kosmos_mcs_with_its_crds_and_dns(mlab: McsLab) -> None:
    """``lab up`` started kosmos-mcs (shown by ``lab status``), installed the MCS CRDs in every
    cluster and pointed each cluster DNS's clusterset.local at its responder."""
    st = mlab.status()
    assert st["mcs"]["pid"], st.get("mcs")
    assert set(st["mcs"]["dns"]) == {"ma", "mb", "mc"} and all(st["mcs"]["dns"].values())
    for c in ("ma", "mb", "mc"):
        for crd in ("serviceexports.multicluster.x-k8s.io", "serviceimports.multicluster.x-k8s.io"):
            mlab.get(c, "crd", crd)
    assert "kosmos-mcs:" in mlab.lab("status").stdout


def test_export_import_merge_and_scale_down(mlab: McsLab) -> None:
    """ma's web exported: mb's client reaches ma's backends by the imported ClusterIP and the
    clusterset name; mc exports web too: answers from both, ``fabric-tool services`` counts
    both; a Service nobody exported shows nowhere else; ma scaled to 0 while mb's client sends
    back to back: no request fails, then only mc answers, and ``services`` says so."""
    mlab.apply("ma", WEB.format(name="web", ns=NS, replicas=2, cluster="ma"))
    mlab.apply("mc", WEB.format(name="web", ns=NS, replicas=1, cluster="mc"))
    # A Service nobody exports, next to it.
    mlab.apply("ma", WEB.format(name="hidden", ns=NS, replicas=1, cluster="ma"))
    mlab.tool("export", "web", "-n", NS, "--cluster", "ma", "--lab", mlab.name)

    ip = wait_until(lambda: mlab.imported_ip("mb", "web"), 60, "mb imports mcs/web with a ClusterIP", interval=0.5)
    urls = [f"http://{ip}/", f"http://web.{NS}.{ZONE}/"]

    def answered_by(clusters: set[str], n: int = 8) -> set[str] | None:
        got = mlab.rounds("mb", urls, n)
        names = {a for answers in got.values() for a in answers}
        return names if all(a.split("/")[0] in clusters for a in names) and \
            {a.split("/")[0] for a in names} == clusters else None

    a_names = wait_until(lambda: answered_by({"ma"}), 90,
                         f"mb's client reaches ma's backends at {urls}", interval=1)
    print(f"answers from ma: {sorted(a_names)}")
    # A second exporter: answers from both.
    mlab.tool("export", "web", "-n", NS, "--cluster", "mc", "--lab", mlab.name)
    wait_until(lambda: answered_by({"ma", "mc"}, 12), 90, "mb's client answered by ma and mc", interval=1)
    entry = next(e for e in mlab.services() if (e["namespace"], e["name"]) == (NS, "web"))
    assert {x["cluster"] for x in entry["exports"]} == {"ma", "mc"} and not entry["conflict"], entry
    b_import = next(i for i in entry["imports"] if i["cluster"] == "mb")
    assert b_import["endpoints"]["ma"]["ready"] == 2 and b_import["endpoints"]["mc"]["ready"] == 1, b_import
    # The unexported Service leaks nowhere.
    for c in ("mb", "mc"):
        assert mlab.get(c, "serviceimports.multicluster.x-k8s.io", "hidden", "-n", NS, check=False) is None
        assert mlab.slices(c, "hidden") == {}
    assert all(e["name"] != "hidden" for e in mlab.services())

    # ma's backends removed while mb's client sends back to back: with readiness set, no
    # request fails; then only mc answers.
    loop = subprocess.Popen(mlab.kubectl_argv("mb", "exec", "-n", NS, "client", "--", "python3", "-c", HTTP_LOOP,
                                              urls[0], "10"), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        time.sleep(2)
        mlab.kubectl("ma", "scale", "deployment", "web", "-n", NS, "--replicas=0")
        wait_until(lambda: mlab.slices("mb", "web").get("ma", (0, 0))[0] == 0, 60,
                   "mb holds no ready endpoint of ma", interval=0.2)
        out, err = loop.communicate(timeout=60)
    finally:
        if loop.poll() is None:
            loop.kill()
            loop.wait()
    assert loop.returncode == 0, err
    during = json.loads(out)
    failed = [a for a in during if a.startswith("ERROR")]
    print(f"while ma's backends went: {len(during)} requests, {len(failed)} failed, "
          f"{sum(a.startswith('ma/') for a in during)} by ma, {sum(a.startswith('mc/') for a in during)} by mc")
    assert not failed, failed[:5]
    assert during and during[-1].startswith("mc/"), during[-5:]
    got = mlab.rounds("mb", urls, 10)
    assert all(a.startswith("mc/") for answers in got.values() for a in answers), got
    entry = next(e for e in mlab.services() if (e["namespace"], e["name"]) == (NS, "web"))
    b_import = next(i for i in entry["imports"] if i["cluster"] == "mb")
    assert b_import["endpoints"].get("ma", {"ready": 0})["ready"] == 0 and b_import["endpoints"]["mc"]["ready"] == 1
    mlab.kubectl("ma", "scale", "deployment", "web", "-n", NS, "--replicas=2")
    wait_until(lambda: mlab.slices("mb", "web").get("ma", (0, 0))[0] == 2, 90,
               "ma's endpoints back in mb", interval=0.5)


def _log_times(path: str, needle: str, since: float) -> list[float]:
    """Wall-clock times (``time.time()`` scale) of the lines of log ``path`` that contain ``needle``
    and were logged at or after ``since`` (our components' format: ``%(asctime)s ...``)."""
    out = []
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            if needle not in line:
                continue
            try:
                at = datetime.datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f").timestamp()
            except ValueError:
                continue
            if at >= since - 0.01:
                out.append(at)
    return out


def _timeline(mlab: McsLab, what: str, invoked: float, returned: float, importers: dict[str, float],
              reflector_says: str, mcs_says: str) -> str:
    """Where the time of a cut or heal went, importer by importer, every figure from ``invoked``
    (before ``fabric-tool lab fail|heal`` started): the tool returned (its own start-up is in
    every figure after it), the reflector logged the pair's new reachability, kosmos-mcs logged
    the change of its map (its pass and the slice writes follow), the test saw the slice."""
    st = mlab.status()
    rows = [f"{what}: lab tool returned +{returned - invoked:.2f} s"]
    for imp, seen in sorted(importers.items()):
        refl = _log_times(st["reflector"]["log"], reflector_says.format(imp=imp), invoked)
        mcs = _log_times(st["mcs"]["log"], mcs_says.format(imp=imp), invoked)
        parts = [f"reflector +{refl[0] - invoked:.2f}" if refl else "reflector -",
                 f"kosmos-mcs +{mcs[0] - invoked:.2f}" if mcs else "kosmos-mcs -",
                 f"slice seen +{seen - invoked:.2f}"]
        rows.append(f"  {imp}: {', '.join(parts)}")
    return "\n".join(rows)


def test_a_cluster_cut_off_the_underlay_turns_not_ready_in_every_importer(mlab: McsLab) -> None:
    """Cut ma (its only node) off the underlay: its endpoints turn not ready in mb and mc (the
    time is printed, not asserted, with where it went: :func:`_timeline`), requests from mb
    succeed through mc; heal: back."""
    urls = {c: next(x["kubernetes"]["url"] for x in mlab.status()["clusters"] if x["name"] == c) for c in ("mb", "mc")}
    for c in urls:
        wait_until(lambda c=c: _slices(urls[c], "web").get("ma", (0, 0))[0] == 2, 90,
                   f"ma's two endpoints ready in {c}", interval=0.5)
    t0, w0 = time.monotonic(), time.time()
    mlab.lab("fail", "ma/a1")
    r0 = time.time()
    seen: dict[str, float] = {}
    try:
        pending, took = set(urls), {}
        while pending and time.monotonic() - t0 < 60:
            for c in sorted(pending):
                if _slices(urls[c], "web").get("ma", (1, 0))[0] == 0:
                    took[c] = time.monotonic() - t0
                    seen[c] = time.time()
                    pending.discard(c)
            time.sleep(0.05)
        print(f"cut ma -> its endpoints not ready: {', '.join(f'{c} {s:.2f} s' for c, s in sorted(took.items()))}")
        print(_timeline(mlab, "cut", w0, r0, seen, "cluster {imp} -> ma: unreachable",
                        "fabric: cluster {imp} cannot reach ma"))
        assert not pending, f"ma's endpoints still ready in {sorted(pending)} 60 s after the cut"
        ip = mlab.imported_ip("mb", "web")
        got = mlab.rounds("mb", [f"http://{ip}/"], 10)
        assert all(a.startswith("mc/") for answers in got.values() for a in answers), got
    finally:
        t1, w1 = time.monotonic(), time.time()
        mlab.lab("heal", "ma/a1")
        r1 = time.time()
    pending, seen = set(urls), {}
    while pending and time.monotonic() - t1 < 60:
        for c in sorted(pending):
            if _slices(urls[c], "web").get("ma", (0, 0))[0] == 2:
                took[c] = time.monotonic() - t1
                seen[c] = time.time()
                pending.discard(c)
        time.sleep(0.05)
    print(f"heal ma -> its endpoints ready: {', '.join(f'{c} {s:.2f} s' for c, s in sorted(took.items()))}")
    print(_timeline(mlab, "heal", w1, r1, seen, "cluster {imp} -> ma: reachable", "fabric: cluster {imp} reaches ma"))
    assert not pending, f"ma's endpoints not ready again in {sorted(pending)} 60 s after the heal"


def test_unexport_cleans_up_everywhere(mlab: McsLab) -> None:
    """Both exporters unexport: the ServiceImport, its slices and the derived Service go from
    every cluster, and ``services`` lists web no more."""
    for c in ("ma", "mc"):
        mlab.tool("unexport", "web", "-n", NS, "--cluster", c, "--lab", mlab.name)
    for c in ("ma", "mb", "mc"):
        wait_until(lambda c=c: mlab.get(c, "serviceimports.multicluster.x-k8s.io", "web", "-n", NS,
                                        check=False) is None and mlab.slices(c, "web") == {}, 60,
                   f"the import of web gone from {c}", interval=0.5)
        assert mlab.get(c, "service", "web-clusterset", "-n", NS, check=False) is None
    assert all(e["name"] != "web" for e in mlab.services())


# -- global IPs and an IPv6-only exporter (a second lab) ------------------------------------------
#
# ``ga`` and ``gb`` have identical IPv4 pod CIDRs, each mapped to a global CIDR; ``gb`` runs IPv6
# too; ``g6`` runs IPv6 only. The client runs in ``gb``.

GLOBAL_TOPOLOGY = """underlay: 198.18.0.0/16
underlay6: fd00:198:18::/64
kubernetes: true
clusters:
  - name: ga
    mode: p2p
    podCIDRs: [10.51.0.0/16]
    serviceCIDRs: [10.151.0.0/20]
    globalCIDRs: {"10.51.0.0/16": "172.51.0.0/16"}
    nodes:
      - {name: a1, pods: 1}
  - name: gb
    mode: p2p
    ipFamilies: [IPv4, IPv6]
    podCIDRs: [10.51.0.0/16, fd00:10:52::/48]
    serviceCIDRs: [10.152.0.0/20, fd00:10:152::/112]
    globalCIDRs: {"10.51.0.0/16": "172.52.0.0/16"}
    nodes:
      - {name: b1, pods: 1}
  - name: g6
    mode: p2p
    ipFamilies: [IPv6]
    podCIDRs: [fd00:10:56::/48]
    serviceCIDRs: [fd00:10:156::/112]
    nodes:
      - {name: c1, pods: 1}
"""


@pytest.fixture(scope="module")
def glab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[McsLab]:
    topo = tmp_path_factory.mktemp("mcs-global") / "lab.yaml"
    topo.write_text(GLOBAL_TOPOLOGY)
    with kube_lab_running(McsLab(new_lab_name(), topo), "--grace-period", "30", "--timeout", "150") as lab:
        _namespaces_and_client(lab, ("ga", "gb", "g6"), "gb")
        yield lab


def _addresses(lab: McsLab, cluster: str, name: str) -> list[str]:
    items = lab.get(cluster, "endpointslices", "-n", NS, "-l", f"multicluster.kubernetes.io/service-name={name}")
    return sorted(a for s in items["items"] for e in s.get("endpoints") or [] for a in e["addresses"])


def test_an_exporter_with_global_ips_is_reached_by_its_global_addresses(glab: McsLab) -> None:
    """ga and gb share a pod CIDR: ga's endpoints are published in gb with ga's global IPs, and
    gb's client reaches them through the fabric's translation, by ClusterIP and clusterset name."""
    glab.apply("ga", WEB.format(name="web", ns=NS, replicas=2, cluster="ga"))
    glab.tool("export", "web", "-n", NS, "--cluster", "ga", "--lab", glab.name)
    wait_until(lambda: glab.slices("gb", "web").get("ga", (0, 0))[0] == 2, 90, "ga's two endpoints ready in gb",
               interval=0.5)
    addrs = _addresses(glab, "gb", "web")
    assert addrs and all(a.startswith("172.51.") for a in addrs), f"gb's slice of ga: {addrs} (want global IPs)"
    pod_ips = sorted(p["status"]["podIP"] for p in glab.get("ga", "pods", "-n", NS, "-l", "app=web")["items"])
    assert [a.replace("172.51.", "10.51.", 1) for a in addrs] == pod_ips, (addrs, pod_ips)
    ip = glab.imported_ip("gb", "web")
    urls = [f"http://{ip}/", f"http://web.{NS}.{ZONE}/"]

    def from_ga() -> bool:
        got = glab.rounds("gb", urls, 6)
        return all(a.startswith("ga/") for answers in got.values() for a in answers)

    wait_until(from_ga, 90, f"gb's client answered by ga's backends at {urls} (global IPs)", interval=1)


def test_an_ipv6_only_exporter(glab: McsLab) -> None:
    """g6 runs IPv6 only: gb (dual stack) imports its endpoints with an IPv6 cluster IP and its
    client reaches them by it and by the clusterset name (AAAA); ga (IPv4 only) gets no endpoint
    and its ServiceImport says why."""
    glab.apply("g6", WEB.format(name="web6", ns=NS, replicas=1, cluster="g6").replace("0.0.0.0", "::"))
    glab.tool("export", "web6", "-n", NS, "--cluster", "g6", "--lab", glab.name)
    wait_until(lambda: glab.slices("gb", "web6").get("g6", (0, 0))[0] == 1, 90, "g6's endpoint ready in gb",
               interval=0.5)
    imp = glab.get("gb", "serviceimports.multicluster.x-k8s.io", "web6", "-n", NS)
    v6 = [ip for ip in imp["spec"].get("ips") or [] if ":" in ip]
    assert v6, f"gb's import of web6 has no IPv6 cluster IP: {imp['spec']}"
    urls = [f"http://[{v6[0]}]/", f"http://web6.{NS}.{ZONE}/"]

    def from_g6() -> bool:
        got = glab.rounds("gb", urls, 4)
        return all(a.startswith("g6/") for answers in got.values() for a in answers)

    wait_until(from_g6, 90, f"gb's client answered by g6's backend at {urls} over IPv6", interval=1)

    def why() -> str | None:
        got = glab.get("ga", "serviceimports.multicluster.x-k8s.io", "web6", "-n", NS, check=False)
        conds = {c["type"]: c for c in ((got or {}).get("status") or {}).get("conditions") or []}
        c = conds.get("IPFamilyUnreachable")
        return c["message"] if c and c["status"] == "True" else None

    message = wait_until(why, 60, "ga's import of web6 says IPv6 is left out", interval=0.5)
    assert "IPv6" in message and "g6" in message, message
    assert glab.slices("ga", "web6").get("g6", (0, 0))[1] == 0
