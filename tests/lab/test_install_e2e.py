"""End to end, through fabric-tool and a real kubectl: issue 9's acceptance in a ``kubernetes: true`` lab.

Topology (own file, own lab name): east and west, p2p, two nodes of one pod each, each with an
emulated API server. Steps, in order (one test: each step builds on the previous one):

1. ``install --lab`` puts the CRD, namespace and RBAC into east's API server (the host) and
   restarts the lab reflector with ``--topology-source kubernetes`` and no topology file: it
   then knows no cluster at all and refuses every agent.
2. ``join`` of each cluster creates its Cluster and waits until its nodes are in sync; east is
   joined without ``--pod-cidr`` (discovery mode: its pod CIDRs are the union of those its
   agents announce), west with one; ``check`` passes, with the reflector's configuration read
   only from the Cluster resources. A node added to east afterwards (``lab add-node``: its pod
   CIDR is outside the union so far) is admitted without another join, its range appears in
   east's configuration and status, and ``check`` passes across clusters.
3. ``kubectl patch`` of east's networkType (gateway: vx-local appears on east's nodes) and of
   west's globalCIDRsMap (east's nodes route west's global CIDR instead of its pod CIDR, and an
   east pod reaches a west pod by its global IP); removing the mapping restores the routes and
   ``check`` passes again.
4. Bad Cluster specs (overlap without mapping, global CIDR size mismatch, unknown network type,
   also as an edit of working west) are reported in status with field path and reason; no
   node's plan changes and ``check`` still passes.
5. ``unjoin west`` removes west from every east node's routes and leaves no fabric device,
   route or rule on west's nodes; ``unjoin east`` and ``uninstall`` bring the lab's own
   reflector back.

Issue 20 (security of the control channel) on the same lab: it runs mutual TLS by default (the
lab reflector serves only TLS and signs node certificates with the lab's CA, agents exchange
their cluster's bootstrap credential for their own certificates: tools/lab/labpki.py), checked
in step 1. Step 5 shows that the real ``unjoin`` revokes: with w1's own certificate and west's
bootstrap credential as join handed it out, both copied before the unjoin (the certificate
still valid after it), (a) a session announcing w1 is refused at connect by the reflector east
hosts (UNKNOWN_CLUSTER: membership is admission's, see fabric/control/authz.py), (b) neither
gets a certificate from IssueCertificate (PERMISSION_DENIED: not a member), where the bootstrap
credential got one before the unjoin, and (c) east's agents stay in sync on the sessions they
had.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from fabric import types
from fabric.control import api, bootstrap, client, identity, tls
from fabric.netlink import objects
from tests.lab import secutil
from tests.lab.conftest import KubeLab, kube_lab_running, needs_kubectl, new_lab_name
from tests.waiting import wait_until
from tools.lab import labpki
from tools.lab.state import LabState, load_state

pytestmark = needs_kubectl

TOPOLOGY = """\
underlay: 198.18.0.0/16
kubernetes: true
clusters:
  - name: east
    mode: p2p
    podCIDRs: [10.10.0.0/16]
    serviceCIDRs: [10.96.0.0/20]
    nodes: [{name: e1, pods: 1}, {name: e2, pods: 1}]
  - name: west
    mode: p2p
    podCIDRs: [10.20.0.0/16]
    serviceCIDRs: [10.97.0.0/20]
    nodes: [{name: w1, pods: 1}, {name: w2, pods: 1}]
