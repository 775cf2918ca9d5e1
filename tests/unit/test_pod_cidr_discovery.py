"""Issue 9: a cluster's pod CIDRs are the union of its nodes' (discovery mode).

A Cluster without ``podCIDRs`` takes the pod CIDRs its admitted nodes announced. Checked here:
the planner's admission rule for such clusters (a node outside the union is fine, one that
overlaps what other clusters or the fabric use is not), ``crd.resolve`` with and without
discovered CIDRs, and the Kubernetes source turning a node's announcement into a configuration
whose cluster pod CIDRs include it (against kubeemu, with the recording stand-in for the
reflector that tests/unit/test_k8s_source.py uses). No root.
"""

from __future__ import annotations

import asyncio
import dataclasses

import pytest

from fabric import crd, types
from fabric.control import admission, api
from kubeemu.runner import ServerThread
from tests.unit.test_k8s_source import CLUSTERS, EAST, Sink, _cond, _get, _request, _source, cluster, emu
from tests.waiting import wait_until_async

__all__ = ["emu"]  # the fixture, imported for the tests below

P2P = types.ClusterMode.P2P
GW = types.ClusterMode.GATEWAY
LINK = "spec.clusterLinkOptions"


# ---------------------------------------------------------------------------------------------
# admission.validate_announcement
# ---------------------------------------------------------------------------------------------


def fabric(*extra: types.ClusterConfig, west: types.ClusterConfig | None = None) -> types.FabricConfig:
    east = types.ClusterConfig("east", P2P, ("10.10.0.0/16",), ("10.96.0.0/20",))
    west = west or types.ClusterConfig("west", GW, ("10.20.0.0/24",), ("10.97.0.0/20",), discover_pod_cidrs=True)
    return types.FabricConfig(clusters=(east, west, *extra))


def node(cluster: str, name: str, ip: str, *pods: str) -> types.NodeAnnouncement:
    return types.NodeAnnouncement(cluster, name, ip, pods)


def reasons(config: types.FabricConfig, ann: types.NodeAnnouncement, *nodes: types.NodeAnnouncement) -> list[str]:
    topo = types.Topology(config, tuple(sorted(nodes, key=lambda n: n.key)))
    return admission.validate_announcement(topo, ann, admission.NodeIndex.of(topo))


W1 = node("west", "w1", "198.18.0.21", "10.20.0.0/24")


def test_a_discovery_mode_node_outside_the_union_is_admitted() -> None:
    config = fabric()
    assert reasons(config, node("west", "w2", "198.18.0.22", "10.20.7.0/24"), W1) == []
    assert reasons(config, node("west", "w2", "198.18.0.22", "10.44.0.0/24"), W1) == []
    # The same node in a cluster with declared podCIDRs is refused, as before.
    static = fabric(west=types.ClusterConfig("west", GW, ("10.20.0.0/24",), ("10.97.0.0/20",)))
    (why,) = reasons(static, node("west", "w2", "198.18.0.22", "10.20.7.0/24"), W1)
    assert why == "pod CIDR 10.20.7.0/24 is outside cluster 'west' podCIDRs ['10.20.0.0/24']"


def test_a_discovery_mode_node_overlapping_what_others_use_is_refused() -> None:
    config = fabric()
    cases = {
        "10.10.3.0/24": "pod CIDR 10.10.3.0/24 overlaps 10.10.0.0/16 of cluster 'east' podCIDRs",
        "10.96.0.0/24": "pod CIDR 10.96.0.0/24 overlaps 10.96.0.0/20 of cluster 'east' serviceCIDRs",
        "10.97.1.0/24": "pod CIDR 10.97.1.0/24 overlaps 10.97.0.0/20 of cluster 'west' serviceCIDRs (its own)",
        "100.64.0.0/24": "pod CIDR 100.64.0.0/24 overlaps the fabric's bridgeCIDRs 100.64.0.0/10",
        "10.0.0.0/8": "pod CIDR 10.0.0.0/8 overlaps 10.10.0.0/16 of cluster 'east' podCIDRs",
    }
    for cidr, why in cases.items():
        got = reasons(config, node("west", "w2", "198.18.0.22", cidr), W1)
        assert any(r.startswith(why) for r in got), (cidr, got)
    # Node against node stays as it was: the other node of its own cluster is named.
    got = reasons(config, node("west", "w2", "198.18.0.22", "10.20.0.0/25"), W1)
    assert got == ["pod CIDR 10.20.0.0/25 overlaps pod CIDR 10.20.0.0/24 of node west/w1"]


