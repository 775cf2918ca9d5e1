"""The cluster DNS of a ``kubernetes: true`` lab (tools/lab/kube.py): the ``kube-dns`` Service at
kubeadm's address, its EndpointSlice on the DNS node, the responder's command line and its
supervision, and the Service created against a real kubeemu (idempotent, the IP recorded)."""

from __future__ import annotations

import json
import os
import urllib.request
from pathlib import Path

import pytest

from kubeemu.runner import ServerThread
from tests.unit.conftest import load_topology
from tools import lab, nsutil
from tools.lab import kube, supervisor

pytestmark = pytest.mark.unit

TOPO = """\
kubernetes: true
clusters:
  - name: east
    podCIDRs: [10.10.0.0/16, fd00:10::/48]
    serviceCIDRs: [10.96.0.0/20, fd00:96::/108]
    nodes:
      - {name: e1, pods: 1}
      - {name: e2, pods: 1}
  - name: six
    podCIDRs: [fd00:20::/48]
    serviceCIDRs: [fd00:97::/108]
    nodes:
      - {name: s1, pods: 1}
"""


def _plan(tmp_path: Path) -> lab.LabState:
    return lab.plan("kfx", load_topology(tmp_path, TOPO))


def test_dns_objects_and_argv(tmp_path: Path) -> None:
    east, six = _plan(tmp_path).clusters
    assert kube.dns_service_ip(east) == "10.96.0.10"
    assert kube.dns_service_ip(six) == "fd00:97::a"
    tiny = lab.ClusterRecord(name="t", mode="p2p", pod_cidrs=["10.30.0.0/16"], service_cidrs=["10.99.0.0/29"],
                             nodes=east.nodes)
    assert kube.dns_service_ip(tiny) is None  # 8 addresses: no 10th one
    svc, sl = kube.dns_objects(east, "10.96.0.10")
    assert (svc["metadata"]["namespace"], svc["metadata"]["name"]) == ("kube-system", "kube-dns")
    assert svc["spec"]["clusterIP"] == "10.96.0.10" and "selector" not in svc["spec"]
    assert sl["addressType"] == "IPv4" and sl["metadata"]["labels"]["kubernetes.io/service-name"] == "kube-dns"
    node = east.nodes[0]
    assert sl["endpoints"][0]["addresses"] == [node.underlay_ip] and sl["endpoints"][0]["nodeName"] == "e1"
    assert {(p["protocol"], p["port"]) for p in sl["ports"]} == {("UDP", 53), ("TCP", 53)}
    _, sl6 = kube.dns_objects(six, "fd00:97::a")
    assert sl6["addressType"] == "IPv6" and sl6["endpoints"][0]["addresses"] == [six.nodes[0].underlay_ip6]
    east.api_url = "http://127.0.0.1:1"
    east.dns_stubs = ["clusterset.local=127.0.0.1:5353"]
    argv = kube.dns_argv(east)
    assert argv[argv.index("--netns") + 1] == node.netns
    listens = [argv[i + 1] for i, a in enumerate(argv) if a == "--listen"]
    assert listens[0] == f"{node.underlay_ip}:53" and all(x.endswith(":53") for x in listens)
    assert argv[argv.index("--stub-domain") + 1] == "clusterset.local=127.0.0.1:5353"


def test_kube_dns_service_created_once_and_recorded(lab_root: Path, tmp_path: Path) -> None:
    st = _plan(tmp_path)
    east = st.clusters[0]
    lab.save_state(st)
    with ServerThread(name="east", service_cidrs=tuple(east.service_cidrs)) as emu:
        east.api_url = emu.url
        said: list[str] = []
        kube.ensure_dns_service(st, east, said.append)
        kube.ensure_dns_service(st, east, said.append)  # idempotent: nothing new to say
        assert east.dns_ip == "10.96.0.10" and len(said) == 1 and "10.96.0.10" in said[0]
        saved = lab.load_state("kfx")
        assert saved is not None and saved.clusters[0].dns_ip == "10.96.0.10"
        with urllib.request.urlopen(f"{emu.url}/apis/discovery.k8s.io/v1/namespaces/kube-system/endpointslices",
                                    timeout=5) as r:
            slices = json.loads(r.read())["items"]
        assert [s["endpoints"][0]["addresses"] for s in slices] == [[east.nodes[0].underlay_ip]]


def test_supervisor_keeps_the_dns_of_running_clusters(tmp_path: Path) -> None:
    st = _plan(tmp_path)
    assert not any(k.startswith("dns/") for k in supervisor.supervised(st))  # no API server runs
    east = st.clusters[0]
    me = os.getpid()  # a process that runs, standing for east's API server
    east.apiserver = lab.ProcRecord(pid=me, start=nsutil.start_time(me), netns="", log="", argv=[])
    east.api_url = "http://127.0.0.1:1"
    east.dns_proc = lab.ProcRecord(pid=me, start=1, netns="", log="", argv=[])
    sup = supervisor.supervised(st)
    assert [k for k in sup if k.startswith("dns/")] == ["dns/east"]
    assert sup["dns/east"][0] is east.dns_proc
