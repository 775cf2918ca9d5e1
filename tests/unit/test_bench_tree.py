"""The pieces of ``fabric-tool bench tree`` that run without root or a lab: the topology the lab
reads, the pod bodies, the per-phase statistics, the report and its rendering, and the watches
against in-process API servers."""

from __future__ import annotations

import dataclasses
import math
import time

import pytest

from fabric.topology import parse as parse_topology
from kubeemu.runner import ServerThread
from scheduler.kube import Api, resource_path
from tests.waiting import wait_until
from tools.bench import common as bc
from tools.bench import suite
from tools.bench import tree as tb

pytestmark = pytest.mark.unit


def test_topology_is_a_host_and_node_mode_leaves_the_lab_accepts() -> None:
    from tools.lab import tree as labtree

    doc = tb.topology(4, 300)
    topo = parse_topology(doc, "bench")
    assert labtree.problems(topo) == []
    assert [c.role for c in topo.clusters] == ["host", "", "", "", ""]
    assert [c.tree for c in topo.clusters[1:]] == ["node"] * 4
    assert [n.name for c in topo.clusters[1:] for n in c.nodes] == tb.leaf_nodes(4) == ["l1", "l2", "l3", "l4"]
    assert all(dict(c.nodes[0].resources) == {"pods": "300"} for c in topo.clusters[1:])


def test_pod_body_is_bound_host_network_and_labelled() -> None:
    body = tb.pod_body("p-00001", tb.TREE_NS, "l2")
    assert body["metadata"] == {"name": "p-00001", "namespace": tb.TREE_NS, "labels": {tb.LABEL: tb.LABEL_VALUE}}
    assert body["spec"]["nodeName"] == "l2" and body["spec"]["hostNetwork"] is True
    assert body["spec"]["terminationGracePeriodSeconds"] == 0
    assert tb.pod_count(bc.Options()) == 1000 and tb.pod_count(bc.Options(tiny=True)) == 20
    assert tb.pod_count(bc.Options(tree_pods=7, tiny=True)) == 7


def test_phase_stats_tree_legs_and_rate() -> None:
    ph = tb.Phase("tree")
    for i in range(100):  # created 10 ms apart; leaf Running 100+i ms later, root 50 ms after that
        ph.created[f"p{i}"] = i * 0.01
        ph.leaf[f"p{i}"] = i * 0.01 + 0.1 + i / 1000
        ph.root[f"p{i}"] = ph.leaf[f"p{i}"] + 0.05
    s = tb.phase_stats(ph)
    assert s.pods == 100
    assert s.p50_ms == pytest.approx(150 + 49) and s.p99_ms == pytest.approx(150 + 98)
    assert s.leaf_p50_ms == pytest.approx(100 + 49) and s.back_p99_ms == pytest.approx(50)
    last = 0.99 + 0.1 + 0.099 + 0.05
    assert s.span_s == pytest.approx(last) and s.pods_per_s == pytest.approx(100 / last)


def test_creates_per_s_is_first_sent_to_last_returned() -> None:
    ph = tb.Phase("root", created={"a": 1.0, "b": 1.5, "c": 2.0}, creates_done=3.0)
    assert ph.creates_per_s == pytest.approx(3 / 2.0)
    assert tb.phase_stats(ph).creates_per_s == pytest.approx(1.5)
    assert math.isnan(tb.Phase("root").creates_per_s)


def test_phase_stats_direct_uses_the_leaf_and_skips_pods_never_running() -> None:
    ph = tb.Phase("direct", created={"a": 0.0, "b": 1.0, "c": 2.0}, leaf={"a": 0.5, "b": 2.0})
    s = tb.phase_stats(ph)
    assert s.pods == 2 and s.p50_ms == pytest.approx(500) and s.p99_ms == pytest.approx(1000)
    assert s.span_s == pytest.approx(2.0) and math.isnan(s.leaf_p50_ms)
    assert math.isnan(tb.phase_stats(tb.Phase("tree")).pods_per_s)


def _stats(p50: float, p99: float, rate: float) -> tb.PhaseStats:
    return tb.PhaseStats(1000, p50, p99, rate, 1000 / rate, p50 - 100, p99 - 100, 100, 200)