def test_global_cidrs_decide_overlaps_of_a_discovery_mode_node() -> None:
    east = types.ClusterConfig("east", P2P, ("10.10.0.0/16",), global_cidrs=(("10.10.0.0/16", "172.20.0.0/16"),))
    west = types.ClusterConfig("west", P2P, (), global_cidrs=(("10.10.0.0/16", "172.21.0.0/16"),),
                               discover_pod_cidrs=True)
    config = types.FabricConfig(clusters=(east, west))
    # Both sides mapped: allowed, they reach each other by global IP.
    assert reasons(config, node("west", "w1", "198.18.0.21", "10.10.4.0/24")) == []
    # Outside west's own key: not mapped, so the overlap with east is refused.
    unmapped = types.FabricConfig(clusters=(east, dataclasses.replace(west, global_cidrs=())))
    (why,) = reasons(unmapped, node("west", "w1", "198.18.0.21", "10.10.4.0/24"))
    assert why.startswith("pod CIDR 10.10.4.0/24 overlaps 10.10.0.0/16 of cluster 'east' podCIDRs")
    # A node range only partly inside a key, or over somebody's global CIDR.
    got = reasons(config, node("west", "w1", "198.18.0.21", "10.10.0.0/15"))
    assert any("is only partly inside 10.10.0.0/16 of cluster 'west' globalCIDRs" in r for r in got), got
    (why,) = reasons(config, node("west", "w1", "198.18.0.21", "172.20.9.0/24"))
    assert why == "pod CIDR 172.20.9.0/24 overlaps global CIDR 172.20.0.0/16 of cluster 'east' globalCIDRs"


def test_discovery_mode_respects_explicit_ip_families() -> None:
    west = types.ClusterConfig("west", P2P, (), ip_families=(4,), discover_pod_cidrs=True)
    config = fabric(west=west)
    (why,) = reasons(config, node("west", "w1", "198.18.0.21", "10.20.0.0/24", "fd00:20::/64"))
    assert why == "pod CIDR fd00:20::/64 is IPv6 but cluster 'west' ipFamilies is [IPv4]"


# ---------------------------------------------------------------------------------------------
# crd.resolve
# ---------------------------------------------------------------------------------------------


def test_a_cluster_without_pod_cidrs_is_accepted_and_waits_for_its_nodes() -> None:
    res = crd.resolve([cluster("west", serviceCIDRs=["10.97.0.0/20"])])
    assert res.problems == {}
    (c,) = res.config.clusters
    assert c.discover_pod_cidrs and c.pod_cidrs == () and c.service_cidrs == ("10.97.0.0/20",)
    assert res.in_use["west"] == ((), ("10.97.0.0/20",))


def test_discovered_pod_cidrs_are_the_collapsed_union_in_discovery_mode_only() -> None:
    found = {"west": crd.Discovered(pod_cidrs=("10.20.1.0/24", "10.20.0.0/24", "10.20.9.0/24")),
             "east": crd.Discovered(pod_cidrs=("10.10.1.0/24",))}
    east = cluster("east", "2025-01-01T00:00:00Z", **EAST)
    west = cluster("west", "2025-01-02T00:00:00Z")
    res = crd.resolve([east, west], found)
    assert res.problems == {}
    c = res.config.cluster("west")
    assert c is not None and c.discover_pod_cidrs and c.pod_cidrs == ("10.20.0.0/23", "10.20.9.0/24")
    e = res.config.cluster("east")  # declared podCIDRs: what nodes announced does not change them
    assert e is not None and not e.discover_pod_cidrs and e.pod_cidrs == ("10.10.0.0/16",)


