"""scheduler.leafview: the per-node view of a leaf against a brute-force oracle (issue 19).

The oracle walks every leaf node for every question, using the upstream plugins' own matching
(:class:`scheduler.selectors.RequiredNodeAffinity` on a Node object, ``find_untolerated``), so
it shares no structure with the view: identical fit answers, counts and best-fit choices are
asserted after random record deltas, whole records, and assume/forget/confirm/expire sequences.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from scheduler.leafview import (
    HOSTNAME_LABEL,
    Demand,
    LeafNode,
    LeafView,
    Placement,
    RecordError,
    make_node,
    parse_record,
)
from scheduler.selectors import RequiredNodeAffinity, find_untolerated
from tests.fuzzing import budget

pytestmark = pytest.mark.unit

GPU = "example.com/gpu"
RESOURCES = ("cpu", "memory", "ephemeral-storage", "pods", GPU, "hugepages-2Mi")
ZONES = ("a", "b", "c")
ARCHES = ("amd64", "arm64")
TAINTS = (
    {"key": "dedicated", "value": "gpu", "effect": "NoSchedule"},
    {"key": "drain", "value": "", "effect": "NoExecute"},
    {"key": "soft", "value": "x", "effect": "PreferNoSchedule"},
)
TOLERATIONS = (
    {"key": "dedicated", "operator": "Equal", "value": "gpu", "effect": "NoSchedule"},
    {"key": "dedicated", "operator": "Exists"},
    {"key": "drain", "operator": "Exists", "effect": "NoExecute"},
    {"operator": "Exists"},
)


# -- the oracle ---------------------------------------------------------------------------------


@dataclass
class OracleNode:
    name: str
    free: dict[str, int]
    labels: dict[str, str]
    taints: list[dict[str, Any]]
    usable: bool
    our: int = 0  # the record's ourPods


@dataclass
class Oracle:
    nodes: dict[str, OracleNode] = field(default_factory=dict)
    #: key -> (node, request with pods=1)
    reserved: dict[str, tuple[str, dict[str, int]]] = field(default_factory=dict)
    confirmed: set[str] = field(default_factory=set)

    def replace(self, n: OracleNode) -> None:
        """A record's new value of a node: if it changed, the reservations on it that the record
        accounts for go: the confirmed ones, and the oldest others up to the rise of ourPods."""
        old = self.nodes.get(n.name)
        if old is not None and _value(old) != _value(n):
            on = [k for k, (node, _) in self.reserved.items() if node == n.name]  # oldest first
            confirmed = [k for k in on if k in self.confirmed]
            rise = max(0, n.our - old.our) - len(confirmed)
            for k in confirmed + [k for k in on if k not in self.confirmed][:max(0, rise)]:
                self.forget(k)
        self.nodes[n.name] = n

    def forget(self, key: str) -> None:
        del self.reserved[key]
        self.confirmed.discard(key)

    def effective(self, n: OracleNode) -> dict[str, int]:
        free = dict(n.free)
        for node, req in self.reserved.values():
            if node == n.name:
                for k, v in req.items():
                    free[k] = free.get(k, 0) - v
        return free

    def admits(self, n: OracleNode, pod: dict[str, Any]) -> bool:
        obj = {"metadata": {"name": n.name, "labels": n.labels}, "spec": {"taints": n.taints}}
        if not RequiredNodeAffinity(pod).match(obj):
            return False
        return find_untolerated(n.taints, pod["spec"].get("tolerations") or []) is None

    def per_node(self, n: OracleNode, req: dict[str, int]) -> int:
        free = self.effective(n)
        best = None
        for k, q in req.items():
            if q <= 0:
                continue
            c = max(0, free.get(k, 0)) // q
            best = c if best is None else min(best, c)
        return best or 0

    def candidates(self, pod: dict[str, Any], req: dict[str, int]) -> list[tuple[int, int, str]]:
        """(pods that fit, free cpu, name) of every node where one fits: the best fit is the least."""
        return [(self.per_node(n, req), max(0, self.effective(n).get("cpu", 0)), n.name) for n in self.nodes.values()
                if n.usable and self.admits(n, pod) and self.per_node(n, req) > 0]

    def fits(self, pod: dict[str, Any], req: dict[str, int]) -> bool:
        return bool(self.candidates(pod, req))

    def count(self, pod: dict[str, Any], req: dict[str, int]) -> int:
        return sum(c for c, _, _ in self.candidates(pod, req))

    def best(self, pod: dict[str, Any], req: dict[str, int]) -> str | None:
        cands = self.candidates(pod, req)
        return min(cands)[2] if cands else None


def _value(n: OracleNode) -> tuple[Any, ...]:
    hard = sorted({(t["key"], t.get("value") or "", t["effect"]) for t in n.taints
                   if t["effect"] in ("NoSchedule", "NoExecute")})
    return ({k: v for k, v in n.free.items() if v > 0}, n.labels, hard, n.usable, n.our)


def full_request(req: dict[str, int]) -> dict[str, int]:
    out = {k: v for k, v in req.items() if k != "pods" and v > 0}
    out["pods"] = 1
    return out


def leaf_node(n: OracleNode) -> LeafNode:
    return make_node(n.name, n.free, n.labels, n.taints, n.usable, n.our)


def placement(pod: dict[str, Any]) -> Placement:
    return Placement.of_leaf_pod(pod)


def check(view: LeafView, oracle: Oracle, pod: dict[str, Any], req: dict[str, int]) -> None:
    d = Demand.of(req)
    r = full_request(req)
    p = placement(pod)
    assert view.fits(d, p) == oracle.fits(pod, r), (pod, req)
    assert view.count(d, p) == oracle.count(pod, r), (pod, req)
    assert view.best_fit(d, p) == oracle.best(pod, r), (pod, req)


# -- random fleets and pods -------------------------------------------------------------------


def random_node(rng: random.Random, name: str) -> OracleNode:
    free: dict[str, int] = {}
    for k, hi in (("cpu", 16), ("memory", 64), ("ephemeral-storage", 8), ("pods", 12)):
        if rng.random() < 0.9:
            free[k] = rng.randint(0, hi) * (250 if k == "cpu" else 1)
    if rng.random() < 0.3:
        free[GPU] = rng.randint(0, 8)
    if rng.random() < 0.1:
        free["hugepages-2Mi"] = rng.randint(0, 4)
    labels = {HOSTNAME_LABEL: name}
    if rng.random() < 0.9:
        labels["topology.kubernetes.io/zone"] = rng.choice(ZONES)
    if rng.random() < 0.8:
        labels["kubernetes.io/arch"] = rng.choice(ARCHES)
    taints = [dict(t) for t in TAINTS if rng.random() < 0.15]
    return OracleNode(name, free, labels, taints, usable=rng.random() < 0.92, our=rng.randint(0, 3))


def random_pod(rng: random.Random, names: list[str]) -> tuple[dict[str, Any], dict[str, int]]:
    req: dict[str, int] = {}
    if rng.random() < 0.9:
        req["cpu"] = rng.randint(0, 12) * 250
    if rng.random() < 0.7:
        req["memory"] = rng.randint(0, 24)
    if rng.random() < 0.2:
        req["ephemeral-storage"] = rng.randint(1, 4)
    if rng.random() < 0.2:
        req[GPU] = rng.randint(1, 4)
    if rng.random() < 0.05:
        req["hugepages-2Mi"] = rng.randint(1, 2)
    spec: dict[str, Any] = {}
    if rng.random() < 0.3:
        spec["nodeSelector"] = {"topology.kubernetes.io/zone": rng.choice(ZONES)}
    if rng.random() < 0.05 and names:
        spec["nodeSelector"] = {HOSTNAME_LABEL: rng.choice(names)}
    r = rng.random()
    if r < 0.3:
        terms = []
        for _ in range(rng.randint(0, 2)):
            op = rng.choice(("In", "NotIn", "Exists", "DoesNotExist"))
            key = rng.choice(("topology.kubernetes.io/zone", "kubernetes.io/arch"))
            e: dict[str, Any] = {"key": key, "operator": op}
            if op in ("In", "NotIn"):
                e["values"] = rng.sample(ZONES if "zone" in key else ARCHES, rng.randint(1, 2))
            terms.append({"matchExpressions": [e]})
        spec["affinity"] = {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution":
                                             {"nodeSelectorTerms": terms}}}
    elif r < 0.38 and names:
        sample = rng.sample(names, min(len(names), rng.randint(1, 3)))
        term = ({"matchFields": [{"key": "metadata.name", "operator": "In", "values": [sample[0]]}]}
                if rng.random() < 0.5 else
                {"matchExpressions": [{"key": HOSTNAME_LABEL, "operator": "In", "values": sample}]})
        spec["affinity"] = {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution":
                                             {"nodeSelectorTerms": [term]}}}
    if rng.random() < 0.3:
        spec["tolerations"] = [dict(t) for t in TOLERATIONS if rng.random() < 0.4]
    return {"metadata": {"name": "p"}, "spec": spec}, req


def run_sequence(seed: int, size: int, steps: int) -> None:
    """A random fleet of ``size`` nodes, then ``steps`` random operations; the view and the oracle
    must agree on every question after every operation."""
    rng = random.Random(seed)
    oracle = Oracle()
    view = LeafView("kosmos-x", tracked=rng.choice((1, 4, 64)))
    for i in range(size):
        n = random_node(rng, f"n{i}")
        oracle.nodes[n.name] = n
        view.upsert_node(leaf_node(n))
    pods = [random_pod(rng, list(oracle.nodes)) for _ in range(6)]  # recurring shapes: tracked path
    serial = size
    keys = 0
    for _ in range(steps):
        op = rng.random()
        names = list(oracle.nodes)
        if op < 0.35:
            pod, req = rng.choice(pods) if rng.random() < 0.7 else random_pod(rng, names)
            check(view, oracle, pod, req)
        elif op < 0.5 and names:  # one leaf node changed
            name = rng.choice(names)
            n = random_node(rng, name)
            oracle.nodes[name] = n
            view.upsert_node(leaf_node(n))
        elif op < 0.55:  # a node joins
            n = random_node(rng, f"n{serial}")
            serial += 1
            oracle.nodes[n.name] = n
            view.upsert_node(leaf_node(n))
        elif op < 0.6 and names:  # a node leaves: its reservations go with it
            name = rng.choice(names)
            del oracle.nodes[name]
            for k in [k for k, v in oracle.reserved.items() if v[0] == name]:
                oracle.forget(k)
            view.remove_node(name)
        elif op < 0.8:
            pod, req = rng.choice(pods) if rng.random() < 0.7 else random_pod(rng, names)
            key = f"k{keys}"
            keys += 1
            r = full_request(req)
            expect = oracle.best(pod, r)
            got = view.assume(key, Demand.of(req), placement(pod))
            assert got == expect
            if got is not None:
                oracle.reserved[key] = (got, r)
        elif op < 0.88 and oracle.reserved:
            key = rng.choice(sorted(oracle.reserved))
            oracle.forget(key)
            assert view.forget(key)
        elif op < 0.93 and oracle.reserved:  # the leaf bound it, maybe on another node than ours
            key = rng.choice(sorted(oracle.reserved))
            node = rng.choice(names) if rng.random() < 0.3 else None
            view.confirm(key, node)
            if node is not None:
                oracle.reserved[key] = (node, oracle.reserved[key][1])
            oracle.confirmed.add(key)
        else:  # a whole record: a few nodes changed, maybe one gone and one new, the rest identical
            before = {n.name: n for n in oracle.nodes.values()}
            for name in rng.sample(names, min(len(names), rng.randint(0, 3))):
                oracle.replace(random_node(rng, name))
            if names and rng.random() < 0.3:
                gone = rng.choice(names)
                for k in [k for k, v in oracle.reserved.items() if v[0] == gone]:
                    oracle.forget(k)
                del oracle.nodes[gone]
            if rng.random() < 0.3:
                oracle.replace(random_node(rng, f"n{serial}"))
                serial += 1
            changed = sum(1 for n in oracle.nodes.values() if n.name not in before
                          or _value(n) != _value(before[n.name])) + len(set(before) - set(oracle.nodes))
            assert view.apply_record(_record_of(oracle)) == changed
        assert set(view.reservations) == set(oracle.reserved)
    for pod, req in pods:
        check(view, oracle, pod, req)


def _record_of(oracle: Oracle) -> bytes:
    """A v1 record of the oracle's fleet, with per-node taints (read when present)."""
    def q(k: str, v: int) -> str:
        return f"{v}m" if k == "cpu" else str(v)
    return json.dumps({
        "schema": "tree.kosmos.io/leaf-resources/v1", "cluster": "x", "virtualNode": "kosmos-x", "ready": True,
        "nodes": [{"name": n.name, "ready": n.usable, "schedulable": True, "labels": n.labels, "taints": n.taints,
                   "free": {k: q(k, v) for k, v in n.free.items()}, "pods": 0, "ourPods": n.our}
                  for n in oracle.nodes.values()],
    }).encode()


