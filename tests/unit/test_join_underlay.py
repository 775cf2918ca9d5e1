"""fabric-tool join carries the Cluster's underlay settings into the member's agent ConfigMap."""

from __future__ import annotations

import base64
import datetime
import json
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from fabric import crd
from fabric.control import identity, pki
from tools import install

OPTS = install.JoinOptions(pod_cidrs=("10.10.0.0/16",), service_cidrs=("10.96.0.0/20",))


def _member(objs: list[dict[str, Any]]) -> tuple[dict[str, str], str]:
    cm = next(o for o in objs if o["kind"] == "ConfigMap" and o["metadata"]["name"] == "kosmos-fabric-agent")
    ds = next(o for o in objs if o["kind"] == "DaemonSet")
    return cm["data"], ds["spec"]["template"]["metadata"]["annotations"][install.CONFIG_DIGEST_ANNOTATION]


def test_cluster_options_render_into_the_configmap() -> None:
    opts = install.JoinOptions(pod_cidrs=("10.10.0.0/16",), default_nic="eth0", autodetection_method="first-found",
                               nic_overrides=(("e1", "bond0"), ("e2", "eth1"), ("e3", "bond0")))
    obj = install.cluster_object("east", opts, opts.pod_cidrs, ())
    link = obj["spec"]["clusterLinkOptions"]
    assert link["nicNodeNames"] == [{"interfaceName": "bond0", "nodeName": ["e1", "e3"]},
                                    {"interfaceName": "eth1", "nodeName": ["e2"]}]
    underlay = install.agent_underlay_data(crd.parse_cluster(obj))
    data, digest = _member(install.member_objects("east", "r:4880", underlay))
    assert data == {"cluster": "east", "reflector": "r:4880", "autodetectionMethod": "first-found",
                    "defaultNICName": "eth0", "nicNodeNames": "e1=bond0,e2=eth1,e3=bond0"}
    # Defaults of the schema when join gives nothing; another content, another digest.
    plain = install.cluster_object("east", OPTS, OPTS.pod_cidrs, ())
    data2, digest2 = _member(install.member_objects("east", "r:4880",
                                                    install.agent_underlay_data(crd.parse_cluster(plain))))
    assert (data2["autodetectionMethod"], data2["defaultNICName"], data2["nicNodeNames"]) == (
        "kubernetes-internal-ip", "*", "")
    assert digest != digest2


def test_the_configmap_value_is_what_the_agent_parses() -> None:
    from fabric.agent import config

    data, _ = _member(install.member_objects("east", "r:4880", {
        "autodetectionMethod": "can-reach=192.0.2.1", "defaultNICName": "*", "nicNodeNames": "e1=bond0,e2=eth1"}))
    env = {"FABRIC_AUTODETECTION_METHOD": data["autodetectionMethod"], "FABRIC_UNDERLAY_INTERFACE":
           data["defaultNICName"], "FABRIC_NIC_OVERRIDE": data["nicNodeNames"]}  # fmt: skip
    cfg = config.load(["--reflector", "r:4880", "--cluster", "east", "--node", "e1", "--in-cluster"], environ=env)
    assert cfg.autodetection_method == "can-reach=192.0.2.1"
    assert cfg.nic_overrides == (("e1", "bond0"), ("e2", "eth1"))


def test_keep_live_underlay_keeps_patched_fields_unless_given() -> None:
    live = {"spec": {"clusterLinkOptions": {"networkType": "gateway", "autodetectionMethod": "first-found",
                                            "nicNodeNames": [{"interfaceName": "eth1", "nodeName": ["e1"]}]}}}
    obj = install.cluster_object("east", OPTS, OPTS.pod_cidrs, ())
    kept = install.keep_live_underlay(obj, OPTS, live)["spec"]["clusterLinkOptions"]
    assert kept["autodetectionMethod"] == "first-found" and kept["nicNodeNames"][0]["interfaceName"] == "eth1"
    assert "networkType" not in kept and "defaultNICName" not in kept  # join's own fields stay join's
    opts = install.JoinOptions(pod_cidrs=OPTS.pod_cidrs, autodetection_method="can-reach=192.0.2.1", nic_overrides=())
    given = install.keep_live_underlay(install.cluster_object("east", opts, opts.pod_cidrs, ()), opts, live)
    link = given["spec"]["clusterLinkOptions"]
    assert link["autodetectionMethod"] == "can-reach=192.0.2.1" and "nicNodeNames" not in link