def test_report_figures_ratios_aims_and_markdown() -> None:
    rounds = [tb.Round(_stats(1000, 3000, 50), _stats(800, 1000, 100), 80, 130, 5.0),
              tb.Round(_stats(1200, 2000, 40), _stats(900, 1200, 80), 100, 110, 6.0),
              tb.Round(_stats(1100, 2500, 60), _stats(700, 1100, 90), 100, 120, 7.0)]
    without_paced = tb.report(rounds, 1000)
    assert not any(k.startswith("paced_") for k in (*without_paced.figures, *without_paced.units))
    assert "paced" not in next(n for n in without_paced.notes if n.startswith("aims"))
    assert not any(k.startswith("api_") for k in (*without_paced.figures, *without_paced.units))
    rounds = [dataclasses.replace(r, paced_tree=_stats(600, 900 + i, 20), paced_direct=_stats(500, 600, 20),
                                  api_tree=dataclasses.replace(_stats(300, 700, 150 + 10 * i), creates_per_s=170 + i),
                                  api_direct=dataclasses.replace(_stats(200, 500, 300), creates_per_s=340),
                                  api_cpu_s=2.0 + i,
                                  root_alone={t: 180.0 + 10 * i + t for t in tb.ROOT_ALONE_THREADS})
              for i, r in enumerate(rounds)]
    rep = tb.report(rounds, 1000)
    assert rep.figures["api_creates_per_s"]["median"] == 171
    assert rep.figures["api_creates_per_s"]["ratio"] == pytest.approx(171 / 340)
    threads = tb.ROOT_ALONE_THREADS[-1]
    alone = rep.figures[f"root_alone_creates_per_s_{threads}_threads"]
    assert (alone["min"], alone["median"], alone["max"]) == (180 + threads, 190 + threads, 200 + threads)
    assert "root API server alone: 208.0 creates/s with 8 threads" in next(n for n in rep.notes
                                                                          if n.startswith("round 3:"))
    assert rep.figures["api_pods_per_s"]["median"] == 160
    assert rep.figures["api_pods_per_s"]["ratio"] == pytest.approx(160 / 300)
    assert rep.figures["api_create_to_running_p99"]["ratio"] == pytest.approx(500 / 700)
    assert rep.figures["api_tree_cpu_per_1000_pods"]["median"] == pytest.approx(3)
    paced = rep.figures["paced_create_to_running_p99"]
    assert paced["median"] == 901 and paced["ratio"] == pytest.approx(600 / 901)
    p99 = rep.figures["create_to_running_p99"]
    assert (p99["median"], p99["min"], p99["max"], p99["baseline_median"]) == (2500, 2000, 3000, 1100)
    assert p99["ratio"] == pytest.approx(1100 / 2500)  # latency: baseline / ours
    assert rep.figures["pods_per_s"]["ratio"] == pytest.approx(50 / 90)  # rate: ours / baseline
    assert rep.figures["tree_rss_per_1000_pods"]["median"] == pytest.approx(20)
    assert rep.figures["tree_cpu_per_1000_pods"]["max"] == pytest.approx(7)
    assert rep.figures["leaf_running_to_root_running_p99"]["median"] == 200
    assert set(rep.figures) == set(tb.UNITS) == set(rep.units)
    aims = next(n for n in rep.notes if n.startswith("aims"))
    assert "burst 2.27x (NOT met), paced 1.50x (met)" in aims
    assert "50 pods/s (NOT met; direct in the same run: 90 pods/s)" in aims
    assert "without the kubelets (api_pods_per_s): 160 pods/s (NOT met; direct 300 pods/s)" in aims
    doc = {"meta": {"repeat": 3}, "tree": suite._to_json(rep)}
    md = suite.render_markdown(doc)
    assert "## tree" in md and "| create_to_running_p99 | ms | 2,500 | 2,000 | 3,000 | 1,100 | 0.44 |" in md
    assert "round 3: tree p50/p99 1100/2500 ms" in md