# -- properties -------------------------------------------------------------------------------


@pytest.mark.fuzz
@budget(0.5)
@given(seed=st.integers(0, 2**32 - 1), size=st.integers(0, 300))
def test_large_random_fleets_agree_with_the_oracle(seed: int, size: int) -> None:
    run_sequence(seed, size, steps=40)


@pytest.mark.fuzz
@budget()
@given(seed=st.integers(0, 2**32 - 1), size=st.integers(0, 12))
def test_small_fleets_long_sequences_agree_with_the_oracle(seed: int, size: int) -> None:
    run_sequence(seed, size, steps=120)


free_vectors = st.dictionaries(st.sampled_from(RESOURCES), st.integers(0, 6), max_size=6)


@pytest.mark.fuzz
@budget()
@given(fleet=st.lists(st.tuples(free_vectors, st.sampled_from(ZONES), st.booleans()), max_size=15),
       requests=st.lists(st.dictionaries(st.sampled_from(RESOURCES), st.integers(0, 4), max_size=4),
                         min_size=1, max_size=5),
       zone=st.none() | st.sampled_from(ZONES))
def test_counts_and_fits_match_brute_force(fleet: list[tuple[dict[str, int], str, bool]],
                                           requests: list[dict[str, int]], zone: str | None) -> None:
    """Hypothesis-built fleets (shrinkable): same answers, also after reserving each answer."""
    oracle = Oracle()
    view = LeafView()
    for i, (free, z, tainted) in enumerate(fleet):
        n = OracleNode(f"n{i}", free, {HOSTNAME_LABEL: f"n{i}", "topology.kubernetes.io/zone": z},
                       [dict(TAINTS[0])] if tainted else [], True)
        oracle.nodes[n.name] = n
        view.upsert_node(leaf_node(n))
    pod = {"spec": {"nodeSelector": {"topology.kubernetes.io/zone": zone}} if zone else {}}
    for j, req in enumerate(requests * 2):
        check(view, oracle, pod, req)
        got = view.assume(f"k{j}", Demand.of(req), placement(pod))
        if got is not None:
            oracle.reserved[f"k{j}"] = (got, full_request(req))
        check(view, oracle, pod, req)