def test_a_global_key_of_a_discovery_mode_cluster_may_wait_for_its_nodes() -> None:
    west = cluster("west", globalCIDRsMap={"10.20.0.0/16": "172.21.0.0/16"})
    (c,) = crd.resolve([west]).config.clusters
    assert c.pod_cidrs == ("10.20.0.0/16",) and c.service_cidrs == ()  # a pod range before any node
    (c,) = crd.resolve([west], {"west": crd.Discovered(pod_cidrs=("10.20.3.0/24",))}).config.clusters
    assert c.pod_cidrs == ("10.20.0.0/16",)
    # A discovered range only partly covered is still a problem, with the key's path.
    (p,) = crd.resolve([west], {"west": crd.Discovered(pod_cidrs=("10.20.0.0/15",))}).problems["west"]
    assert p.field == f"{LINK}.globalCIDRsMap[10.20.0.0/16] (key)" and "covers only part of 10.20.0.0/15" in p.reason


def test_discovered_cidrs_conflicting_with_an_older_cluster_are_reported() -> None:
    east = cluster("east", "2025-01-01T00:00:00Z", **EAST)
    west = cluster("west", "2025-01-02T00:00:00Z")
    (p,) = crd.resolve([east, west], {"west": crd.Discovered(pod_cidrs=("10.10.5.0/24",))}).problems["west"]
    assert p.other == "east"
    assert p.field == "status.clusterLinkStatus.podCIDRs (discovered from the nodes' announcements)"
    assert "10.10.5.0/24 overlaps 10.10.0.0/16 of cluster 'east'" in p.reason


def test_status_pod_cidrs_reads_discovery_mode_clusters_only() -> None:
    west = cluster("west")
    west["status"] = {"clusterLinkStatus": {"podCIDRs": ["10.20.0.0/23"]}}
    east = cluster("east", **EAST)
    east["status"] = {"clusterLinkStatus": {"podCIDRs": ["10.10.0.0/16"]}}
    assert crd.status_pod_cidrs([west, east, cluster("north")]) == {"west": ("10.20.0.0/23",)}


# ---------------------------------------------------------------------------------------------
# The Kubernetes source
# ---------------------------------------------------------------------------------------------


class NodeSink(Sink):
    """The stand-in reflector, with nodes that announce pod CIDRs; like the reflector, its
    status lists only nodes of configured clusters."""

    def __init__(self) -> None:
        super().__init__()
        self.nodes: dict[str, dict[str, tuple[str, ...]]] = {}

    def status(self) -> api.FabricStatus:
        config = self.configs[-1] if self.configs else types.FabricConfig(clusters=())
        clusters = []
        for c in config.clusters:
            ns = tuple(api.NodeStatus(c.name, n, f"198.18.0.{i + 11}", pods, True, 2, 2, 5)
                       for i, (n, pods) in enumerate(sorted(self.nodes.get(c.name, {}).items())))
            clusters.append(api.ClusterStatus(c.name, c.mode.value, c.pod_cidrs, c.service_cidrs, ns,
                                              ip_families=c.families))
        return api.FabricStatus("e", 1, False, tuple(clusters))


