"""The lab service of a ``kubernetes: true`` lab (tools/lab/kube.py) and how ``check --services``
probes it (tools/diagnose): no fixed service IP is planned, the Service and its EndpointSlices
list the static pods per family, the probe request carries the TCP port, and the probe worker
validates it. Labs without Kubernetes keep the fixed service."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.unit.conftest import load_topology
from tools import lab
from tools.diagnose import check, probe
from tools.lab import kube
from tools.lab.state import LAB_SERVICE

pytestmark = pytest.mark.unit

TOPO = """\
kubernetes: true
clusters:
  - name: east
    podCIDRs: [10.10.0.0/16, fd00:10::/48]
    serviceCIDRs: [10.96.0.0/20, fd00:96::/108]
    nodes:
      - {name: e1, pods: 2}
      - {name: e2, pods: 1}
  - name: west
    podCIDRs: [10.20.0.0/16]
    serviceCIDRs: [10.97.0.0/20]
    nodes:
      - {name: w1, pods: 1}
"""


def _plan(tmp_path: Path, text: str = TOPO) -> lab.LabState:
    return lab.plan("kfx", load_topology(tmp_path, text))


def test_kubernetes_labs_plan_no_fixed_service_others_keep_it(tmp_path: Path) -> None:
    st = _plan(tmp_path)
    assert all(c.service_ip is None and c.service_ip6 is None and c.service_backend is None for c in st.clusters)
    plain = _plan(tmp_path, TOPO.replace("kubernetes: true\n", ""))
    east = plain.clusters[0]
    assert (east.service_ip, east.service_backend) == ("10.96.0.10", "10.10.0.2")
    assert east.service_port is None and east.proxy is None


def test_lab_service_objects_list_static_pods_per_family(tmp_path: Path) -> None:
    east = _plan(tmp_path).clusters[0]
    svc, slices = kube.lab_service_objects(east)
    assert svc["spec"]["ipFamilies"] == ["IPv4", "IPv6"] and svc["spec"]["ipFamilyPolicy"] == "RequireDualStack"
    assert "selector" not in svc["spec"], "a selector would hand the slices to the EndpointSlice controller"
    assert svc["spec"]["ports"] == [{"name": "probe", "protocol": "TCP", "port": 80, "targetPort": 80}]
    by_type = {s["addressType"]: s for s in slices}
    assert sorted(ep["addresses"][0] for ep in by_type["IPv4"]["endpoints"]) == sorted(
        p.ip for n in east.nodes for p in n.pods)
    assert sorted(ep["addresses"][0] for ep in by_type["IPv6"]["endpoints"]) == sorted(
        p.ip6 for n in east.nodes for p in n.pods)
    labels = by_type["IPv4"]["metadata"]["labels"]
    assert labels["kubernetes.io/service-name"] == "lab-check"
    assert labels["endpointslice.kubernetes.io/managed-by"] != "endpointslice-controller.k8s.io"
    assert all(ep["conditions"]["ready"] and ep["nodeName"] for ep in by_type["IPv4"]["endpoints"])
    argv = kube.proxy_argv(_with_url(east))
    assert argv[argv.index("--cluster-cidr") + 1] == "10.10.0.0/16,fd00:10::/48"
    assert [argv[i + 1] for i, a in enumerate(argv) if a == "--node"] == ["e1:kfx-east-e1", "e2:kfx-east-e2"]


def _with_url(c: lab.ClusterRecord) -> lab.ClusterRecord:
    c.api_url = "http://127.0.0.1:1"
    return c


def test_check_probes_kubernetes_services_over_tcp(tmp_path: Path) -> None:
    st = _plan(tmp_path)
    east, west = st.clusters
    east.service_ip, east.service_ip6, east.service_port, east.service_name = "10.96.0.2", "fd00:96::2", 80, \
        LAB_SERVICE
    west.service_ip, west.service_port, west.service_name = "10.97.0.2", 80, LAB_SERVICE
    svcs = check.services_of(st)
    assert {(s.label, s.ip, s.port) for s in svcs} == {("east/svc", "10.96.0.2", 80), ("east/svc", "fd00:96::2", 80),
                                                       ("west/svc", "10.97.0.2", 80)}
    jobs = dict((src.label + f"/{src.family}", dsts) for src, dsts in check.jobs(check.pods_of(st), svcs))
    assert [(d.label, d.port) for d in jobs["west/w1/p0/4"] if d.label.endswith("/svc")] == [("east/svc", 80)]
    # Round trip through the saved state: the new fields survive, the proxy record is a record.
    east.proxy = lab.ProcRecord(1, 2, lab.ROOT_NETNS, "/l", ["python", "-m", "kubeemu.proxy"])
    back = lab.LabState.from_json(st.to_json())
    assert back == st and isinstance(back.clusters[0].proxy, lab.ProcRecord)


def test_probe_request_ports() -> None:
    assert probe.parse_ports({}, 2) == [0, 0]
    assert probe.parse_ports({"ports": [0, 80]}, 2) == [0, 80]
    with pytest.raises(ValueError, match="ports"):
        probe.parse_ports({"ports": [80]}, 2)
    with pytest.raises(ValueError, match="ports"):
        probe.parse_ports({"ports": [0, 70000]}, 2)