# -- examples -----------------------------------------------------------------------------------


def _fleet(view: LeafView, n: int, cpu: int, pods: int = 110) -> None:
    for i in range(n):
        view.upsert_node(make_node(f"n{i}", {"cpu": cpu, "memory": 64 << 30, "pods": pods},
                                   {HOSTNAME_LABEL: f"n{i}"}))


def test_a_pod_bigger_than_every_node_does_not_fit_though_the_sum_would() -> None:
    """Karmada #521: ten nodes with 8 free CPUs (80 in sum) cannot host a 12-CPU pod."""
    view = LeafView()
    _fleet(view, 10, 8000)
    assert not view.fits(Demand.of({"cpu": 12000}))
    assert view.count(Demand.of({"cpu": 12000})) == 0
    assert view.count(Demand.of({"cpu": 3000})) == 20  # 2 per node, not 80 // 3 = 26


def test_the_issue_lab_leaf_two_free_cpus_each() -> None:
    view = LeafView()
    _fleet(view, 8, 2000)  # 16 CPUs in sum
    assert not view.fits(Demand.of({"cpu": 3000}))
    assert view.count(Demand.of({"cpu": 1000})) == 16


def test_pods_slots_bound_the_count() -> None:
    view = LeafView()
    _fleet(view, 3, 64000, pods=2)
    assert view.count(Demand.of({"cpu": 100})) == 6
    assert view.count(Demand.of({})) == 6


