"""fabric.control.k8s_source: Cluster resources -> FabricConfig, and Cluster status.

Pure parts (last-good resolution, status documents) are checked directly; the list+watch,
relist on 410, status writes and the status Lease run against an in-thread kubeemu with a
recording stand-in for the reflector (the real ``Reflector.set_config`` is exercised end to end
by tests/lab/test_install_e2e.py). No root.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import json
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
import yaml

from fabric import types
from fabric.control import api
from fabric.control import k8s_source as ks
from kubeemu.lab import kubeconfig
from kubeemu.runner import ServerThread
from tests.waiting import wait_until_async

REPO = Path(__file__).resolve().parents[2]
CRD = REPO / "deploy" / "base" / "host" / "crd-clusters.yaml"
NOW = "2026-01-01T00:00:00Z"


def cluster(name: str, created: str = "", gen: int = 1, **link: Any) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name, "generation": gen}
    if created:
        meta["creationTimestamp"] = created
    return {"apiVersion": "kosmos.io/v1alpha1", "kind": "Cluster", "metadata": meta,
            "spec": {"clusterLinkOptions": link}}


EAST: dict[str, Any] = dict(podCIDRs=["10.10.0.0/16"], serviceCIDRs=["10.96.0.0/20"])
WEST: dict[str, Any] = dict(podCIDRs=["10.20.0.0/16"], serviceCIDRs=["10.97.0.0/20"])


# ---------------------------------------------------------------------------------------------
# Pure
# ---------------------------------------------------------------------------------------------


def test_bad_edit_of_an_accepted_cluster_keeps_its_last_good_spec() -> None:
    last: dict[str, Any] = {}
    objs = {"east": cluster("east", "2026-01-01T00:00:01Z", **EAST),
            "west": cluster("west", "2026-01-01T00:00:02Z", **WEST)}
    out = ks.resolve_with_last_good(objs, last)
    assert [c.name for c in out.resolution.config.clusters] == ["east", "west"]
    assert not out.problems and set(last) == {"east", "west"}

    bad = cluster("west", "2026-01-01T00:00:02Z", gen=2, networkType="vxlan", **WEST)
    out = ks.resolve_with_last_good({**objs, "west": bad}, last)
    west = out.resolution.config.cluster("west")
    assert west is not None and west.mode == types.ClusterMode.P2P, "the last accepted spec stays in effect"
    assert out.kept == {"west": 1}
    assert [p.field for p in out.problems["west"]] == ["spec.clusterLinkOptions.networkType"]
    assert "'vxlan' is not a network type" in out.problems["west"][0].reason

    # A new cluster that was never accepted has nothing to fall back to.
    new = cluster("north", "2026-01-01T00:00:03Z", podCIDRs=["10.10.5.0/24"])
    out = ks.resolve_with_last_good({**objs, "north": new}, last)
    assert out.resolution.config.cluster("north") is None and not out.kept
    assert out.problems["north"][0].field == "spec.clusterLinkOptions.podCIDRs[0]"
    assert out.problems["north"][0].other == "east"

    # Accepted clusters keep precedence even over an older newcomer (creation times tie at 1 s).
    old = cluster("aaa", "2026-01-01T00:00:00Z", podCIDRs=["10.20.0.0/16"])
    out = ks.resolve_with_last_good({**objs, "aaa": old}, last)
    assert out.resolution.config.cluster("west") is not None and out.problems["aaa"][0].other == "west"

    # Deleted clusters leave the last-good memory.
    ks.resolve_with_last_good({"east": objs["east"]}, last)
    assert set(last) == {"east"}


def _fabric(config: types.FabricConfig, nodes: dict[str, list[tuple[str, bool]]]) -> api.FabricStatus:
    clusters = []
    for c in config.clusters:
        ns = tuple(api.NodeStatus(c.name, n, f"198.18.0.{i + 11}", (), True, 2, 2 if ok else 1, 5)
                   for i, (n, ok) in enumerate(nodes.get(c.name, [])))
        clusters.append(api.ClusterStatus(c.name, c.mode.value, c.pod_cidrs, c.service_cidrs, ns,
                                          active_gateway=ns[0].name if ns else "", ip_families=c.families))
    return api.FabricStatus("e", 1, False, tuple(clusters))


def test_cluster_status_conditions_conflicts_and_nodes() -> None:
    objs = {"east": cluster("east", "2026-01-01T00:00:01Z", **EAST),
            "bad": cluster("bad", "2026-01-01T00:00:02Z", podCIDRs=["10.10.0.0/24"],
                           globalCIDRsMap={"10.10.0.0/24": "172.30.0.0/16"})}
    out = ks.resolve_with_last_good(objs, {})
    fab = _fabric(out.resolution.config, {"east": [("e1", True), ("e2", False)]})

    east = ks.cluster_status(objs["east"], out, fab, NOW)
    acc, ready = east["conditions"]
    assert (acc["type"], acc["status"], acc["reason"]) == ("Accepted", "True", "Accepted")
    assert (ready["type"], ready["status"], ready["reason"]) == ("Ready", "False", "NodesNotInSync")
    assert "e2" in ready["message"]
    link = east["clusterLinkStatus"]
    assert link["podCIDRs"] == ["10.10.0.0/16"] and link["ipFamilies"] == ["IPv4"]
    assert link["nodeCount"] == 2 and link["activeGateway"] == "e1" and link["conflicts"] == []
    assert [(n["name"], n["inSync"], n["gateway"]) for n in link["nodes"]] == [("e1", True, True), ("e2", False, False)]

    bad = ks.cluster_status(objs["bad"], out, fab, NOW)
    acc, ready = bad["conditions"]
    assert (acc["status"], acc["reason"]) == ("False", "InvalidSpec")
    assert ready["reason"] == "NotAccepted"
    fields = {c["field"] for c in bad["clusterLinkStatus"]["conflicts"]}
    assert "spec.clusterLinkOptions.globalCIDRsMap[10.10.0.0/24]" in fields
    assert "/16 but 10.10.0.0/24 is a /24" in acc["message"]

    # The transition time survives as long as the condition's status does not change.
    objs["east"]["status"] = east
    fab = _fabric(out.resolution.config, {"east": [("e1", True), ("e2", True)]})
    later = ks.cluster_status(objs["east"], out, fab, "2026-01-01T00:05:00Z")
    assert later["conditions"][0]["lastTransitionTime"] == NOW
    assert later["conditions"][1]["lastTransitionTime"] == "2026-01-01T00:05:00Z"
    assert later["conditions"][1]["reason"] == "NodesInSync"
    assert ks.status_differs(east, later) and not ks.status_differs({**later, "extra": 1}, later)


def test_expected_nodes_come_from_the_statuses_of_accepted_clusters() -> None:
    east = cluster("east", **EAST)
    east["status"] = {"clusterLinkStatus": {"nodes": [{"name": "e1"}, {"name": "e2"}]}}
    gone = cluster("gone", podCIDRs=["10.10.0.0/16"])  # conflicts with east: not accepted
    gone["status"] = {"clusterLinkStatus": {"nodes": [{"name": "g1"}]}}
    config = ks.resolve_with_last_good({"east": east, "gone": gone}, {}).resolution.config
    assert ks.expected_nodes([east, gone], config) == ("east/e1", "east/e2")


def test_lease_spec_parse() -> None:
    assert ks.LeaseSpec.parse("kosmos-system/refl", "pod-a") == ks.LeaseSpec("kosmos-system", "refl", "pod-a")
    for bad in ("refl", "/refl", "ns/", "a/b/c"):
        with pytest.raises(ValueError, match="NAMESPACE/NAME"):
            ks.LeaseSpec.parse(bad, "pod-a")
    with pytest.raises(ValueError, match="identity"):
        ks.LeaseSpec.parse("ns/refl", "")


# ---------------------------------------------------------------------------------------------
# Against kubeemu
# ---------------------------------------------------------------------------------------------


class Sink:
    """Stands in for the reflector: records configurations, reports every node in sync."""

    def __init__(self) -> None:
        self.configs: list[types.FabricConfig] = []
        #: set_leader calls: (leading, why, expected).
        self.roles: list[tuple[bool, str, tuple[str, ...] | None]] = []

    def set_config(self, config: types.FabricConfig) -> None:
        self.configs.append(config)

    def set_leader(self, leading: bool, why: str, expected: Sequence[str] | None = None) -> None:
        self.roles.append((leading, why, None if expected is None else tuple(expected)))

    def status(self) -> api.FabricStatus:
        config = self.configs[-1] if self.configs else types.FabricConfig(clusters=())
        return _fabric(config, {c.name: [(f"{c.name[0]}1", True)] for c in config.clusters})


@contextlib.contextmanager
def _host_server(bookmark_interval: float) -> Iterator[ServerThread]:
    """An emulated host API server with the Cluster CRD and the ``kosmos-system`` namespace."""
    with ServerThread(name="host", service_cidrs=("10.96.0.0/24",), bookmark_interval=bookmark_interval) as s:
        _request(s.url, "POST", "/apis/apiextensions.k8s.io/v1/customresourcedefinitions",
                 yaml.safe_load(CRD.read_text()))
        _request(s.url, "POST", "/api/v1/namespaces", {"apiVersion": "v1", "kind": "Namespace",
                                                       "metadata": {"name": "kosmos-system"}})
        yield s


@pytest.fixture
def emu() -> Iterator[ServerThread]:
    with _host_server(bookmark_interval=0.2) as s:
        yield s


def _request(url: str, method: str, path: str, body: Any = None, ctype: str = "application/json") -> Any:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url + path, data=data, method=method, headers={"Content-Type": ctype})
    with urllib.request.urlopen(req, timeout=5) as r:
        return json.loads(r.read() or b"null")


CLUSTERS = "/apis/kosmos.io/v1alpha1/clusters"


def _source(url: str, **kw: Any) -> ks.KubernetesSource:
    from kubernetes import config

    client = config.new_client_from_config_dict(kubeconfig({"host": url}))  # type: ignore[no-untyped-call]
    return ks.KubernetesSource(client, **{"resync_s": 30, "status_interval_s": 0.05, **kw})


def _get(url: str, name: str) -> dict[str, Any]:
    out: dict[str, Any] = _request(url, "GET", f"{CLUSTERS}/{name}")
    return out


def _cond(obj: dict[str, Any], ctype: str) -> dict[str, Any]:
    return next((c for c in (obj.get("status") or {}).get("conditions", []) if c["type"] == ctype), {})


def test_watch_feeds_configs_and_writes_status(emu: ServerThread) -> None:
    url = emu.url
    _request(url, "POST", CLUSTERS, cluster("east", **EAST))
    src = _source(url)
    assert [_n["metadata"]["name"] for _n in src.initial_list(5) or []] == ["east"]
    first = src.initial_config()
    assert [c.name for c in first.clusters] == ["east"]
    sink = Sink()
    sink.configs.append(first)

    async def scenario() -> None:
        task = asyncio.create_task(src.run(sink))
        try:
            await wait_until_async(lambda: _cond(_get(url, "east"), "Ready").get("status") == "True", 5, "east Ready")
            obj = _get(url, "east")
            assert obj["status"]["clusterLinkStatus"]["nodes"][0]["name"] == "e1"
            assert obj["status"]["observedGeneration"] == obj["metadata"]["generation"]

            _request(url, "POST", CLUSTERS, cluster("west", **WEST))
            await wait_until_async(
                lambda: [c.name for c in sink.configs[-1].clusters] == ["east", "west"],
                5,
                "west joins",
            )

            # What the CRD schema refuses, the (emulated) API server refuses: 422 naming the field.
            with pytest.raises(urllib.error.HTTPError) as refused:
                _request(url, "PATCH", f"{CLUSTERS}/west", {"spec": {"clusterLinkOptions": {"networkType": "vxlan"}}},
                         "application/merge-patch+json")
            assert refused.value.code == 422
            causes = json.loads(refused.value.read())["details"]["causes"]
            assert [c["field"] for c in causes] == ["spec.clusterLinkOptions.networkType"]
            # What only fabric/crd.py catches (an interface name with '/') is stored: on a working
            # cluster the edit is not applied, the cluster is kept at its last spec and it is reported.
            n = len(sink.configs)
            _request(url, "PATCH", f"{CLUSTERS}/west", {"spec": {"clusterLinkOptions": {"defaultNICName": "eth/0"}}},
                     "application/merge-patch+json")
            acc = await wait_until_async(
                lambda: _cond(_get(url, "west"), "Accepted").get("reason") == "InvalidSpecKeptPrevious"
                and _cond(_get(url, "west"), "Accepted"),
                5,
                "west rejected",
            )
            assert acc["status"] == "False" and "spec.clusterLinkOptions.defaultNICName" in acc["message"]
            assert len(sink.configs) == n, "a rejected edit must not change the configuration"
            conflicts = _get(url, "west")["status"]["clusterLinkStatus"]["conflicts"]
            assert conflicts[0]["field"] == "spec.clusterLinkOptions.defaultNICName"

            # A new cluster overlapping east without mapping: reported, nothing else changes.
            _request(url, "POST", CLUSTERS, cluster("dup", podCIDRs=["10.10.0.0/24"]))
            acc = await wait_until_async(lambda: _cond(_get(url, "dup"), "Accepted"), 5, "dup status")
            assert acc["reason"] == "Conflict" and "spec.clusterLinkOptions.podCIDRs[0]" in acc["message"]
            assert len(sink.configs) == n
            assert _get(url, "dup")["status"]["clusterLinkStatus"]["conflicts"][0]["cluster"] == "east"

            # Fixing west's spec: gateway mode takes effect.
            _request(url, "PATCH", f"{CLUSTERS}/west",
                     {"spec": {"clusterLinkOptions": {"networkType": "gateway", "defaultNICName": "*"}}},
                     "application/merge-patch+json")
            await wait_until_async(
                lambda: (w := sink.configs[-1].cluster("west")) is not None and w.mode == types.ClusterMode.GATEWAY,
                5,
                "west in gateway mode",
            )
            await wait_until_async(
                lambda: _cond(_get(url, "west"), "Accepted").get("status") == "True",
                5,
                "west accepted again",
            )

            # An expired watch (410) relists; a Cluster deleted meanwhile is gone from the view.
            lists = src.lists
            _request(url, "DELETE", f"{CLUSTERS}/dup")
            _request(url, "POST", "/_kubeemu/watches/expire")
            await wait_until_async(lambda: src.lists > lists, 5, "relist after 410")
            await wait_until_async(lambda: "dup" not in src.objects, 5, "dup gone")
            _request(url, "DELETE", f"{CLUSTERS}/west")
            await wait_until_async(lambda: [c.name for c in sink.configs[-1].clusters] == ["east"], 5, "west withdrawn")
        finally:
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task

    asyncio.run(scenario())


def test_only_the_lease_holder_writes_status(emu: ServerThread) -> None:
    url = emu.url
    _request(url, "POST", CLUSTERS, cluster("east", **EAST))
    a = _source(url, lease=ks.LeaseSpec("kosmos-system", "refl", "a", duration_s=2))
    b = _source(url, lease=ks.LeaseSpec("kosmos-system", "refl", "b", duration_s=2))
    sa, sb = Sink(), Sink()
    for s, sink in ((a, sa), (b, sb)):
        s.initial_list(5)
        sink.configs.append(s.initial_config())

    async def scenario() -> None:
        ta = asyncio.create_task(a.run(sa))
        await wait_until_async(lambda: a.may_write_status() and a.status_writes > 0, 5, "a holds the lease and writes")
        tb = asyncio.create_task(b.run(sb))
        try:
            await asyncio.sleep(0.5)
            assert not b.may_write_status() and b.status_writes == 0
            lease = _request(url, "GET", "/apis/coordination.k8s.io/v1/namespaces/kosmos-system/leases/refl")
            assert lease["spec"]["holderIdentity"] == "a"
            assert sa.roles[0][:2] == (True, "acquired the leader Lease kosmos-system/refl") and a.leading
            assert sb.roles and {r[:2] for r in sb.roles} == {(False, "standby replica; the leader is a")}
            ta.cancel()  # a stops renewing: it stands down and releases the Lease; b takes over
            patched = copy.deepcopy(_get(url, "east"))
            _request(url, "PATCH", f"{CLUSTERS}/east/status", {"status": {"conditions": []}},
                     "application/merge-patch+json")
            await wait_until_async(lambda: b.may_write_status(), 8, "b takes the lease")
            assert sa.roles[-1][0] is False and not a.leading
            # The new leader waits for the nodes the old leader's Cluster status listed.
            assert sb.roles[-1] == (True, "acquired the leader Lease kosmos-system/refl", ("east/e1",))
            await wait_until_async(
                lambda: _cond(_get(url, "east"), "Ready").get("status") == "True",
                5,
                "b rewrites status",
            )
            assert patched["status"]["conditions"]
        finally:
            for t in (ta, tb):
                t.cancel()
            await asyncio.gather(ta, tb, return_exceptions=True)

    asyncio.run(scenario())


def test_run_ends_when_cancelled_even_as_its_status_loop_wakes(emu: ServerThread) -> None:
    """A cancel that arrives in the same loop turn as the status loop's wake-up must end run():
    on Python 3.11, ``asyncio.wait_for`` swallowed exactly that cancel (CPython gh-86296) and the
    reflector's Cluster source never stopped (a test hung in CI until its timeout). Each round
    runs a new source (a source runs once) whose watch thread must be gone when run() ends."""
    _request(emu.url, "POST", CLUSTERS, cluster("east", **EAST))

    async def scenario() -> None:
        for _ in range(20):
            src = _source(emu.url, status_interval_s=30.0)
            src.initial_list(5)
            sink = Sink()
            sink.configs.append(src.initial_config())
            task = asyncio.create_task(src.run(sink))
            await wait_until_async(lambda src=src: src._dirty is not None, 5, "status loop started")
            await asyncio.sleep(0.05)  # the status loop waits for the next wake-up
            assert src._dirty is not None
            src._dirty.set()  # wakes the loop ...
            task.cancel()  # ... and cancels run() in the same turn
            with pytest.raises(asyncio.CancelledError):
                async with asyncio.timeout(5):
                    await task
            assert src._watcher is not None and not src._watcher.is_alive(), "run() ended, its watch thread runs"

    asyncio.run(scenario())


def test_a_stopped_source_ends_its_blocked_watch_and_runs_once() -> None:
    """Without events or bookmarks a watch read blocks for up to the resync period: run() must
    interrupt it when it ends, not leave a thread that retries (and logs) after the test, the
    reflector or the interpreter is gone. A second run() is refused (its threads are stopped)."""
    with _host_server(bookmark_interval=3600.0) as server:
        _request(server.url, "POST", CLUSTERS, cluster("east", **EAST))
        src = _source(server.url, resync_s=3600.0)
        sink = Sink()

        async def scenario() -> None:
            task = asyncio.create_task(src.run(sink))
            try:
                await wait_until_async(lambda: src.synced and src._watch_resp is not None, 5, "the watch is open")
                await asyncio.sleep(0.2)  # the thread now blocks in the watch read
            finally:
                task.cancel()
                with pytest.raises(asyncio.CancelledError):
                    await task
            assert src._watcher is not None and not src._watcher.is_alive(), "the blocked watch was not interrupted"
            with pytest.raises(RuntimeError, match="a source runs once"):
                await src.run(sink)

        asyncio.run(scenario())
