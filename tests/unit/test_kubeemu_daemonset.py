"""The lab's DaemonSet controller: the node predicate (nodeSelector, required node affinity,
taints and the default daemon tolerations), one bound pod per matching node, node changes,
failed-pod replacement, rolling update within maxUnavailable, and status."""

from __future__ import annotations

import asyncio
import copy
from typing import Any

from kubeemu.client import MERGE_PATCH, Client, Obj, resource_path
from kubeemu.ctrl import daemonset as dsmod
from tests.kubeemu_cluster import ControllerManager, pods_of, run_cluster
from tests.unit.test_kubeemu_workloads import apoll

NS = "default"
NODES = ("n1", "n2", "n3", "n4")


def ds(name: str, **tspec: Any) -> Obj:
    return {"apiVersion": "apps/v1", "kind": "DaemonSet", "metadata": {"name": name},
            "spec": {"selector": {"matchLabels": {"app": name}},
                     "template": {"metadata": {"labels": {"app": name}},
                                  "spec": {"containers": [{"name": "c", "image": "x", "command": ["v1"]}], **tspec}}}}


def node(name: str, labels: dict[str, str] | None = None, taints: list[Obj] | None = None) -> Obj:
    return {"metadata": {"name": name, "labels": labels or {}}, "spec": {"taints": taints or []}}