def test_reservations_count_until_forgotten_and_go_to_the_best_fit() -> None:
    view = LeafView()
    view.upsert_node(make_node("big", {"cpu": 8000, "pods": 10}))
    view.upsert_node(make_node("small", {"cpu": 3000, "pods": 10}))
    d = Demand.of({"cpu": 3000})
    assert view.assume("a", d) == "small"  # 1 fits there, 2 on big: the tightest
    assert view.count(d) == 2
    assert view.assume("b", d) == "big"
    assert view.assume("c", d) == "big"
    assert view.assume("d", d) is None
    assert not view.fits(d)
    assert view.forget("b")
    assert not view.forget("b")
    assert view.count(d) == 1
    assert view.free_of("big") == {"cpu": 5000, "pods": 9}


def test_a_confirmed_reservation_goes_with_the_next_record() -> None:
    view = LeafView("kosmos-x")
    rec: dict[str, Any] = {"schema": "tree.kosmos.io/leaf-resources/v1", "nodes": [
        {"name": "n0", "ready": True, "schedulable": True, "free": {"cpu": "4", "memory": "8Gi", "pods": "10"},
         "labels": {HOSTNAME_LABEL: "n0"}}]}
    view.apply_record(rec)
    d = Demand.of({"cpu": 2000})
    assert view.assume("p", d) == "n0"
    view.confirm("p")
    assert view.count(d) == 1  # still reserved: the record does not count it yet
    rec["nodes"][0]["free"] = {"cpu": "2", "memory": "8Gi", "pods": "9"}  # the leaf bound it
    assert view.apply_record(json.dumps(rec)) == 1
    assert "p" not in view.reservations
    assert view.count(d) == 1  # counted once, by the record