@pytest.fixture
def kube(tmp_path: Path) -> Iterator[tuple[install.Target, str]]:
    from kubeemu import lab as kubelab
    from kubeemu.runner import ServerThread

    with ServerThread(name="east", service_cidrs=("10.96.0.0/20",)) as srv:
        path = tmp_path / "kubeconfig"
        kubelab.write_kubeconfig(path, {"east": srv.url})
        target = install.Target(str(path), "east")
        # The emulator has no RBAC API: stand-in CRDs store the manifests' RBAC objects.
        kube = install.Kube(target)
        for kind, plural, scope in (("ClusterRole", "clusterroles", "Cluster"),
                                    ("ClusterRoleBinding", "clusterrolebindings", "Cluster"),
                                    ("Role", "roles", "Namespaced"), ("RoleBinding", "rolebindings", "Namespaced")):
            kube.apply({"apiVersion": "apiextensions.k8s.io/v1", "kind": "CustomResourceDefinition",
                        "metadata": {"name": f"{plural}.rbac.authorization.k8s.io"},
                        "spec": {"group": "rbac.authorization.k8s.io", "scope": scope,
                                 "names": {"kind": kind, "plural": plural, "singular": kind.lower()},
                                 "versions": [{"name": "v1", "served": True, "storage": True, "schema": {
                                     "openAPIV3Schema": {"type": "object",
                                                         "x-kubernetes-preserve-unknown-fields": True}}}]}})
        yield target, srv.url


def _get(url: str, path: str) -> dict[str, Any]:
    with urllib.request.urlopen(f"{url}{path}") as r:
        out: dict[str, Any] = json.loads(r.read())
        return out


