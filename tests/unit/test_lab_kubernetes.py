"""The lab's ``kubernetes: true`` wiring without root: topology key, state, naming, status, and
the API server + lab kubelet processes started and stopped the way ``lab up``/``down`` do.

Nothing here creates a namespace: the kubelet registers Nodes (HTTP only) and no Pod is bound,
so it never calls the lab's pod plumbing; that part runs in tests/lab/test_kubernetes_e2e.py.
"""

from __future__ import annotations

import json
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import yaml

from fabric import topology
from tests.unit.conftest import load_topology
from tests.waiting import wait_until
from tools import cli, lab, nsutil
from tools.lab import kubelet as kubelet_lab

TOPO = """\
kubernetes: true
clusters:
  - name: east
    podCIDRs: [10.10.0.0/16]
    serviceCIDRs: [10.96.0.0/20]
    nodes:
      - {name: e1, pods: 2}
  - name: west
    podCIDRs: [10.20.0.0/16]
    nodes:
      - {name: w1, pods: 1}
"""


def test_kubernetes_key_defaults_false_and_must_be_a_bool(tmp_path: Path) -> None:
    assert load_topology(tmp_path, TOPO).kubernetes is True
    assert load_topology(tmp_path, TOPO.replace("kubernetes: true\n", "")).kubernetes is False
    with pytest.raises(topology.TopologyError) as e:
        load_topology(tmp_path, TOPO.replace("kubernetes: true", "kubernetes: 'yes'"))
    assert "kubernetes: 'yes' must be true or false" in str(e.value)


def test_example_topology_runs_kubernetes() -> None:
    topo = topology.load(Path(__file__).resolve().parents[2] / "examples" / "lab-k8s.yaml")
    assert topo.kubernetes and [c.name for c in topo.clusters] == ["east", "west"]


def test_plan_state_round_trip_and_merge(lab_root: Path, tmp_path: Path) -> None:
    st = lab.plan("kfx", load_topology(tmp_path, TOPO))
    assert st.kubernetes
    east = st.clusters[0]
    east.api_url = "http://127.0.0.1:1234"
    east.apiserver = lab.ProcRecord(11, 22, lab.ROOT_NETNS, "/l/a", ["python", "-m", "kubeemu"])
    east.kubelet = lab.ProcRecord(12, 23, lab.ROOT_NETNS, "/l/k", ["python", "-m", "tools.lab.kubelet"])
    lab.save_state(st)
    back = lab.load_state("kfx")
    assert back == st
    assert back is not None and isinstance(back.clusters[0].kubelet, lab.ProcRecord)
    # Turning Kubernetes on for a running lab is an addition; turning it off is refused.
    off = lab.plan("kfx", load_topology(tmp_path, TOPO.replace("kubernetes: true", "kubernetes: false")))
    merged, _, _ = lab.merge_plan(off, st)
    assert merged.kubernetes
    with pytest.raises(lab.LabUsageError, match="kubernetes true -> false"):
        lab.merge_plan(st, off)


def test_kubelet_pod_names_are_stable_short_and_apart_from_static_pods(tmp_path: Path) -> None:
    st = lab.plan("kfx", load_topology(tmp_path, TOPO))
    node = st.clusters[0].nodes[0]
    a = lab.kube_pod(node, "default/web", ("10.10.0.4",))
    assert a == lab.kube_pod(node, "default/web", ("10.10.0.4",))
    b = lab.kube_pod(node, "other/web", ("10.10.0.5",))
    assert a.netns != b.netns and a.host_if != b.host_if
    assert a.netns.startswith(node.netns + "-k") and len(a.host_if) <= 15
    assert a.netns not in st.namespaces() and a.host_if not in {p.host_if for p in node.pods}
    suffix = lab.plumbing._KUBE_POD_SUFFIX
    assert suffix.search(a.netns) and not suffix.search(node.pods[0].netns)