def test_an_unconfirmed_reservation_expires() -> None:
    now = [100.0]
    view = LeafView(clock=lambda: now[0])
    _fleet(view, 1, 4000)
    d = Demand.of({"cpu": 4000})
    assert view.assume("p", d, ttl=30) == "n0"
    assert view.assume("q", d) is None
    assert view.expire() == []
    now[0] = 130.0
    assert view.expire() == ["p"]
    assert view.fits(d)


def test_a_reservation_moved_by_the_leafs_choice_keeps_its_deadline() -> None:
    now = [0.0]
    view = LeafView(clock=lambda: now[0])
    _fleet(view, 2, 4000)
    d = Demand.of({"cpu": 3000})
    assert view.assume("p", d, ttl=10) == "n0"
    view.confirm("p", "n1")  # the leaf put it on n1
    assert view.reservations["p"].node == "n1" and view.reservations["p"].confirmed
    assert view.free_of("n0") == {"cpu": 4000, "memory": 64 << 30, "pods": 110}
    now[0] = 10.0
    assert view.expire() == ["p"]
    assert view.count(d) == 2


def test_our_pods_rising_on_a_node_releases_as_many_of_its_oldest_reservations() -> None:
    def rec(cpu: str, ours: int) -> bytes:
        return json.dumps({"schema": "tree.kosmos.io/leaf-resources/v1", "nodes": [
            {"name": "n0", "ready": True, "schedulable": True, "ourPods": ours,
             "free": {"cpu": cpu, "pods": "10"}}]}).encode()

    view = LeafView()
    view.apply_record(rec("6", 0))
    d = Demand.of({"cpu": 2000})
    assert [view.assume(k, d) for k in ("a", "b", "c")] == ["n0", "n0", "n0"]
    assert view.apply_record(rec("4", 1)) == 1  # one of ours landed: the oldest goes
    assert list(view.reservations) == ["b", "c"]
    assert view.count(d) == 0
    view.confirm("c")
    assert view.apply_record(rec("0", 3)) == 1  # two more: the confirmed one, then the oldest other
    assert list(view.reservations) == []
    assert view.count(d) == 0


def test_a_confirmed_reservation_stays_through_a_record_written_before_the_bind() -> None:
    view = LeafView()
    node = make_node("n0", {"cpu": 4000, "pods": 10})
    view.upsert_node(node)
    view.upsert_node(make_node("n1", {"cpu": 1000, "pods": 10}))
    d = Demand.of({"cpu": 3000})
    assert view.assume("p", d) == "n0"
    view.confirm("p")
    assert view.apply_record(parse_record(json.dumps({
        "schema": "tree.kosmos.io/leaf-resources/v1", "nodes": [
            {"name": "n0", "ready": True, "schedulable": True, "free": {"cpu": "4", "pods": "10"}},
            {"name": "n1", "ready": True, "schedulable": True, "free": {"cpu": "2", "pods": "10"}}]}))) == 1
    assert "p" in view.reservations  # n0 did not move: that record predates the bind
    assert not view.fits(d)


