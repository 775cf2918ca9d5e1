"""fabric-tool join's discovery against an emulated API server: a member's pod CIDRs are the union
of its Nodes' ``spec.podCIDRs`` (collapsed per family) and its service CIDRs come from its
ServiceCIDR objects when the API serves them (never from kube-apiserver arguments)."""

from __future__ import annotations

import json
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from kubeemu.lab import write_kubeconfig
from kubeemu.runner import ServerThread
from tools import install


@pytest.fixture
def member(tmp_path: Path) -> Iterator[tuple[ServerThread, install.Target]]:
    with ServerThread(name="member") as s:
        cfg = write_kubeconfig(tmp_path / "kubeconfig", {"member": s.url}, current="member")
        yield s, install.Target(str(cfg), "member")


def _create(url: str, path: str, obj: dict[str, Any]) -> None:
    req = urllib.request.Request(url + path, data=json.dumps(obj).encode(), method="POST",
                                 headers={"Content-Type": "application/json"})  # fmt: skip
    with urllib.request.urlopen(req, timeout=10) as resp:
        assert resp.status == 201


def _node(name: str, *cidrs: str) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Node", "metadata": {"name": name}, "spec": {"podCIDRs": list(cidrs)}}


def test_pod_cidrs_are_the_collapsed_union_of_the_nodes(member: tuple[ServerThread, install.Target]) -> None:
    s, target = member
    _create(s.url, "/api/v1/nodes", _node("n1", "10.244.0.0/24", "fd00:10:244::/64"))
    _create(s.url, "/api/v1/nodes", _node("n2", "10.244.1.0/24", "fd00:10:244:1::/64"))
    _create(s.url, "/api/v1/nodes", _node("n3", "10.244.7.0/24"))
    pods, services = install.discover_cidrs(install.Kube(target))
    assert pods == ["10.244.0.0/23", "10.244.7.0/24", "fd00:10:244::/63"]
    assert services == []  # no ServiceCIDR objects: the Cluster spec must give them


def test_service_cidrs_come_from_servicecidr_objects(member: tuple[ServerThread, install.Target]) -> None:
    s, target = member
    _create(s.url, "/api/v1/nodes", _node("n1", "10.244.0.0/24"))
    _create(s.url, "/apis/networking.k8s.io/v1/servicecidrs",
            {"apiVersion": "networking.k8s.io/v1", "kind": "ServiceCIDR", "metadata": {"name": "kubernetes"},
             "spec": {"cidrs": ["10.96.0.0/16", "fd00:10:96::/112"]}})  # fmt: skip
    _create(s.url, "/apis/networking.k8s.io/v1/servicecidrs",
            {"apiVersion": "networking.k8s.io/v1", "kind": "ServiceCIDR", "metadata": {"name": "extra"},
             "spec": {"cidrs": ["10.97.0.0/24"]}})  # fmt: skip
    _pods, services = install.discover_cidrs(install.Kube(target))
    assert sorted(services) == ["10.96.0.0/16", "10.97.0.0/24", "fd00:10:96::/112"]