def test_join_writes_and_a_rerun_updates_the_member(kube: tuple[install.Target, str]) -> None:
    target, url = kube
    quiet: list[str] = []
    host = install.Kube(target)
    for obj in install.host_objects(for_lab=True):  # only what join needs: the Namespace and the CRD
        if obj["kind"] in ("Namespace", "CustomResourceDefinition"):
            host.apply(obj)
    ca = install.ensure_certificates(host, target, quiet.append)  # install's CA and server certificate
    ca_path = f"/api/v1/namespaces/kosmos-system/secrets/{install.CA_SECRET}"
    ca_secret = _get(url, ca_path)["data"]
    mcs_path = f"/api/v1/namespaces/kosmos-system/secrets/{install.MCS_TLS_SECRET}"
    mcs_secret = _get(url, mcs_path)["data"]  # kosmos-mcs's client certificate, mcs/clusterset
    mcs_cert = base64.b64decode(mcs_secret[pki.CERT_FILE])
    assert pki.certificate_identity(pki.load_cert(mcs_cert)) == install.MCS_IDENTITY
    assert pki.explain(mcs_cert, ca.pem, "client") is None
    # kosmos-tree's: tree/<UID of kube-system> (its --root-id default); kosmos-scheduler's.
    root_uid = _get(url, "/api/v1/namespaces/kube-system")["metadata"]["uid"]
    addons = {install.TREE_TLS_SECRET: identity.role("tree", root_uid),
              install.SCHEDULER_TLS_SECRET: install.SCHEDULER_IDENTITY}
    addon_data = {}
    for name, who in addons.items():
        data = addon_data[name] = _get(url, f"/api/v1/namespaces/kosmos-system/secrets/{name}")["data"]
        cert = base64.b64decode(data[pki.CERT_FILE])
        assert pki.certificate_identity(pki.load_cert(cert)) == who, name
        assert pki.explain(cert, ca.pem, "client") is None, name
        assert base64.b64decode(data[pki.CA_FILE]) == ca.pem
    kubelet_path = f"/api/v1/namespaces/kosmos-system/secrets/{install.TREE_KUBELET_TLS_SECRET}"
    kubelet = _get(url, kubelet_path)
    assert kubelet["type"] == "kubernetes.io/tls"
    assert pki.explain(base64.b64decode(kubelet["data"][pki.CERT_FILE]), ca.pem, "server") is None
    assert install.ensure_certificates(host, target, quiet.append).pem == ca.pem  # never overwritten
    assert _get(url, ca_path)["data"] == ca_secret
    assert _get(url, mcs_path)["data"] == mcs_secret  # still acceptable: kept
    assert all(_get(url, f"/api/v1/namespaces/kosmos-system/secrets/{n}")["data"] == d for n, d in addon_data.items())
    assert _get(url, kubelet_path)["data"] == kubelet["data"]
    # A tree certificate of another root id (a Secret copied from another cluster) is issued again.
    other = install.client_tls_secret(ca, install.TREE_TLS_SECRET, identity.role("tree", "another-root"))
    host.delete(other)
    host.apply(other)
    install.ensure_certificates(host, target, quiet.append)
    assert any(install.TREE_TLS_SECRET in m and "not tree/" in m for m in quiet), quiet[-6:]
    cert = base64.b64decode(_get(url, f"/api/v1/namespaces/kosmos-system/secrets/{install.TREE_TLS_SECRET}")
                            ["data"][pki.CERT_FILE])
    assert pki.certificate_identity(pki.load_cert(cert)) == addons[install.TREE_TLS_SECRET]
    opts = install.JoinOptions(pod_cidrs=OPTS.pod_cidrs, service_cidrs=OPTS.service_cidrs,
                               nic_overrides=(("e1", "eth1"),), bootstrap_ttl_s=600)
    install.join("east", target, target, opts, reflector="r:4880", wait=False, progress=quiet.append)
    # The member's bootstrap credential: bootstrap/east, signed by the CA, 10 minutes.
    boot = _get(url, f"/api/v1/namespaces/kosmos-system/secrets/{install.BOOTSTRAP_SECRET}")["data"]
    cert = pki.load_cert(base64.b64decode(boot[pki.CERT_FILE]))
    assert pki.certificate_identity(cert) == identity.role("bootstrap", "east")
    assert pki.explain(pki.cert_pem(cert), ca.pem, "client") is None
    assert cert.not_valid_after - cert.not_valid_before == datetime.timedelta(seconds=600) + pki.CLOCK_SKEW
    cm_path = "/api/v1/namespaces/kosmos-system/configmaps/kosmos-fabric-agent"
    ds_path = "/apis/apps/v1/namespaces/kosmos-system/daemonsets/kosmos-fabric-agent"
    assert _get(url, cm_path)["data"]["nicNodeNames"] == "e1=eth1"
    digest1 = _get(url, ds_path)["spec"]["template"]["metadata"]["annotations"][install.CONFIG_DIGEST_ANNOTATION]

    # A kubectl patch of the host's Cluster (the emulator's merge patch) ...
    req = urllib.request.Request(f"{url}/apis/kosmos.io/v1alpha1/clusters/east", method="PATCH",
                                 data=json.dumps({"spec": {"clusterLinkOptions": {
                                     "autodetectionMethod": "interface=^bond"}}}).encode(),
                                 headers={"Content-Type": "application/merge-patch+json"})
    urllib.request.urlopen(req).read()
    # ... reaches the member at the next join without the flag, which keeps it.
    again: list[str] = []
    install.join("east", target, target, install.JoinOptions(pod_cidrs=OPTS.pod_cidrs,
                                                             service_cidrs=OPTS.service_cidrs),
                 reflector="r:4880", wait=False, progress=again.append)
    data = _get(url, cm_path)["data"]
    assert (data["autodetectionMethod"], data["nicNodeNames"]) == ("interface=^bond", "e1=eth1")
    assert any("ConfigMap kosmos-system/kosmos-fabric-agent configured" in m for m in again), again
    cluster = _get(url, "/apis/kosmos.io/v1alpha1/clusters/east")["spec"]["clusterLinkOptions"]
    assert cluster["autodetectionMethod"] == "interface=^bond"
    digest2 = _get(url, ds_path)["spec"]["template"]["metadata"]["annotations"][install.CONFIG_DIGEST_ANNOTATION]
    assert digest2 != digest1, "the DaemonSet must roll when the agents' settings change"
    # The same join once more changes nothing.
    third: list[str] = []
    install.join("east", target, target, install.JoinOptions(pod_cidrs=OPTS.pod_cidrs,
                                                             service_cidrs=OPTS.service_cidrs),
                 reflector="r:4880", wait=False, progress=third.append)
    assert any("ConfigMap kosmos-system/kosmos-fabric-agent unchanged" in m for m in third), third


def test_join_active_gateways_reach_the_cluster_object() -> None:
    """``fabric-tool join --active-gateways N`` writes ``activeGateways``; without it the CRD's
    default (1) holds, and a P2P cluster asking for more is refused by the parse, naming the field."""
    opts = install.JoinOptions(network_type="gateway", pod_cidrs=OPTS.pod_cidrs, gateways=("w1", "w2"),
                               active_gateways=2)
    obj = install.cluster_object("west", opts, opts.pod_cidrs, ())
    assert obj["spec"]["clusterLinkOptions"]["activeGateways"] == 2
    assert crd.parse_cluster(obj).active_gateways == 2
    plain = install.cluster_object("west", OPTS, OPTS.pod_cidrs, ())
    assert "activeGateways" not in plain["spec"]["clusterLinkOptions"]
    bad = install.cluster_object("east", install.JoinOptions(active_gateways=2), OPTS.pod_cidrs, ())
    with pytest.raises(crd.ClusterSpecError, match="activeGateways: 2 active gateways asked for"):
        crd.parse_cluster(bad)