def test_structure_classes_ignore_the_hostname() -> None:
    view = LeafView()
    for i in range(300):
        view.upsert_node(make_node(f"n{i}", {"cpu": 1000 * (i % 4), "pods": 10},
                                   {HOSTNAME_LABEL: f"n{i}", "topology.kubernetes.io/zone": ZONES[i % 2]}))
    assert view.class_count == 2
    assert view.shape_count == 4  # zone a: cpu 0 or 2000; zone b: 1000 or 3000


def test_fits_tracks_a_demand_asked_twice_and_count_at_once() -> None:
    view = LeafView(tracked=2)
    _fleet(view, 4, 4000)
    a, b, c = Demand.of({"cpu": 1000}), Demand.of({"cpu": 2000}), Demand.of({"cpu": 3000})
    assert view.fits(a) and view.tracked == ()
    assert view.fits(a) and view.tracked == (a,)
    assert view.count(b) == 8 and view.tracked == (a, b)
    assert view.count(c) == 4 and view.tracked == (b, c)  # the least recently asked goes


def test_the_placement_cache_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    import scheduler.leafview as lv

    monkeypatch.setattr(lv, "MATCH_CACHE", 3)
    view = LeafView()
    _fleet(view, 2, 1000)
    for i in range(10):
        assert not view.fits(Demand.of({"cpu": 100}), Placement({"app": str(i)}))
        assert len(view._matches) <= 3
    assert view.fits(Demand.of({"cpu": 100}), Placement())


def test_an_unchanged_record_changes_nothing_and_a_delta_moves_one_node() -> None:
    view = LeafView()
    oracle = Oracle()
    rng = random.Random(7)
    for i in range(50):
        n = random_node(rng, f"n{i}")
        oracle.nodes[n.name] = n
    assert view.apply_record(_record_of(oracle)) == 50
    d = Demand.of({"cpu": 500})
    before = view.count(d)
    assert view.apply_record(_record_of(oracle)) == 0
    assert view.count(d) == before
    oracle.nodes["n3"] = OracleNode("n3", {"cpu": 16000, "pods": 100}, {HOSTNAME_LABEL: "n3"}, [], True)
    assert view.apply_record(_record_of(oracle)) == 1
    assert view.count(d) == oracle.count({"spec": {}}, full_request({"cpu": 500}))


def test_a_record_from_the_tree_manager_reads() -> None:
    """The bytes ``tree.forge.leaf_resources`` writes (a ready node, an unschedulable one)."""
    from tree.forge import LeafRoom, VirtualNode, leaf_resources
    from tree.spec import Mode

    rooms = (LeafRoom("a", True, True, {"cpu": "8", "memory": "16Gi", "pods": "110"},
                      {"cpu": "2500m", "memory": "4Gi", "pods": "100", GPU: "1"}, 10, 2,
                      {HOSTNAME_LABEL: "a", "topology.kubernetes.io/zone": "z1"}),
             LeafRoom("b", True, False, {"cpu": "8"}, {"cpu": "8", "memory": "16Gi", "pods": "110"}, 0, 0,
                      {HOSTNAME_LABEL: "b"}))
    vn = VirtualNode(name="kosmos-c1", mode=Mode.CLUSTER, model="", labels={}, taints=[], resources={},
                     ready="True", reason="LeafReady", message="", leaves=rooms)
    rec = parse_record(leaf_resources(vn, "c1"))
    assert rec.virtual_node == "kosmos-c1" and rec.cluster == "c1" and rec.ready
    view = LeafView()
    view.apply_record(rec)
    assert view.count(Demand.of({"cpu": 1000})) == 2  # b is unschedulable
    assert view.fits(Demand.of({"cpu": 2000, GPU: 1}),
                     Placement({"topology.kubernetes.io/zone": "z1"}))
    assert not view.fits(Demand.of({"cpu": 1000}), Placement({"topology.kubernetes.io/zone": "z2"}))
    assert view.free_of("a")["memory"] == 4 << 30