"""


#: The cluster whose API server holds the fabric's resources (``install --lab``'s host).
HOST = "east"


class InstallLab(KubeLab):
    def cluster(self, name: str) -> dict[str, Any]:
        out: dict[str, Any] = self.get(HOST, "clusters.kosmos.io", name)
        return out

    def condition(self, name: str, ctype: str) -> dict[str, Any]:
        conds = (self.cluster(name).get("status") or {}).get("conditions") or []
        return next((c for c in conds if c["type"] == ctype), {})

    def reflector(self) -> dict[str, Any]:
        out: dict[str, Any] = json.loads(self.tool("status", "--lab", self.name, "--json").stdout)
        return out

    def node_ns(self, key: str) -> str:
        return str(self.nodes()[key]["netns"])

    def fabric_routes(self, key: str) -> list[str]:
        routes = self.ipj(self.node_ns(key), "route", "show", "table", "all", "proto", str(objects.RTPROT_FABRIC))
        return [r["dst"] for r in routes]

    def state(self) -> LabState:
        st = load_state(self.name)
        assert st is not None, f"lab {self.name} has no state"
        return st

    def planned_versions(self) -> dict[str, int]:
        return {f"{c['name']}/{n['name']}": n["planned_version"]
                for c in self.reflector()["clusters"] for n in c["nodes"]}  # fmt: skip


@pytest.fixture(scope="module")
def ilab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[InstallLab]:
    topo = tmp_path_factory.mktemp("install") / "lab.yaml"
    topo.write_text(TOPOLOGY)
    with kube_lab_running(InstallLab(new_lab_name(), topo), "--grace-period", "5", "--timeout", "90") as lab:
        yield lab


def _in(cidr: str, outer: ipaddress.IPv4Network) -> bool:
    """An IPv4 route destination inside ``outer`` ("default" and IPv6 are not)."""
    try:
        net = ipaddress.ip_network(cidr)
    except ValueError:
        return False
    return isinstance(net, ipaddress.IPv4Network) and net.subnet_of(outer)


def _check_ok(lab: InstallLab) -> None:
    res = lab.check()
    failed = [p for p in res.get("pairs", []) if not p.get("ok")]
    assert res["returncode"] == 0, f"check failed: {failed[:5]}"


def test_install_join_patch_reject_unjoin(ilab: InstallLab, tmp_path: Path) -> None:
    lab = ilab
    # -- 0. secure by default (issue 20) ----------------------------------------------------------
    st = lab.state()
    target = secutil.reflector_target(st)
    assert st.reflector is not None
    assert {"--tls-dir", "--ca-dir"} <= set(st.reflector.argv), st.reflector.argv
    for node in st.nodes():
        assert node.agent is not None, node.key
        assert {"--tls-dir", "--bootstrap-dir"} <= set(node.agent.argv), node.agent.argv
        assert "--insecure" not in node.agent.argv
    with pytest.raises(client.ReflectorUnavailable):  # a plaintext client is refused
        client.get_status_sync(target, 5.0, None)
    # -- 1. install ---------------------------------------------------------------------------
    dry = lab.tool("install", "--lab", lab.name, "--dry-run")
    assert "CustomResourceDefinition clusters.kosmos.io" in dry.stdout and "Deployment" not in dry.stdout
    assert lab.kubectl(HOST, "get", "crd", "clusters.kosmos.io", check=False).returncode != 0, "dry run changed nothing"
    lab.tool("install", "--lab", lab.name, "--context", "east")
    again = lab.tool("install", "--lab", lab.name)  # idempotent: nothing changes, the reflector keeps running
    assert "unchanged" in again.stderr and "already runs with this topology source" in again.stderr
    state = json.loads(Path(f"/run/kosmos-fabric/lab/{lab.name}/state.json").read_text())
    argv = state["reflector"]["argv"]
    assert "--topology-source" in argv and "kubernetes" in argv and "--config" not in argv

    def refusing() -> dict[str, Any] | None:
        s = lab.reflector()
        return s if not s["clusters"] and s.get("rejections") else None

    status = wait_until(refusing, 30, "the reflector to know no cluster and refuse the agents")
    assert any("unknown cluster" in r["reason"] for r in status["rejections"])

    # -- 2. join --------------------------------------------------------------------------------
    dry = lab.tool("join", "east", "--lab", lab.name, "--service-cidr", "10.96.0.0/20", "--dry-run")
    node_cidrs = [ipaddress.IPv4Network(n["spec"]["podCIDR"])
                  for n in lab.get(HOST, "nodes")["items"]]  # fmt: skip
    discovered = [str(n) for n in ipaddress.collapse_addresses(node_cidrs)]
    assert "kind: Cluster" in dry.stdout and "podCIDRs" not in dry.stdout, dry.stdout
    assert "discovery mode" in dry.stderr and all(c in dry.stderr for c in discovered), dry.stderr
    p = lab.tool("join", "east", "--lab", lab.name, "--service-cidr", "10.96.0.0/20", "--timeout", "60")
    assert "discovery mode" in p.stderr and "2/2 nodes in sync" in p.stderr, p.stderr
    assert "podCIDRs" not in lab.cluster("east")["spec"]["clusterLinkOptions"]
    lab.tool("join", "west", "--lab", lab.name, "--pod-cidr", "10.20.0.0/16", "--service-cidr", "10.97.0.0/20",
             "--timeout", "60")
    assert {c["name"] for c in lab.reflector()["clusters"]} == {"east", "west"}

    def east_pods() -> set[str]:
        return set(next(c for c in lab.reflector()["clusters"] if c["name"] == "east")["pod_cidrs"])

    wait_until(lambda: east_pods() == set(discovered), 30, f"east's pod CIDRs to be the union {discovered}")
    assert lab.condition("east", "Ready")["status"] == "True"
    wait_until(lab.all_in_sync, 30, "every node in sync")
    _check_ok(lab)
    again = lab.tool("join", "west", "--lab", lab.name, "--pod-cidr", "10.20.0.0/16", "--service-cidr",
                     "10.97.0.0/20")
    assert "Cluster west unchanged" in again.stderr
    again = lab.tool("join", "east", "--lab", lab.name, "--service-cidr", "10.96.0.0/20")
    assert "Cluster east unchanged" in again.stderr

    # A node added to east after its join: its pod CIDR is outside the union so far.
    lab.lab("add-node", "east", "e3", "--pods", "1", "--timeout", "90")
    e3_cidr = lab.nodes()["east/e3"]["pod_cidr"]
    assert not any(ipaddress.IPv4Network(e3_cidr).subnet_of(ipaddress.IPv4Network(c)) for c in discovered), e3_cidr
    union = {str(n) for n in ipaddress.collapse_addresses([*node_cidrs, ipaddress.IPv4Network(e3_cidr)])}
    wait_until(lambda: east_pods() == union, 30, f"east's pod CIDRs to take in e3's {e3_cidr}")
    wait_until(
        lambda: set(lab.cluster("east")["status"]["clusterLinkStatus"]["podCIDRs"]) == union,
        30,
        "east's status to show the new union",
    )
    assert not [r for r in lab.reflector().get("rejections") or [] if "east/e3" in r["source"]]
    wait_until(lab.all_in_sync, 30, "every node in sync with e3")
    _check_ok(lab)

    # -- 3. kubectl patch takes effect -------------------------------------------------------------
    lab.kubectl(HOST, "patch", "clusters.kosmos.io", "east", "--type", "merge",
                "-p", '{"spec":{"clusterLinkOptions":{"networkType":"gateway"}}}')
    wait_until(
        lambda: {c["name"]: c["mode"] for c in lab.reflector()["clusters"]}.get("east") == "gateway",
        30,
        "east in gateway mode",
    )
    wait_until(
        lambda: any(ln["ifname"].startswith("vx-local") for ln in lab.ipj(lab.node_ns("east/e1"), "link")),
        30,
        "vx-local on east/e1",
    )
    wait_until(lab.all_in_sync, 30, "in sync after the mode change")
    _check_ok(lab)

    lab.kubectl(HOST, "patch", "clusters.kosmos.io", "west", "--type", "merge",
                "-p", '{"spec":{"clusterLinkOptions":{"globalCIDRsMap":{"10.20.0.0/16":"172.21.0.0/16"}}}}')
    glob = ipaddress.IPv4Network("172.21.0.0/16")
    real = ipaddress.IPv4Network("10.20.0.0/16")

    def routes_global() -> bool:
        dsts = lab.fabric_routes("east/e2")
        return any(_in(d, glob) for d in dsts) and not any(_in(d, real) for d in dsts)

    wait_until(routes_global, 60, "east/e2 to route west by its global CIDR only")
    wait_until(lab.all_in_sync, 60, "in sync after the mapping")
    pods = lab.pods()
    src = next(p for k, p in pods.items() if k.startswith("east/e1/"))
    dst = next(p for k, p in pods.items() if k.startswith("west/w1/"))
    dst_global = str(glob.network_address + (int(ipaddress.ip_address(dst["ip"])) - int(real.network_address)))
    wait_until(
        lambda: lab.nsrun(src["netns"], "ping", "-c1", "-W1", dst_global, check=False).returncode == 0,
        30,
        f"east pod to reach west pod {dst['ip']} by its global IP {dst_global}",
    )
    lab.kubectl(HOST, "patch", "clusters.kosmos.io", "west", "--type", "json",
                "-p", '[{"op":"remove","path":"/spec/clusterLinkOptions/globalCIDRsMap"}]')
    wait_until(lambda: any(_in(d, real) for d in lab.fabric_routes("east/e2")), 30, "real routes back")
    wait_until(lab.all_in_sync, 60, "in sync after removing the mapping")
    _check_ok(lab)

    # -- 4. bad specs are reported and disturb nothing ----------------------------------------------
    before = lab.planned_versions()
    bad = [
        ("bad-overlap", {"podCIDRs": ["10.10.0.0/16"]}, "spec.clusterLinkOptions.podCIDRs[0]", "Conflict"),
        ("bad-size", {"podCIDRs": ["10.30.0.0/16"], "globalCIDRsMap": {"10.30.0.0/16": "172.30.0.0/24"}},
         "spec.clusterLinkOptions.globalCIDRsMap[10.30.0.0/16]", "InvalidSpec"),
    ]
    docs = [{"apiVersion": "kosmos.io/v1alpha1", "kind": "Cluster", "metadata": {"name": n},
             "spec": {"clusterLinkOptions": spec}} for n, spec, _f, _r in bad]  # fmt: skip
    manifest = Path(f"/run/kosmos-fabric/lab/{lab.name}/bad-clusters.json")
    manifest.write_text(json.dumps({"apiVersion": "v1", "kind": "List", "items": docs}))
    lab.kubectl(HOST, "apply", "-f", str(manifest))
    # What the CRD's schema refuses, the API server refuses (as a real one does), naming the field.
    bad_type = {"apiVersion": "kosmos.io/v1alpha1", "kind": "Cluster", "metadata": {"name": "bad-type"},
                "spec": {"clusterLinkOptions": {"podCIDRs": ["10.40.0.0/16"], "networkType": "vxlan"}}}
    bad_type_file = manifest.with_name("bad-type.json")
    bad_type_file.write_text(json.dumps(bad_type))
    refused = lab.kubectl(HOST, "apply", "-f", str(bad_type_file), check=False)
    assert refused.returncode != 0 and "spec.clusterLinkOptions.networkType: Unsupported value" in refused.stderr
    refused = lab.kubectl(HOST, "patch", "clusters.kosmos.io", "west", "--type", "merge",
                          "-p", '{"spec":{"clusterLinkOptions":{"networkType":"vxlan"}}}', check=False)
    assert refused.returncode != 0 and "spec.clusterLinkOptions.networkType" in refused.stderr
    # What only the fabric's own checks catch is stored, then refused by the fabric: an edit of a
    # working cluster is not applied, the cluster keeps its last good spec and says why.
    lab.kubectl(HOST, "patch", "clusters.kosmos.io", "west", "--type", "merge",
                "-p", '{"spec":{"clusterLinkOptions":{"defaultNICName":"eth/0"}}}')
    for name, _spec, field, reason in bad:
        acc = wait_until(lambda n=name: lab.condition(n, "Accepted"), 30, f"status of {name}")  # type: ignore[misc]
        assert (acc["status"], acc["reason"]) == ("False", reason), acc
        conflicts = lab.cluster(name)["status"]["clusterLinkStatus"]["conflicts"]
        assert field in [c["field"] for c in conflicts], conflicts
    wait_until(
        lambda: lab.condition("west", "Accepted").get("status") == "False",
        30,
        "west's bad edit to be reported",
    )
    acc = lab.condition("west", "Accepted")
    assert acc["reason"] == "InvalidSpecKeptPrevious" and "spec.clusterLinkOptions.defaultNICName" in acc["message"]
    assert {c["name"] for c in lab.reflector()["clusters"]} == {"east", "west"}
    assert lab.planned_versions() == before, "a rejected Cluster changed somebody's plan"
    _check_ok(lab)
    lab.kubectl(HOST, "delete", "-f", str(manifest))
    lab.kubectl(HOST, "patch", "clusters.kosmos.io", "west", "--type", "merge",
                "-p", '{"spec":{"clusterLinkOptions":{"defaultNICName":null}}}')
    wait_until(lambda: lab.condition("west", "Accepted").get("status") == "True", 30, "west accepted again")

    # -- 5. unjoin ------------------------------------------------------------------------------
    # Before: w1's own certificate material and west's bootstrap credential as join handed it
    # out (copies: unjoin removes the credential and stops west's agents).
    st = lab.state()
    w1_id = identity.node("west", "w1")
    own = tls.TLSDir(tmp_path / "w1")
    boot = tls.TLSDir(tmp_path / "bootstrap-west")
    shutil.copytree(labpki.node_dir(st, "west", "w1"), own.path)
    shutil.copytree(labpki.bootstrap_path(st, "west"), boot.path)
    assert bootstrap.problem(own, w1_id) is None, "w1's certificate is valid"
    # The control: the bootstrap credential gets a certificate while west is a member.
    asyncio.run(bootstrap.obtain(target, boot, tmp_path / "w1-before", w1_id))
    w1 = st.node("west/w1")
    assert w1 is not None
    w1_ann = types.NodeAnnouncement("west", "w1", w1.underlay_ip, tuple(w1.pod_cidrs))
    east_logs = {n.key: n.agent.log for n in st.nodes() if n.cluster == "east" and n.agent is not None}
    assert set(east_logs) == {"east/e1", "east/e2", "east/e3"}
    east_sessions = {key: secutil.sessions_established(log) for key, log in east_logs.items()}

    lab.tool("unjoin", "west", "--lab", lab.name, "--timeout", "60")
    assert not labpki.bootstrap_path(st, "west").exists(), "unjoin removes west's bootstrap credential"
    # (a) w1's certificate, still valid, is refused at connect: west is no member any more.
    assert bootstrap.problem(own, w1_id) is None
    rejections = secutil.announce_once(target, own, w1_ann)
    assert rejections and api.RejectionReason.UNKNOWN_CLUSTER in rejections[0].classes, rejections
    assert "unknown cluster 'west'" in rejections[0].text, rejections
    # (b) neither w1's certificate (a renewal) nor west's bootstrap credential gets a certificate.
    for via in (own, boot):
        with pytest.raises(client.CertificateRefused) as exc:
            asyncio.run(bootstrap.obtain(target, via, tmp_path / "w1-after", w1_id))
        assert exc.value.code == grpc.StatusCode.PERMISSION_DENIED, exc.value
        assert "cluster 'west' is not a member" in exc.value.details, exc.value
    assert not (tmp_path / "w1-after").exists()
    # (c) east's agents stay in sync, on the sessions they had before the unjoin.
    east = {k: n for k, n in lab.nodes().items() if k.startswith("east/")}
    assert all(n["connected"] and n["in_sync"] for n in east.values()), east
    assert {key: secutil.sessions_established(log) for key, log in east_logs.items()} == east_sessions
    assert {c["name"] for c in lab.reflector()["clusters"]} == {"east"}
    assert lab.kubectl(HOST, "get", "clusters.kosmos.io", "west", check=False).returncode != 0
    for key in ("east/e1", "east/e2"):
        dsts = lab.fabric_routes(key)
        assert not any(_in(d, real) or _in(d, glob) for d in dsts), (key, dsts)
    for key in ("west/w1", "west/w2"):
        ns = lab.node_ns(key)
        links = [ln["ifname"] for ln in lab.ipj(ns, "link")]
        assert not [n for n in links if n.startswith("vx-")], (key, links)
        assert lab.fabric_routes(key) == [], key
        rules = lab.ipj(ns, "-d", "rule")
        assert not [r for r in rules if str(r.get("protocol")) == str(objects.RTPROT_FABRIC)], rules
    lab.tool("unjoin", "west", "--lab", lab.name, "--timeout", "30")  # idempotent

    lab.tool("unjoin", "east", "--lab", lab.name, "--timeout", "60")
    lab.tool("uninstall", "--lab", lab.name)
    state = json.loads(Path(f"/run/kosmos-fabric/lab/{lab.name}/state.json").read_text())
    assert "--config" in state["reflector"]["argv"]
    assert lab.kubectl(HOST, "get", "crd", "clusters.kosmos.io", check=False).returncode != 0
    assert os.path.exists(f"/run/kosmos-fabric/lab/{lab.name}")