def test_watches_note_running_in_root_and_leaves_by_phase() -> None:
    with ServerThread(name="benchroot") as root_srv, ServerThread(name="benchleaf") as leaf_srv:
        root, leaf = Api(root_srv.url), Api(leaf_srv.url)
        for api, ns in ((root, tb.TREE_NS), (leaf, tb.TREE_NS), (leaf, tb.DIRECT_NS)):
            api.request("POST", "/api/v1/namespaces", {"apiVersion": "v1", "kind": "Namespace",
                                                        "metadata": {"name": ns}})
        w = tb.Watches(root, [leaf])
        w.start()
        try:
            ph = w.phase = tb.Phase("tree")
            tb.create_all(ph, [(root, tb.pod_body("p-00000", tb.TREE_NS, "l1"))])
            assert set(ph.created) == {"p-00000"}
            copy = tb.pod_body("p-00000-x", tb.TREE_NS, "l1")
            copy["metadata"]["annotations"] = {tb.ROOT_NAME_ANNOTATION: f"{tb.TREE_NS}/p-00000"}
            leaf.request("POST", resource_path("v1", "pods", tb.TREE_NS), copy)
            for api, ns, name in ((leaf, tb.TREE_NS, "p-00000-x"), (root, tb.TREE_NS, "p-00000")):
                path = resource_path("v1", "pods", ns, name)
                pod = api.request("GET", path)
                api.request("PUT", path + "/status", {**pod, "status": {"phase": "Running"}})
            wait_until(lambda: "p-00000" in ph.root and "p-00000" in ph.leaf, 10, "the bench watches to see it")
            assert ph.created["p-00000"] <= ph.leaf["p-00000"] <= time.monotonic()
            assert ph.creates_done >= ph.created["p-00000"] and ph.creates_per_s > 0
            ph2 = w.phase = tb.Phase("direct")  # a direct phase ignores the tree's namespace
            tb.create_all(ph2, [(leaf, tb.pod_body("p-00000", tb.DIRECT_NS, "l1"))])
            path = resource_path("v1", "pods", tb.DIRECT_NS, "p-00000")
            pod = leaf.request("GET", path)
            leaf.request("PUT", path + "/status", {**pod, "status": {"phase": "Running"}})
            wait_until(lambda: "p-00000" in ph2.leaf, 10, "the bench watches to see it")
            assert ph2.root == {}
            wait_until(lambda: w.left() == 3, 10, "the bench watches to see it")
            tb.delete_all([(root, tb.TREE_NS, "p-00000"), (leaf, tb.TREE_NS, "p-00000-x"),
                           (leaf, tb.DIRECT_NS, "p-00000"), (leaf, tb.DIRECT_NS, "gone")])
            wait_until(lambda: w.left() == 0, 10, "the bench watches to see it")
        finally:
            w.stop()


def test_the_bench_kubelet_runs_and_finishes_pods_on_its_node_and_the_host_network_check() -> None:
    with ServerThread(name="benchroot2") as root_srv, ServerThread(name="benchleaf2") as leaf_srv:
        root, leaf = Api(root_srv.url), Api(leaf_srv.url)
        for api in (root, leaf):
            api.request("POST", "/api/v1/namespaces", {"apiVersion": "v1", "kind": "Namespace",
                                                        "metadata": {"name": tb.TREE_NS}})
        leaf.request("POST", resource_path("v1", "nodes"), tb.api_node_body("l1-api", "198.18.0.9", 10))
        kubelet = tb.ApiKubelet([leaf], {"l1-api": "198.18.0.9"})
        w = tb.Watches(root, [leaf])
        w.leaves[0].add_handler(kubelet.handler(0))
        w.start()
        try:
            copy = tb.pod_body("p-00000", tb.TREE_NS, "l1-api")
            copy["metadata"]["annotations"] = {tb.ROOT_NAME_ANNOTATION: f"{tb.TREE_NS}/p-00000"}
            leaf.request("POST", resource_path("v1", "pods", tb.TREE_NS), copy)
            other = tb.pod_body("p-00001", tb.TREE_NS, "l1")  # a real kubelet's node: left alone
            leaf.request("POST", resource_path("v1", "pods", tb.TREE_NS), other)
            running = wait_until(lambda: (p := w.leaves[0].store.get(f"{tb.TREE_NS}/p-00000")) and tb._running(p)
                                 and p, 10, "the bench kubelet to run it")
            assert running["status"]["podIP"] == running["status"]["hostIP"] == "198.18.0.9"
            assert not tb._running(leaf.request("GET", resource_path("v1", "pods", tb.TREE_NS, "p-00001")))
            # the root pod as the tree writes it back: the leaf node's address
            root_pod = tb.pod_body("p-00000", tb.TREE_NS, "l1-api")
            root.request("POST", resource_path("v1", "pods", tb.TREE_NS), root_pod)
            path = resource_path("v1", "pods", tb.TREE_NS, "p-00000")
            got = root.request("GET", path)
            root.request("PUT", path + "/status", {**got, "status": running["status"]})
            wait_until(lambda: tb._running(w.root.store.get(f"{tb.TREE_NS}/p-00000") or {}), 10, "the root watch")
            assert tb.check_host_network(w, {"l1-api": "198.18.0.9"}) == (1, [])
            checked, problems = tb.check_host_network(w, {"l1-api": "198.18.0.7"})
            assert checked == 1 and "leaf node 198.18.0.7" in problems[0]
            tb.delete_all([(leaf, tb.TREE_NS, "p-00000"), (leaf, tb.TREE_NS, "p-00001")])
            wait_until(lambda: f"{tb.TREE_NS}/p-00000" not in w.leaves[0].store, 10, "the copy finished and gone")
            assert kubelet.failures == 0
        finally:
            w.stop()
            kubelet.stop()