@pytest.mark.parametrize(("doc", "message"), [
    (b"{", "not JSON"),
    (b"[]", "expected a JSON object"),
    (b'{"schema": "v0"}', "schema 'v0'"),
    (b'{"schema": "tree.kosmos.io/leaf-resources/v1", "nodes": [{"free": {}}]}', "nodes[0]"),
    (b'{"schema": "tree.kosmos.io/leaf-resources/v1", "nodes": [{"name": "n", "free": {"cpu": "x"}}]}',
     "nodes[0].free.cpu"),
    (b'{"schema": "tree.kosmos.io/leaf-resources/v1", "nodes": [{"name": "n", "ourPods": -1}]}', "nodes[0].ourPods"),
    (b'{"schema": "tree.kosmos.io/leaf-resources/v1", "nodes": [{"name": "n"}, {"name": "n"}]}', "listed twice"),
])
def test_a_bad_record_is_refused_naming_the_field(doc: bytes, message: str) -> None:
    with pytest.raises(RecordError, match="kosmos-q") as e:
        parse_record(doc, "record kosmos-q")
    assert message in str(e.value)


def test_the_root_pods_cluster_selector_is_the_leaf_placement() -> None:
    ann = {"nodeSelector": {"topology.kubernetes.io/zone": "z1"},
           "tolerations": [{"key": "dedicated", "operator": "Exists"}]}
    pod = {"metadata": {"annotations": {"kosmos.io/cluster-selector": json.dumps(ann)}},
           "spec": {"nodeSelector": {"kosmos.io/node": "true"}}}
    p = Placement.of_root_pod(pod)
    taint = ("dedicated", "gpu", "NoSchedule")
    assert p.admits({"topology.kubernetes.io/zone": "z1"}, "n", [taint])
    assert not p.admits({"topology.kubernetes.io/zone": "z2"}, "n", [])
    bare = Placement.of_root_pod({"metadata": {}, "spec": {"nodeSelector": {"kosmos.io/node": "true"}}})
    assert bare.admits({}, "n", []) and not bare.admits({}, "n", [taint])


def _pending_record(pending: list[dict[str, Any]]) -> dict[str, Any]:
    return {"schema": "tree.kosmos.io/leaf-resources/v1", "mode": "cluster", "pending": pending, "nodes": [
        {"name": f"n{i}", "ready": True, "schedulable": True, "free": {"cpu": "2", "memory": "8Gi", "pods": "10"},
         "labels": {HOSTNAME_LABEL: f"n{i}"}} for i in range(2)]}


def test_the_leafs_pending_pods_hold_room_until_they_land() -> None:
    """Two nodes with 2 free CPUs: a Pending 2-CPU leaf pod will take one of them, so one more
    2-CPU pod fits, not two; a second Pending one leaves none; when the record no longer lists
    them (bound, counted in a node's free, or gone) the room is the record's again."""
    view = LeafView("kosmos-x")
    d = Demand.of({"cpu": 2000})
    view.apply_record(_pending_record([]))
    assert view.count(d) == 2
    view.apply_record(_pending_record([{"requests": {"cpu": "2"}}]))
    assert view.count(d) == 1 and view.fits(d)
    view.apply_record(_pending_record([{"requests": {"cpu": "2"}}, {"requests": {"cpu": "1500m"}}]))
    assert not view.fits(d) and view.count(Demand.of({"cpu": 500})) == 1
    view.apply_record(_pending_record([]))
    assert view.count(d) == 2 and not view.reservations


def test_a_pending_copy_of_ours_is_held_once_by_its_reservation_then_by_the_record() -> None:
    now = [0.0]
    view = LeafView("kosmos-x", clock=lambda: now[0])
    d = Demand.of({"cpu": 2000})
    view.apply_record(_pending_record([]))
    assert view.assume("ns/web/uid-1", d, ttl=30) is not None  # the scheduler's reservation
    view.apply_record(_pending_record([{"requests": {"cpu": "2"}, "rootUID": "uid-1"}]))
    assert view.count(d) == 1  # not twice: the reservation already holds it
    now[0] = 31.0
    assert view.expire() == ["ns/web/uid-1"]
    assert view.count(d) == 1  # still Pending in the leaf: the record's entry holds it now


def test_a_bad_pending_entry_names_the_field() -> None:
    with pytest.raises(RecordError, match=r"pending\[0\]"):
        LeafView("kosmos-x").apply_record(json.dumps(_pending_record([{"requests": {"cpu": "lots"}}])))
