"""The lab's ``kosmos-mcs`` (tools/lab/mcs.py): the clusterset.local stub domain each cluster gets
(kept across ``lab up``), the command line (every cluster a member, its DNS port, the topology's
global CIDRs, the lab's reflector and certificate), its supervision, the state file and ``lab
status``, and the MCS CRDs installed in a real kubeemu."""

from __future__ import annotations

import json
import os
import urllib.request
from pathlib import Path

import pytest

from kubeemu.runner import ServerThread
from mcs import main as mcs_main
from tests.unit.conftest import load_topology
from tools import lab, nsutil
from tools.lab import mcs as labmcs
from tools.lab import report, schedulers, supervisor

pytestmark = pytest.mark.unit

TOPO = """\
kubernetes: true
clusters:
  - name: east
    podCIDRs: [10.10.0.0/16]
    serviceCIDRs: [10.96.0.0/20]
    globalCIDRs: {"10.10.0.0/16": "172.20.0.0/16"}
    nodes:
      - {name: e1, pods: 1}
  - name: west
    podCIDRs: [10.10.0.0/16]
    serviceCIDRs: [10.97.0.0/20]
    globalCIDRs: {"10.10.0.0/16": "172.21.0.0/16"}
    nodes:
      - {name: w1, pods: 1}
"""


def _plan(tmp_path: Path, text: str = TOPO) -> lab.LabState:
    return lab.plan("kfx", load_topology(tmp_path, text))


def _running(st: lab.LabState) -> None:
    me = os.getpid()  # a process that runs, standing for the API servers
    for i, c in enumerate(st.clusters):
        c.apiserver = lab.ProcRecord(pid=me, start=nsutil.start_time(me), netns="", log="", argv=[])
        c.api_url = f"http://127.0.0.1:{1000 + i}"


def test_each_cluster_gets_a_clusterset_stub_once(lab_root: Path, tmp_path: Path) -> None:
    st = _plan(tmp_path)
    st.clusters[1].dns_stubs = ["example.org=127.0.0.1:9"]
    labmcs.plan_dns(st)
    ports = [labmcs.dns_port(c) for c in st.clusters]
    assert all(ports) and len(set(ports)) == 2
    assert st.clusters[1].dns_stubs[0] == "example.org=127.0.0.1:9"  # another stub stays
    assert st.clusters[0].dns_stubs == [f"clusterset.local=127.0.0.1:{ports[0]}"]
    labmcs.plan_dns(st)  # again (lab up on a running lab): the same ports, the DNS not restarted
    assert [labmcs.dns_port(c) for c in st.clusters] == ports
    assert len(st.clusters[0].dns_stubs) == 1
    saved = lab.load_state("kfx")
    assert saved is not None and [labmcs.dns_port(c) for c in saved.clusters] == ports


def test_no_mcs_without_kubernetes(tmp_path: Path) -> None:
    st = _plan(tmp_path, TOPO.replace("kubernetes: true\n", ""))
    assert not labmcs.enabled(st)
    labmcs.plan_dns(st)
    assert all(not c.dns_stubs for c in st.clusters)
    assert labmcs.start_mcs(st) is None


def test_the_command_line_names_every_member_its_dns_and_global_cidrs(lab_root: Path, tmp_path: Path) -> None:
    st = _plan(tmp_path)
    _running(st)
    labmcs.plan_dns(st)
    argv = labmcs.mcs_argv(st)
    assert argv[1:3] == ["-m", "mcs.main"]
    east, west = st.clusters
    assert argv[argv.index("--master") + 1] == east.api_url  # no role: host: the first cluster
    assert argv[argv.index("--reflector") + 1] == f"unix:{st.reflector_socket}"

    def values(flag: str) -> list[str]:
        return [argv[i + 1] for i, a in enumerate(argv) if a == flag]

    assert values("--member") == [f"east={east.api_url}", f"west={west.api_url}"]
    assert values("--dns-listen") == [f"{c.name}=127.0.0.1:{labmcs.dns_port(c)}" for c in st.clusters]
    assert values("--global-cidr") == ["east:10.10.0.0/16=172.20.0.0/16", "west:10.10.0.0/16=172.21.0.0/16"]
    args = mcs_main.parser().parse_args(argv[3:])  # kosmos-mcs accepts it
    assert [m.name for m in args.member] == ["east", "west"] and args.leader_elect is False


def test_supervised_while_every_api_server_runs(tmp_path: Path) -> None:
    st = _plan(tmp_path)
    assert "mcs" not in supervisor.supervised(st)
    _running(st)
    st.clusters[1].apiserver = None
    assert "mcs" not in supervisor.supervised(st)  # one API server down: lab up's business
    _running(st)
    st.mcs_proc = lab.ProcRecord(pid=os.getpid(), start=1, netns="", log="", argv=[])
    sup = supervisor.supervised(st)
    assert sup["mcs"][0] is st.mcs_proc and sup["mcs"][1] is labmcs.start_mcs


def test_state_and_status_carry_the_process(tmp_path: Path) -> None:
    st = _plan(tmp_path)
    labmcs_port = 5353
    st.clusters[0].dns_stubs = [f"clusterset.local=127.0.0.1:{labmcs_port}"]
    me = os.getpid()
    st.mcs_proc = lab.ProcRecord(pid=me, start=nsutil.start_time(me), netns="", log="/x/mcs.log", argv=["a"])
    again = lab.LabState.from_json(json.loads(json.dumps(st.to_json())))
    assert again.mcs_proc == st.mcs_proc
    doc = report.status_doc(st, None, "not asked")
    assert doc["mcs"] == {"pid": me, "log": "/x/mcs.log", "dns": {"east": labmcs_port, "west": None}}
    text = report.render_status(doc)
    assert f"kosmos-mcs: {me} (restarts 0); clusterset.local answered for east 127.0.0.1:{labmcs_port}" in text


def test_mcs_crds_installed_and_established(tmp_path: Path) -> None:
    st = _plan(tmp_path)
    east = st.clusters[0]
    with ServerThread(name="east", service_cidrs=tuple(east.service_cidrs)) as emu:
        east.api_url = emu.url
        said: list[str] = []
        names = schedulers.install_crd_docs(east, labmcs.crd_docs(), "MCS", said.append)
        assert sorted(names) == ["serviceexports.multicluster.x-k8s.io", "serviceimports.multicluster.x-k8s.io"]
        assert said and said[0].startswith("cluster east: MCS CRDs installed")
        schedulers.install_crd_docs(east, labmcs.crd_docs(), "MCS")  # again: updated in place
        with urllib.request.urlopen(f"{emu.url}/apis/multicluster.x-k8s.io/v1alpha1/serviceexports", timeout=5) as r:
            assert json.loads(r.read())["items"] == []


def test_an_installed_lab_leaves_global_cidrs_to_the_cluster_objects(lab_root: Path, tmp_path: Path) -> None:
    """After ``fabric-tool install --lab`` the fabric comes from the host's Cluster objects (a
    user may patch their globalCIDRsMap): kosmos-mcs reads them there, no --global-cidr."""
    st = _plan(tmp_path)
    _running(st)
    st.state_dir.mkdir(parents=True, exist_ok=True)
    (st.state_dir / "fabric-install.json").write_text(json.dumps({"host_context": "west"}))
    argv = labmcs.mcs_argv(st)
    assert "--global-cidr" not in argv
    assert argv[argv.index("--master") + 1] == st.clusters[1].api_url