def test_a_new_nodes_pod_cidr_reaches_the_configuration(emu: ServerThread) -> None:
    url = emu.url
    _request(url, "POST", CLUSTERS, cluster("east", **EAST))
    _request(url, "POST", CLUSTERS, cluster("west", networkType="gateway", serviceCIDRs=["10.97.0.0/20"]))
    src = _source(url)
    src.initial_list(5)
    sink = NodeSink()
    sink.configs.append(src.initial_config())
    west0 = sink.configs[-1].cluster("west")
    assert west0 is not None and west0.discover_pod_cidrs and west0.pod_cidrs == ()

    def west_pods() -> tuple[str, ...]:
        w = sink.configs[-1].cluster("west")
        return w.pod_cidrs if w is not None else ("west missing",)

    async def scenario() -> None:
        task = asyncio.create_task(src.run(sink))
        try:
            acc = await wait_until_async(lambda: _cond(_get(url, "west"), "Accepted"), 5, "west status")
            assert acc["status"] == "True" and "none yet: waiting for its nodes" in acc["message"]
            sink.nodes["west"] = {"w1": ("10.20.0.0/24",), "w2": ("10.20.1.0/24",)}
            await wait_until_async(lambda: west_pods() == ("10.20.0.0/23",), 5, "west's first two nodes")
            # A node added later, outside the union so far: the next configuration has it.
            sink.nodes["west"]["w3"] = ("10.20.2.0/24",)
            await wait_until_async(lambda: west_pods() == ("10.20.0.0/23", "10.20.2.0/24"), 5, "west's new node")
            await wait_until_async(
                lambda: _get(url, "west")["status"]["clusterLinkStatus"]["podCIDRs"]
                == ["10.20.0.0/23", "10.20.2.0/24"],
                5,
                "west status podCIDRs",
            )
            acc = _cond(_get(url, "west"), "Accepted")
            assert acc["status"] == "True" and "waiting" not in acc["message"]
            # Stable: nothing changed, so no more configurations (no feedback loop).
            n = len(sink.configs)
            await asyncio.sleep(0.4)
            assert len(sink.configs) == n
            # East declares its pod CIDRs: its nodes' announcements do not change them.
            sink.nodes["east"] = {"e1": ("10.10.0.0/24",)}
            await asyncio.sleep(0.3)
            east = sink.configs[-1].cluster("east")
            assert east is not None and east.pod_cidrs == ("10.10.0.0/16",)
            # A node withdrawn: its range leaves the union.
            del sink.nodes["west"]["w1"]
            await wait_until_async(lambda: west_pods() == ("10.20.1.0/24", "10.20.2.0/24"), 5, "w1's range gone")
        finally:
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task

    asyncio.run(scenario())


def test_a_restarted_source_keeps_the_status_pod_cidrs_while_the_sink_holds(emu: ServerThread) -> None:
    west = cluster("west")
    west["status"] = {"clusterLinkStatus": {"podCIDRs": ["10.20.0.0/23"], "nodes": [{"name": "w1"}]}}
    src = _source(emu.url)
    src.objects = {"west": west}
    w = src.initial_config().cluster("west")
    assert w is not None and w.pod_cidrs == ("10.20.0.0/23",), "the previous reflector's union, before any node"
    sink = NodeSink()
    src._sink = sink  # what run() does; driven by hand here
    sink.configs.append(src.initial_config())

    def status(holding: bool, pods: tuple[str, ...]) -> api.FabricStatus:
        nodes = (api.NodeStatus("west", "w1", "198.18.0.21", pods, True, 1, 1, 1),) if pods else ()
        return api.FabricStatus("e", 1, holding, (api.ClusterStatus("west", "p2p", (), (), nodes),))

    assert not src.rediscover(status(True, ())), "while holding, nothing is lost"
    assert src.rediscover(status(True, ("10.20.4.0/24",)))
    w = sink.configs[-1].cluster("west")
    assert w is not None and w.pod_cidrs == ("10.20.0.0/23", "10.20.4.0/24")
    assert src.rediscover(status(False, ("10.20.4.0/24",))), "the hold ended: only admitted nodes count"
    w = sink.configs[-1].cluster("west")
    assert w is not None and w.pod_cidrs == ("10.20.4.0/24",)
    assert not src.rediscover(status(False, ("10.20.4.0/24",)))