def test_kubelet_reserves_static_pod_ips_and_maps_calls_to_lab_pods(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    st = lab.plan("kfx", load_topology(tmp_path, TOPO))
    east = st.clusters[0]
    (e1,) = kubelet_lab.lab_nodes(east)
    assert e1.internal_ip == "198.18.0.11" and e1.pod_cidrs == ("10.10.0.0/24",)
    assert e1.reserved == {"10.10.0.2", "10.10.0.3"}  # p0, p1
    assert e1.allocate() == ("10.10.0.4",)
    calls: list[tuple[str, str, lab.PodRecord]] = []

    def add(n: lab.NodeRecord, p: lab.PodRecord) -> None:
        calls.append(("add", n.key, p))

    def remove(n: lab.NodeRecord, p: lab.PodRecord) -> bool:
        calls.append(("remove", n.key, p))
        return True

    monkeypatch.setattr(lab, "add_pod", add)
    monkeypatch.setattr(lab, "remove_pod", remove)
    net = kubelet_lab.LabPodNetwork(east)
    net.create("e1", "default/web", ("10.10.0.4",))
    net.delete("e1", "default/web", ("10.10.0.4",))
    want = lab.kube_pod(east.nodes[0], "default/web", ("10.10.0.4",))
    assert calls == [("add", "east/e1", want), ("remove", "east/e1", want)]
    with pytest.raises(lab.LabError, match="not a node of this kubelet"):
        net.create("w1", "default/x", ("10.20.0.9",))
    # Several pods at once: one add_pods call for the node; per pod, its namespace or its error
    # (bad addresses fail that pod before the call, a failed pod of the call fails alone).
    batches: list[list[lab.PodRecord]] = []

    def add_many(n: lab.NodeRecord, pods: list[lab.PodRecord]) -> dict[str, lab.LabError]:
        batches.append(list(pods))
        return {"default/b": lab.LabError("injected")}

    monkeypatch.setattr(lab, "add_pods", add_many)
    got = net.create_many("e1", [("default/a", ("10.10.0.4",)), ("default/b", ("10.10.0.5",)),
                                 ("default/c", ("10.10.0.6", "10.10.0.7"))])
    a, b = (lab.kube_pod(east.nodes[0], k, (ip,)) for k, ip in (("default/a", "10.10.0.4"), ("default/b", "10.10.0.5")))
    assert batches == [[a, b]]
    assert got[0] == a.netns and isinstance(got[1], lab.LabError) and str(got[1]) == "injected"
    assert isinstance(got[2], lab.LabError) and "two IPv4 addresses" in str(got[2])


DUAL = """\
kubernetes: true
underlay6: fd00:198:18::/64
clusters:
  - name: ds
    ipFamilies: [IPv6, IPv4]
    podCIDRs: [fd00:10:40::/48, 10.40.0.0/16]
    nodes:
      - {name: b1, pods: 1}
  - name: six
    ipFamilies: [IPv6]
    podCIDRs: [fd00:10:50::/48]
    nodes:
      - {name: c1, pods: 1}
"""


def test_dual_stack_kubelet_nodes_are_primary_first_and_pods_get_both_families(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    st = lab.plan("kfx", load_topology(tmp_path, DUAL))
    ds, six = st.clusters
    rec = ds.nodes[0]
    (b1,) = kubelet_lab.lab_nodes(ds)
    # The cluster's primary family first: podCIDRs and InternalIPs (upstream node IPAM / --node-ip).
    assert b1.pod_cidrs == (rec.pod_cidr6, rec.pod_cidr) and ":" in b1.pod_cidrs[0]
    assert b1.host_ips == (rec.underlay_ip6, rec.underlay_ip)
    assert b1.reserved == {rec.pods[0].ip, rec.pods[0].ip6}
    ips = b1.allocate()
    assert [":" in ip for ip in ips] == [True, False] and not set(ips) & b1.reserved
    # IPv6 only: an IPv6 pod CIDR alone; the node's IPv4 (management) underlay comes second.
    (c1,) = kubelet_lab.lab_nodes(six)
    assert c1.pod_cidrs == (six.nodes[0].pod_cidr6,) and c1.host_ips[0] == six.nodes[0].underlay_ip6
    assert len(c1.allocate()) == 1
    calls: list[lab.PodRecord] = []
    monkeypatch.setattr(lab, "add_pod", lambda n, p: calls.append(p))
    lab_net = kubelet_lab.LabPodNetwork(ds)
    lab_net.create("b1", "default/web", ips)
    (made,) = calls
    assert (made.ip6, made.ip) == ips and made.ips() == (ips[1], ips[0])
    with pytest.raises(lab.LabError, match=r"two IPv4 addresses 10\.40\.0\.9 and 10\.40\.0\.10"):
        lab.kube_pod(rec, "default/x", ("10.40.0.9", "10.40.0.10"))


def test_status_shows_servers_and_kubeconfig(tmp_path: Path) -> None:
    st = lab.plan("kfx", load_topology(tmp_path, TOPO))
    st.clusters[0].api_url = "http://127.0.0.1:1234"
    doc = lab.status_doc(st, None, "down")
    assert doc["kubeconfig"] == str(st.kubeconfig)
    assert doc["clusters"][0]["kubernetes"]["url"] == "http://127.0.0.1:1234"
    assert doc["clusters"][0]["kubernetes"]["apiserver_pid"] is None
    text = lab.render_status(doc)
    assert ("kubernetes of east: http://127.0.0.1:1234 (apiserver stopped, kubelet stopped, "
            "controller-manager stopped)") in text
    plain = lab.plan("kfx", load_topology(tmp_path, TOPO.replace("kubernetes: true\n", "")))
    assert lab.status_doc(plain, None, "down")["kubeconfig"] is None


def test_kubeconfig_command(lab_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["lab", "kubeconfig", "--name", "kfx"]) == 1
    assert "not up" in capsys.readouterr().err
    st = lab.plan("kfx", load_topology(tmp_path, TOPO.replace("kubernetes: true\n", "")))
    lab.save_state(st)
    assert cli.main(["lab", "kubeconfig", "--name", "kfx"]) == 1
    assert "kubernetes: true" in capsys.readouterr().err


def _get(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=5) as r:
        return json.loads(r.read())


def test_servers_and_kubelets_start_record_and_stop(lab_root: Path, tmp_path: Path) -> None:
    """What ``up`` and ``down`` do for Kubernetes, minus namespaces: real processes on 127.0.0.1.
    No scheduler (``scheduler: none``): pods must stay unbound, the kubelet makes no namespace."""
    st = lab.plan("kfx", load_topology(tmp_path, TOPO.replace("    nodes:\n", "    scheduler: none\n    nodes:\n")))
    lab.save_state(st)
    recs: list[lab.ProcRecord] = []
    try:
        lab.start_kubernetes(st, [])
        recs = [r for c in st.clusters for r in (c.apiserver, c.kubelet, c.controller_manager) if r is not None]
        assert len(recs) == 6 and all(r.running() for r in recs)
        saved = lab.load_state("kfx")
        assert saved is not None and [c.api_url for c in saved.clusters] == [c.api_url for c in st.clusters]
        lab.wait_kube_nodes(st, 20.0)
        kc = yaml.safe_load(st.kubeconfig.read_text())
        assert [c["name"] for c in kc["contexts"]] == ["east", "west"]
        assert kc["clusters"][1]["cluster"]["server"] == st.clusters[1].api_url
        assert (st.kubeconfig.stat().st_mode & 0o777) == 0o600
        node = _get(f"{st.clusters[0].api_url}/api/v1/nodes/e1")
        assert node["spec"]["podCIDR"] == "10.10.0.0/24"
        assert {"type": "InternalIP", "address": "198.18.0.11"} in node["status"]["addresses"]
        # The controller-manager runs the workload controllers: a Deployment gets its ReplicaSet
        # and pods (Pending: no scheduler binds them, so the kubelet makes no namespace).
        api = st.clusters[0].api_url
        dep = {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "web"},
               "spec": {"replicas": 2, "selector": {"matchLabels": {"app": "web"}},
                        "template": {"metadata": {"labels": {"app": "web"}},
                                     "spec": {"containers": [{"name": "c", "image": "x"}]}}}}
        req = urllib.request.Request(f"{api}/apis/apps/v1/namespaces/default/deployments", method="POST",
                                     data=json.dumps(dep).encode(), headers={"Content-Type": "application/json"})
        urllib.request.urlopen(req, timeout=5).close()
        pods = wait_until(lambda: [p for p in _get(f"{api}/api/v1/namespaces/default/pods")["items"]
                                   if p["metadata"]["name"].startswith("web-")] or None, 20, "the deployment's pods")
        wait_until(lambda: len(_get(f"{api}/api/v1/namespaces/default/pods")["items"]) == 2, 20, "two pods")
        uids = {p["metadata"]["uid"] for p in _get(f"{api}/api/v1/namespaces/default/pods")["items"]}
        assert len(pods) >= 1
        # A dead controller-manager is started again by the next pass; it duplicates nothing.
        cm = st.clusters[0].controller_manager
        assert cm is not None
        nsutil.terminate([(cm.pid, cm.start)])
        assert not cm.running()
        lab.start_kubernetes(st, [])
        cm2 = st.clusters[0].controller_manager
        assert cm2 is not None and cm2.running() and cm2.pid != cm.pid
        saved = lab.load_state("kfx")
        assert saved is not None and saved.clusters[0].controller_manager == cm2
        wait_until(lambda: "caches synced" in Path(cm2.log).read_text(), 20, "the new controller-manager synced")
        rs = _get(f"{api}/apis/apps/v1/namespaces/default/replicasets")["items"]
        assert len(rs) == 1 and {p["metadata"]["uid"] for p in _get(
            f"{api}/api/v1/namespaces/default/pods")["items"]} == uids
        # A second pass starts nothing new: everything recorded still runs.
        before = [(c.apiserver, c.kubelet, c.controller_manager) for c in st.clusters]
        lab.start_kubernetes(st, [])
        assert [(c.apiserver, c.kubelet, c.controller_manager) for c in st.clusters] == before
        # Nodes added to east: only east's kubelet is restarted.
        old_east, old_west = st.clusters[0].kubelet, st.clusters[1].kubelet
        lab.start_kubernetes(st, ["east/e9"])
        assert st.clusters[0].kubelet != old_east and st.clusters[1].kubelet == old_west
        assert old_east is not None and not old_east.running()
        recs = [r for c in st.clusters for r in (c.apiserver, c.kubelet, c.controller_manager) if r is not None]
        # The lab kube-proxy of each cluster (restarted with east's new node), and east's lab
        # Service: a real Service whose ClusterIP the state records (west has no service CIDR).
        proxies = [c.proxy for c in st.clusters]
        assert all(r is not None and r.running() for r in proxies)
        assert st.clusters[0].proxy is not None and "e9:kfx-east-e9" not in st.clusters[0].proxy.argv
        east = st.clusters[0]
        svc = _get(f"{east.api_url}/api/v1/namespaces/default/services/lab-check")
        assert (east.service_ip, east.service_port, east.service_backend) == (svc["spec"]["clusterIP"], 80, None)
        sl = _get(f"{east.api_url}/apis/discovery.k8s.io/v1/namespaces/default/endpointslices/lab-check-ipv4")
        assert sorted(ep["addresses"][0] for ep in sl["endpoints"]) == sorted(p.ip for p in east.nodes[0].pods)
        assert st.clusters[1].service_ip is None
        # The cluster DNS: kube-system/kube-dns at the 10th address of the service CIDR (kubeadm),
        # given to the kubelet as --cluster-dns; west has no service CIDR, so no cluster DNS.
        dns_svc = _get(f"{east.api_url}/api/v1/namespaces/kube-system/services/kube-dns")
        assert east.dns_ip == dns_svc["spec"]["clusterIP"] == "10.96.0.10"
        assert [(p["name"], p["protocol"], p["port"]) for p in dns_svc["spec"]["ports"]] == [
            ("dns", "UDP", 53), ("dns-tcp", "TCP", 53)]
        assert east.kubelet is not None and east.kubelet.argv[east.kubelet.argv.index("--cluster-dns") + 1] == \
            "10.96.0.10"
        assert east.dns_proc is not None and east.dns_proc.argv == lab.kube.dns_argv(east)
        assert st.clusters[1].dns_ip is None and st.clusters[1].dns_proc is None
        recs.append(east.dns_proc)
        assert lab.status_doc(st, None, "up")["clusters"][0]["kubernetes"]["proxy_pid"] == proxies[0].pid  # type: ignore[union-attr]
        recs += [r for r in proxies if r is not None]
    finally:
        lab.commands._down_locked("kfx", lab.load_state("kfx"), lambda _m: None)
    assert not any(r.running() for r in recs)
    assert not lab.state_dir("kfx").exists()


def test_node_resources_reach_the_kubelet_and_create_names_the_netns(
    lab_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    text = TOPO.replace("{name: e1, pods: 2}", "{name: e1, pods: 2, resources: {cpu: '2', example.com/gpu: 1}}")
    st = lab.plan("kfx", load_topology(tmp_path, text))
    lab.save_state(st)
    back = lab.load_state("kfx")
    assert back is not None and back.clusters[0].nodes[0].resources == {"cpu": "2", "example.com/gpu": "1"}
    (e1,) = kubelet_lab.lab_nodes(back.clusters[0])
    assert e1.capacity == {"cpu": 2000, "memory": 8 * 2**30, "pods": 110, "ephemeral-storage": 50 * 2**30,
                           "example.com/gpu": 1}
    assert kubelet_lab.lab_nodes(back.clusters[1])[0].resources == {}
    monkeypatch.setattr(lab, "add_pod", lambda n, p: None)
    net = kubelet_lab.LabPodNetwork(back.clusters[0])
    assert net.create("e1", "default/web", ("10.10.0.4",)) == lab.kube_pod(back.clusters[0].nodes[0], "default/web",
                                                                            ("10.10.0.4",)).netns
    assert kubelet_lab.kubelet_root(back.state_dir, "east") == back.state_dir / "kubelet-east"