def test_node_predicate() -> None:
    d = ds("a", nodeSelector={"disk": "ssd"})
    assert dsmod.should_run(d, node("x", {"disk": "ssd"})) == (True, True)
    assert dsmod.should_run(d, node("x", {"disk": "hdd"})) == (False, False)
    aff = {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [
        {"matchExpressions": [{"key": "zone", "operator": "In", "values": ["a", "b"]}]},
        {"matchFields": [{"key": "metadata.name", "operator": "In", "values": ["special"]}]}]}}}
    d2 = ds("b", affinity=aff)
    assert dsmod.should_run(d2, node("x", {"zone": "b"}))[0]
    assert dsmod.should_run(d2, node("special"))[0]
    assert not dsmod.should_run(d2, node("x", {"zone": "c"}))[0]
    plain = ds("c")
    ns_taint = {"key": "dedicated", "value": "db", "effect": "NoSchedule"}
    ne_taint = {"key": "dedicated", "value": "db", "effect": "NoExecute"}
    assert dsmod.should_run(plain, node("x", taints=[ns_taint])) == (False, True)
    assert dsmod.should_run(plain, node("x", taints=[ne_taint])) == (False, False)
    tol = ds("d", tolerations=[{"key": "dedicated", "operator": "Equal", "value": "db"}])
    assert dsmod.should_run(tol, node("x", taints=[ns_taint, ne_taint])) == (True, True)
    # cordoned and not-ready nodes still run daemon pods (the default tolerations)
    cordon = {"key": "node.kubernetes.io/unschedulable", "effect": "NoSchedule"}
    notready = {"key": "node.kubernetes.io/not-ready", "effect": "NoExecute"}
    assert dsmod.should_run(plain, node("x", taints=[cordon, notready])) == (True, True)
    # maxUnavailable: percentages round up, at least 1
    d3 = ds("e")
    d3["spec"]["updateStrategy"] = {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": "10%"}}
    assert dsmod.max_unavailable(d3, 4) == 1 and dsmod.max_unavailable(d3, 11) == 2
    assert dsmod.max_unavailable(ds("f"), 10) == 1


def run(scenario: Any) -> None:
    """``scenario(client, cm)`` with n4 labelled role=edge, n3 tainted, and a kubelet also on n5
    (a node the API server does not know); the DaemonSet controller binds the pods itself."""
    run_cluster(lambda c, cm, _kubelet: scenario(c, cm), name="ds", nodes=NODES, kubelet_nodes=(*NODES, "n5"),
                bind=False, labels={"n4": {"role": "edge"}},
                taints={"n3": [{"key": "dedicated", "value": "x", "effect": "NoSchedule"}]})


async def by_node(c: Client, app: str) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for p in await pods_of(c, NS, f"app={app}"):
        if not p["metadata"].get("deletionTimestamp"):
            out.setdefault(p["spec"].get("nodeName", ""), []).append(p["metadata"]["name"])
    return out


async def status(c: Client, name: str) -> Obj:
    return (await c.get(resource_path("apps/v1", "daemonsets", NS, name))).get("status") or {}


def test_daemonset_pods_per_node_and_rolling_update() -> None:
    async def scenario(c: Client, cm: ControllerManager) -> None:
        body = ds("agent")
        body["spec"]["updateStrategy"] = {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 1}}
        await c.create(resource_path("apps/v1", "daemonsets", NS), body)

        async def placed() -> Obj | None:
            st = await status(c, "agent")
            return st if st.get("numberReady") == 3 and st.get("desiredNumberScheduled") == 3 else None

        st = await apoll(placed, "agent on n1, n2, n4 (n3 is tainted)")
        assert st["currentNumberScheduled"] == 3 and st["updatedNumberScheduled"] == 3
        assert st["numberAvailable"] == 3 and st["numberUnavailable"] == 0 and st["numberMisscheduled"] == 0
        placement = await by_node(c, "agent")
        assert sorted(placement) == ["n1", "n2", "n4"] and all(len(v) == 1 for v in placement.values())
        p = (await pods_of(c, NS, "app=agent"))[0]
        terms = p["spec"]["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
        assert terms["nodeSelectorTerms"][0]["matchFields"][0]["values"] == [p["spec"]["nodeName"]]
        assert {"key": "node.kubernetes.io/unschedulable", "operator": "Exists", "effect": "NoSchedule"} in \
            p["spec"]["tolerations"]
        assert p["metadata"]["labels"][dsmod.REVISION_LABEL]
        # a new node gets a pod; a node labelled out of a nodeSelector loses it
        await c.create("/api/v1/nodes", {"metadata": {"name": "n5"}, "spec": {}})

        async def four() -> dict[str, list[str]] | None:
            pl = await by_node(c, "agent")
            return pl if sorted(pl) == ["n1", "n2", "n4", "n5"] else None

        await apoll(four, "a pod on the new node n5")
        # a failed daemon pod is deleted and replaced on its node
        victim = (await by_node(c, "agent"))["n1"][0]
        await c.patch(resource_path("v1", "pods", NS, victim, "status"), {"status": {"phase": "Failed"}}, MERGE_PATCH)

        async def replaced() -> list[str] | None:
            pl = await by_node(c, "agent")
            n1 = pl.get("n1", [])
            return n1 if n1 and victim not in n1 else None

        await apoll(replaced, "n1's failed pod replaced")
        # rolling update: never more than maxUnavailable=1 node without a ready pod
        await apoll(lambda: _all_ready(c, 4), "4 ready again")
        tmpl = copy.deepcopy(body["spec"]["template"])
        tmpl["spec"]["containers"][0]["command"] = ["v2"]
        worst = {"unready": 0}
        done = False

        async def observe() -> None:
            while not done:
                st2 = await status(c, "agent")
                pods = [x for x in await pods_of(c, NS, "app=agent") if not x["metadata"].get("deletionTimestamp")]
                ready_nodes = {x["spec"]["nodeName"] for x in pods if any(
                    k["type"] == "Ready" and k["status"] == "True" for k in x["status"].get("conditions") or [])}
                worst["unready"] = max(worst["unready"], st2.get("desiredNumberScheduled", 4) - len(ready_nodes))
                await asyncio.sleep(0.005)

        w = asyncio.create_task(observe())
        await c.patch(resource_path("apps/v1", "daemonsets", NS, "agent"), {"spec": {"template": tmpl}}, MERGE_PATCH)

        async def updated() -> Obj | None:
            st3 = await status(c, "agent")
            ok = st3.get("updatedNumberScheduled") == 4 and st3.get("numberReady") == 4 and \
                st3.get("observedGeneration") == 2
            return st3 if ok else None

        await apoll(updated, "rolling update to v2 on 4 nodes")
        done = True
        await w
        assert worst["unready"] <= 1, worst
        assert all(x["spec"]["containers"][0]["command"] == ["v2"] for x in await pods_of(c, NS, "app=agent"))
        # tainting a node NoExecute evicts the daemon pod there
        await c.patch("/api/v1/nodes/n2", {"spec": {"taints": [{"key": "k", "effect": "NoExecute"}]}}, MERGE_PATCH)

        async def evicted() -> dict[str, list[str]] | None:
            pl = await by_node(c, "agent")
            return pl if "n2" not in pl else None

        await apoll(evicted, "n2's pod removed after a NoExecute taint")

    run(scenario)


async def _all_ready(c: Client, n: int) -> bool:
    return (await status(c, "agent")).get("numberReady") == n


def test_daemonset_surge_update_keeps_every_node_served() -> None:
    """maxSurge 1 / maxUnavailable 0: a new pod starts next to the old one, the old goes once
    the new is available; no node is ever without a ready pod."""

    async def scenario(c: Client, cm: ControllerManager) -> None:
        body = ds("surge")
        body["spec"]["updateStrategy"] = {"type": "RollingUpdate",
                                          "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}}
        await c.create(resource_path("apps/v1", "daemonsets", NS), body)

        async def ready3(gen: int) -> Obj | None:
            st = await status(c, "surge")
            ok = st.get("numberReady") == 3 and st.get("updatedNumberScheduled") == 3 and \
                st.get("observedGeneration") == gen
            return st if ok else None

        await apoll(lambda: ready3(1), "surge on 3 nodes")
        worst = {"unserved": 0, "max_pods": 0}
        done = False

        async def observe() -> None:
            while not done:
                pods = [x for x in await pods_of(c, NS, "app=surge") if not x["metadata"].get("deletionTimestamp")]
                ready_nodes = {x["spec"]["nodeName"] for x in pods if any(
                    k["type"] == "Ready" and k["status"] == "True" for k in x["status"].get("conditions") or [])}
                worst["unserved"] = max(worst["unserved"], 3 - len(ready_nodes))
                worst["max_pods"] = max(worst["max_pods"], len(pods))
                await asyncio.sleep(0.005)

        w = asyncio.create_task(observe())
        tmpl = copy.deepcopy(body["spec"]["template"])
        tmpl["spec"]["containers"][0]["command"] = ["v2"]
        await c.patch(resource_path("apps/v1", "daemonsets", NS, "surge"), {"spec": {"template": tmpl}}, MERGE_PATCH)
        await apoll(lambda: ready3(2), "surge updated on 3 nodes")
        await cm.wait_idle()
        done = True
        await w
        assert worst["unserved"] == 0, worst
        assert worst["max_pods"] <= 4, worst  # at most maxSurge extra
        pods = await pods_of(c, NS, "app=surge")
        assert len(pods) == 3 and all(x["spec"]["containers"][0]["command"] == ["v2"] for x in pods)

    run(scenario)
