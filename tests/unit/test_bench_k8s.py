"""The pieces of ``fabric-tool bench k8s`` that run without root or a lab: the manifest kubectl
applies (against a kubeemu server), the readiness poll, the baseline's pod records, and the
RSS-per-1,000-pods measurement of ``python -m kubeemu.bench``."""

from __future__ import annotations

import ipaddress
import json
import shutil
import urllib.request
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import pytest

from kubeemu import bench as kb
from kubeemu.lab import write_kubeconfig
from kubeemu.runner import ServerThread
from tools import lab
from tools.bench import k8s

pytestmark = pytest.mark.unit


def _get(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=10) as r:
        return json.loads(r.read())


def test_manifest_pins_the_replicas_evenly_or_makes_one_deployment() -> None:
    docs = [json.loads(line) for line in k8s.manifest(201, ["k1", "k2", "k3", "k4"], single=False).splitlines()]
    assert docs[0] == {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": k8s.NAMESPACE}}
    deps = docs[1:]
    assert [d["spec"]["template"]["spec"]["nodeName"] for d in deps] == ["k1", "k2", "k3", "k4"]
    assert [d["spec"]["replicas"] for d in deps] == [51, 50, 50, 50]
    one = [json.loads(line) for line in k8s.manifest(200, ["k1"], single=True).splitlines()][1:]
    assert len(one) == 1 and one[0]["spec"]["replicas"] == 200
    assert "nodeName" not in one[0]["spec"]["template"]["spec"]


def test_kubectl_applies_the_manifest_and_readiness_is_summed(tmp_path: Path) -> None:
    if shutil.which("kubectl") is None:
        pytest.skip("no kubectl binary on PATH")
    with ServerThread(name="benchk8s", service_cidrs=("10.96.0.0/24",)) as emu:
        cfg = write_kubeconfig(tmp_path / "kubeconfig", {"bench": emu.url})
        state = cast(lab.LabState, SimpleNamespace(kubeconfig=cfg))
        k8s._kubectl(state, "bench", "apply", "-f", "-", stdin=k8s.manifest(6, ["k1", "k2"], single=False))
        assert k8s._ready(emu.url) == (0, 6)
        with pytest.raises(RuntimeError, match="only 0 of 6 replicas Ready"):
            k8s.wait_ready(emu.url, 6, 0.3)
        for name in ("bench-k1", "bench-k2"):  # what a Deployment controller reports when all are up
            path = f"/apis/apps/v1/namespaces/{k8s.NAMESPACE}/deployments/{name}"
            dep = _get(emu.url + path)
            dep["status"] = {"replicas": 3, "readyReplicas": 3}
            req = urllib.request.Request(emu.url + path + "/status", data=json.dumps(dep).encode(), method="PUT",
                                         headers={"Content-Type": "application/json"})
            urllib.request.urlopen(req, timeout=10).close()
        assert k8s.wait_ready(emu.url, 6, 10) >= 0


def test_baseline_pods_stay_clear_of_static_and_kubelet_pods() -> None:
    nodes = [lab.NodeRecord(cluster="bench", name=n, netns=f"kftx-bench-{n}", underlay_ip="198.18.0.1",
                            pod_cidr=f"10.44.{i}.0/24", ul_if=f"ul{i}",
                            pods=[lab.PodRecord("p0", f"kftx-bench-{n}-p0", f"10.44.{i}.2", "veth-p0")])
             for i, n in enumerate(("k1", "k2"))]
    cluster = lab.ClusterRecord("bench", "p2p", ["10.44.0.0/16"], ["10.96.0.0/20"], nodes)
    pods = k8s.baseline_pods(cluster, 200)
    assert len({p.netns for _, p in pods}) == 200
    for node, pod in pods:
        assert ipaddress.ip_address(pod.ip) in ipaddress.ip_network(node.pod_cidr)
        assert int(pod.ip.rsplit(".", 1)[1]) > 100  # the top of the /24; static and kubelet pods count up from .2
        assert pod.netns.startswith(node.netns + "-b") and len(pod.host_if) <= 15
    assert not lab.kube_pod_namespaces(cluster)  # none of these names looks like a kubelet pod's


def test_rss_per_1000_pods_creates_owned_running_pods() -> None:
    import os

    with ServerThread(name="benchrss", service_cidrs=("10.96.0.0/24",)) as emu:
        res = kb.rss_per_1000_pods(emu.url, os.getpid(), 40, concurrency=4, settle_s=0)
        pods = _get(emu.url + "/api/v1/namespaces/default/pods")["items"]
    assert res.pods == 40 and len(pods) == 40
    assert all(p["status"]["phase"] == "Running" and p["metadata"]["ownerReferences"][0]["kind"] == "ReplicaSet"
               for p in pods)
    assert res.json_mb > 0 and res.after_mb > 0
