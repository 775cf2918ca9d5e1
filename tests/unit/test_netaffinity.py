"""NetworkAffinity (issue 19, item 4): the ``kosmos.io/network-affinity`` parser (every error), the
pair, filter and score rules on hand-made fleets, the pair table fed by record changes, and the
plugin through the profile's extension points."""

from __future__ import annotations

import json
from typing import Any

import pytest

from fabric.control.api import Record, RecordKey
from fabric.control.reachability import KIND, PUBLISHER, PairState, encode, record_name
from fabric.control.records import RecordsChange
from scheduler import netaffinity as na
from scheduler.framework import Code, CycleState, NodeInfo
from scheduler.netaffinity_records import Reachability
from scheduler.plugins import REGISTRY
from scheduler.plugins.kosmos_netaffinity import REACHABILITY_EVENT, NetworkAffinity
from scheduler.podutil import add_pod, new_node_info, new_pod_info
from scheduler.profile import KOSMOS_SCHEDULER, default_config, resolve_plugins

pytestmark = pytest.mark.unit


def pod(name: str, ann: Any = None, labels: dict[str, str] | None = None, ns: str = "default",
        deleting: bool = False) -> Any:
    meta: dict[str, Any] = {"name": name, "namespace": ns, "uid": f"uid-{name}", "labels": labels or {}}
    if ann is not None:
        meta["annotations"] = {na.ANNOTATION: ann if isinstance(ann, str) else json.dumps(ann)}
    if deleting:
        meta["deletionTimestamp"] = "2026-01-01T00:00:00Z"
    return new_pod_info({"metadata": meta, "spec": {"containers": [{"name": "c"}]}})


def vnode(name: str, cluster: str | None) -> NodeInfo:
    labels = {"kosmos.io/node": "true"}
    if cluster is not None:
        labels["kosmos.io/cluster"] = cluster
    return new_node_info({"metadata": {"name": name, "labels": labels}, "spec": {}, "status": {}})


def rnode(name: str) -> NodeInfo:
    return new_node_info({"metadata": {"name": name, "labels": {}}, "spec": {}, "status": {}})


def on(ni: NodeInfo, *pods: Any) -> NodeInfo:
    for p in pods:
        add_pod(ni, p)
    return ni


def pairs(*states: PairState) -> dict[tuple[str, str], PairState]:
    return {(s.source, s.target): s for s in states}


def up(s: str, t: str, rtt: float | None = None) -> PairState:
    return PairState(s, t, True, "ok", rtt)


def cut(s: str, t: str) -> PairState:
    return PairState(s, t, False, f"{s} gets no answer from {t}")


# --- the parser -------------------------------------------------------------------------------------


def test_parse_forms_and_defaults() -> None:
    assert na.parse(pod("p").pod) is None
    (t,) = na.parse(pod("p", {"service": "db", "maxRttMs": 5, "weight": 80}, ns="app").pod) or []
    assert t.service == ("app", "db") and t.max_rtt_ms == 5.0 and t.weight == 80 and t.selector is None
    # a list, YAML, a podSelector with the pod's namespace by default, then given namespaces
    yaml_ann = "- service: other/db\n- podSelector: {matchLabels: {app: cache}}\n  weight: 1\n"
    a, b = na.parse(pod("p", yaml_ann, ns="app").pod) or []
    assert a.service == ("other", "db") and a.max_rtt_ms is None and a.weight is None
    assert b.selector is not None and b.namespaces == {"app"} and b.selector({"app": "cache"})
    (c,) = na.parse(pod("p", [{"podSelector": {}, "namespaces": ["x", "y"]}]).pod) or []
    assert c.namespaces == {"x", "y"} and c.selector is not None and c.selector({})


@pytest.mark.parametrize(("ann", "field", "says"), [
    ("{not: [json", "", "not JSON or YAML"),
    ("42", "", "a term (an object) or a list of terms"),
    ("[{service: &s db}, {service: *s}]", "", "aliases (*name) are not allowed"),
    ("[" + ",".join(['{"service": "db"}'] * 1000) + "]", "", f"at most {na.MAX_BYTES}"),
    ([], "", "the list of terms is empty"),
    ([{"service": f"s{i}"} for i in range(na.MAX_TERMS + 1)], "", f"at most {na.MAX_TERMS}"),
    (["db"], "[0]", "a term must be an object"),
    ({"service": "db", "maxRTTms": 3}, "[0]", "unknown field(s) ['maxRTTms']"),
    ({"weight": 3}, "[0]", "exactly one target"),
    ({"service": "db", "podSelector": {}}, "[0]", "exactly one target"),
    ({"service": "a/b/c"}, "[0].service", "NAMESPACE/NAME or NAME"),
    ({"service": "Bad_Name"}, "[0].service", "NAMESPACE/NAME or NAME"),
    ({"service": 7}, "[0].service", "NAMESPACE/NAME or NAME"),
    ({"service": "db", "namespaces": ["x"]}, "[0].namespaces", "only with podSelector"),
    ({"podSelector": ["app"]}, "[0].podSelector", "LabelSelector object"),
    ({"podSelector": {"matchLabel": {}}}, "[0].podSelector", "unknown field(s) ['matchLabel']"),
    ({"podSelector": {"matchLabels": {"app": 1}}}, "[0].podSelector.matchLabels", "string values"),
    ({"podSelector": {"matchExpressions": {"key": "a"}}}, "[0].podSelector.matchExpressions", "list of requirements"),
    ({"podSelector": {"matchExpressions": [{"key": "a", "operator": "Near"}]}},
     "[0].podSelector.matchExpressions[0]", "unsupported operator 'Near'"),
    ({"podSelector": {"matchExpressions": [{"key": "a", "operator": "In"}]}},
     "[0].podSelector.matchExpressions[0]", "needs values"),
    ({"podSelector": {}, "namespaces": []}, "[0].namespaces", "non-empty list"),
    ({"podSelector": {}, "namespaces": "x"}, "[0].namespaces", "non-empty list"),
    ({"podSelector": {}, "namespaces": ["Not A Namespace"]}, "[0].namespaces", "non-empty list"),
    ({"service": "db", "maxRttMs": 0}, "[0].maxRttMs", "> 0"),
    ({"service": "db", "maxRttMs": -1.5}, "[0].maxRttMs", "> 0"),
    ({"service": "db", "maxRttMs": "5ms"}, "[0].maxRttMs", "> 0"),
    ({"service": "db", "maxRttMs": True}, "[0].maxRttMs", "> 0"),
    ("{service: db, maxRttMs: .inf}", "[0].maxRttMs", "> 0"),
    ({"service": "db", "weight": 0}, "[0].weight", "from 1 to 100"),
    ({"service": "db", "weight": 101}, "[0].weight", "from 1 to 100"),
    ({"service": "db", "weight": 2.5}, "[0].weight", "from 1 to 100"),
    ({"service": "db", "weight": True}, "[0].weight", "from 1 to 100"),
    ([{"service": "db"}, {"service": "db", "weight": 0}], "[1].weight", "from 1 to 100"),
])  # fmt: skip
def test_every_parse_error_names_the_pod_the_annotation_and_the_field(ann: Any, field: str, says: str) -> None:
    with pytest.raises(na.AnnotationError) as e:
        na.parse(pod("web-1", ann, ns="shop").pod)
    msg = str(e.value)
    assert msg.startswith(f"pod shop/web-1: annotation {na.ANNOTATION}: ")
    assert (f": {field}: " in msg) if field else True
    assert says in msg


# --- the rules --------------------------------------------------------------------------------------


def test_node_cluster() -> None:
    assert na.node_cluster(vnode("v", "c1").node) == "c1"
    assert na.node_cluster(vnode("v", None).node) is None
    assert na.node_cluster(rnode("r").node) == na.ROOT
    assert na.node_cluster(rnode("r").node, "host") == "host"


def test_pair_verdict() -> None:
    p = pairs(up("a", "b", 4.0), up("b", "a", 9.0), up("a", "c"), up("c", "a", 7.0), cut("b", "c"), up("c", "b", 1.0))
    assert na.pair_verdict("a", "a", {}) == na.Verdict(True, 0.0)
    assert na.pair_verdict("a", "b", p).rtt_ms == 4.0  # the candidate's own measurement first
    assert na.pair_verdict("b", "a", p).rtt_ms == 9.0
    assert na.pair_verdict("a", "c", p).rtt_ms == 7.0  # unmeasured one way: the round trip the other way
    v = na.pair_verdict("c", "b", p)  # cut the other way: cut
    assert not v.reachable and "b gets no answer from c" in v.reason
    assert not na.pair_verdict("b", "c", p).reachable
    assert na.pair_verdict("a", "zz", p) == na.Verdict(True, None)  # no record: no answer


def test_term_filter_any_target_cluster_within_max_unknown_passes() -> None:
    (t,) = na.parse(pod("p", {"service": "db", "maxRttMs": 10}).pod) or []
    p = pairs(up("a", "x", 30.0), up("a", "y", 8.0), up("b", "x", 30.0), cut("c", "x"), cut("c", "y"),
              up("d", "x", 12.0), up("e", "x", 50.0))
    xy = frozenset({"x", "y"})
    assert na.term_filter(t, "a", xy, p) == na.TermAnswer(True, 8.0)  # one target cluster near enough
    b = na.term_filter(t, "b", xy, p)  # b -> y: no record: unknown RTT passes, scored as unknown
    assert b.passes and b.best_rtt_ms is None
    c = na.term_filter(t, "c", xy, p)
    assert not c.passes and "unreachable" in c.reason and "service default/db" in c.reason
    d = na.term_filter(t, "d", frozenset({"x"}), p)
    assert not d.passes and d.reason.startswith("node(s) were more than 10 ms RTT") and d.best_rtt_ms == 12.0
    assert na.term_filter(t, "x", xy, p) == na.TermAnswer(True, 0.0)  # in a target cluster
    assert na.term_filter(t, "e", frozenset(), p).passes  # a target that runs nowhere constrains nothing
    assert na.term_filter(t, None, xy, p).passes  # a candidate of unknown cluster too
    # without maxRttMs: only reachability filters
    (free,) = na.parse(pod("p", {"service": "db", "weight": 5}).pod) or []
    assert na.term_filter(free, "e", frozenset({"x"}), p) == na.TermAnswer(True, 50.0)
    assert not na.term_filter(free, "c", xy, p).passes


def test_closeness_is_linear_over_the_candidates_and_unknown_is_lowest() -> None:
    got = na.term_closeness({"n0": 0.0, "n5": 5.0, "n10": 10.0, "n?": None})
    assert got == {"n0": 100, "n5": 50, "n10": 1, "n?": 0}
    assert na.term_closeness({"a": 0.0, "b": 0.0}) == {"a": 100, "b": 100}
    assert na.term_closeness({"a": 3.0}) == {"a": 1}
    assert na.term_closeness({"a": None, "b": None}) == {"a": 0, "b": 0}


def test_raw_score_weights_terms() -> None:
    terms = na.parse(pod("p", [{"service": "a", "weight": 80}, {"service": "b", "weight": 20},
                               {"service": "c", "maxRttMs": 1}]).pod) or []
    close = [{"n1": 100, "n2": 0}, {"n1": 0, "n2": 100}, {"n1": 100, "n2": 100}]
    assert na.raw_score(terms, close, "n1") == 8000 and na.raw_score(terms, close, "n2") == 2000


def test_target_clusters_from_pods_services_and_slices() -> None:
    db = {"app": "db"}
    nodes = [
        on(vnode("kosmos-c1", "c1"), pod("db-0", labels=db)),
        on(vnode("kosmos-c2", "c2"), pod("db-1", labels=db, ns="other"), pod("db-2", labels=db, deleting=True)),
        on(rnode("root-1"), pod("web", labels={"app": "web"})),
        on(vnode("kosmos-c3", "c3")),
        on(vnode("kosmos-x", None), pod("db-3", labels=db)),  # unknown cluster: says nothing
    ]
    services = {"default/db": {"metadata": {"name": "db", "namespace": "default"}, "spec": {"selector": db}},
                "default/ext": {"metadata": {"name": "ext", "namespace": "default"}, "spec": {}}}
    slices = [
        {"metadata": {"namespace": "default", "name": "ext-1", "labels": {na.SERVICE_NAME_LABEL: "ext"}},
         "endpoints": [{"addresses": ["10.0.0.1"], "nodeName": "kosmos-c3"},
                       {"addresses": ["10.0.0.2"], "nodeName": "root-1", "conditions": {"ready": False}}]},
        {"metadata": {"namespace": "default", "name": "ext-imported", "labels": {
            na.SERVICE_NAME_LABEL: "ext", na.SOURCE_CLUSTER_LABEL: "c9"}}, "endpoints": [{"addresses": ["10.9.0.1"]}]},
        {"metadata": {"namespace": "default", "name": "ext-empty", "labels": {
            na.SERVICE_NAME_LABEL: "ext", na.SOURCE_CLUSTER_LABEL: "c8"}}, "endpoints": []},
        {"metadata": {"namespace": "other", "name": "ext-1", "labels": {na.SERVICE_NAME_LABEL: "ext"}},
         "endpoints": [{"addresses": ["10.0.0.3"], "nodeName": "kosmos-c2"}]},
    ]

    def targets(ann: Any, slc: Any = None, root: str = na.ROOT, skip: str = "") -> frozenset[str]:
        (t,) = na.parse(pod("me", ann).pod) or []
        return na.target_clusters(t, nodes, services, slc, root, skip)

    assert targets({"service": "db"}) == {"c1"}  # the selector's pods of its namespace, not terminating
    assert targets({"podSelector": {"matchLabels": db}, "namespaces": ["default", "other"]}) == {"c1", "c2"}
    assert targets({"podSelector": {"matchLabels": {"app": "web"}}}) == {na.ROOT}
    assert targets({"podSelector": {"matchLabels": {"app": "web"}}}, root="host") == {"host"}
    assert targets({"podSelector": {"matchLabels": {"app": "web"}}}, skip="uid-web") == set()
    assert targets({"service": "ext"}) == set()  # no selector, no slice lister: nothing known
    assert targets({"service": "ext"}, slices) == {"c3", "c9"}  # ready endpoints' nodes; imported: the label
    assert targets({"service": "nope"}, slices) == set()


def fleet_pairs() -> dict[tuple[str, str], PairState]:
    """Target cluster t; candidates: near (2 ms), mid (6 ms), far (20 ms), cutoff (cut), new (no record)."""
    return pairs(up("near", "t", 2.0), up("mid", "t", 6.0), up("far", "t", 20.0), cut("cutoff", "t"),
                 up("t", "cutoff", 1.0), up("host", "t", 4.0))


class Handle:
    def __init__(self, nodes: list[NodeInfo], reach: Reachability | None = None, fabric_cluster: str | None = None,
                 services: dict[str, Any] | None = None) -> None:
        self.nodes = nodes
        if reach is not None:
            self.reachability = reach
        self.fabric_cluster = fabric_cluster
        self.services = services or {}

    def snapshot(self) -> Any:
        nodes = self.nodes

        class Snap:
            def node_infos(self) -> list[NodeInfo]:
                return nodes

        return Snap()

    def lister(self, resource: str) -> Any:
        if resource == "services":
            return self.services
        raise KeyError(resource)


def table(states: dict[tuple[str, str], PairState]) -> Reachability:
    r = Reachability()
    r.apply(RecordsChange(1, tuple(Record(KIND, record_name(*k), 1, encode(s), publisher=PUBLISHER)
                                   for k, s in states.items()), (), resynced=True))
    return r


def fleet() -> list[NodeInfo]:
    db = pod("db-0", labels={"app": "db"})
    return [on(vnode("kosmos-t", "t"), db), vnode("kosmos-near", "near"), vnode("kosmos-mid", "mid"),
            vnode("kosmos-far", "far"), vnode("kosmos-cutoff", "cutoff"), vnode("kosmos-new", "new"), rnode("root-1")]


def run_cycle(plugin: NetworkAffinity, p: Any, nodes: list[NodeInfo]) -> tuple[dict[str, str], dict[str, int]]:
    """PreFilter, Filter per node, PreScore, Score, NormalizeScore: (rejected node -> reason, scores)."""
    st = CycleState()
    _, status = plugin.pre_filter(st, p, nodes)
    assert status.ok, status
    rejected = {}
    feasible = []
    for n in nodes:
        f = plugin.filter(st, p, n)
        if f.ok:
            feasible.append(n)
        else:
            assert f.code == Code.UNSCHEDULABLE and f.plugin == "NetworkAffinity"
            rejected[n.name] = f.message()
    if plugin.pre_score(st, p, feasible).code == Code.SKIP:
        return rejected, {}
    scores = {n.name: plugin.score(st, p, n)[0] for n in feasible}
    assert plugin.normalize_score(st, p, scores).ok
    return rejected, scores


def test_plugin_filters_and_scores_a_fleet() -> None:
    nodes = fleet()
    plugin = NetworkAffinity(Handle(nodes, table(fleet_pairs()), "host"), {})
    ann = {"podSelector": {"matchLabels": {"app": "db"}}, "maxRttMs": 10, "weight": 50}
    rejected, scores = run_cycle(plugin, pod("web", ann), nodes)
    assert set(rejected) == {"kosmos-far", "kosmos-cutoff"}
    assert "more than 10 ms" in rejected["kosmos-far"] and "unreachable" in rejected["kosmos-cutoff"]
    # best RTTs: t 0, near 2, host 4, mid 6, new unknown: linear over the worst known (6)
    assert scores == {"kosmos-t": 100, "kosmos-near": 67, "root-1": 34, "kosmos-mid": 1, "kosmos-new": 0}
    assert max(scores, key=lambda k: scores[k]) == "kosmos-t"


def test_plugin_without_records_or_fabric_cluster_knows_only_the_same_cluster() -> None:
    nodes = fleet()
    plugin = NetworkAffinity(Handle(nodes), {})
    rejected, scores = run_cycle(plugin, pod("web", {"podSelector": {"matchLabels": {"app": "db"}}, "maxRttMs": 1,
                                                     "weight": 1}), nodes)
    assert rejected == {} and scores["kosmos-t"] == 100
    assert all(s == 0 for n, s in scores.items() if n != "kosmos-t")


def test_plugin_skips_pods_without_the_annotation_and_refuses_invalid_ones() -> None:
    plugin = NetworkAffinity(Handle(fleet()), {})
    _, st = plugin.pre_filter(CycleState(), pod("plain"), [])
    assert st.code == Code.SKIP
    _, st = plugin.pre_filter(CycleState(), pod("bad", {"service": "db", "weight": 1000}), [])
    assert st.code == Code.UNSCHEDULABLE_AND_UNRESOLVABLE
    assert st.message().startswith(f"pod default/bad: annotation {na.ANNOTATION}: [0].weight")
    # filter-only terms: no score
    s = CycleState()
    plugin.pre_filter(s, pod("f", {"service": "db", "maxRttMs": 3}), [])
    assert plugin.pre_score(s, pod("f"), []).code == Code.SKIP
    with pytest.raises(ValueError, match="fabricCluster"):
        NetworkAffinity(Handle([]), {"fabricCluster": "a/b"})


def test_plugin_args_fabric_cluster_wins_over_the_flag() -> None:
    nodes = fleet()
    ann = {"podSelector": {"matchLabels": {"app": "db"}}, "maxRttMs": 10}
    flag_far = NetworkAffinity(Handle(nodes, table(fleet_pairs()), "far"), {})
    assert "root-1" in run_cycle(flag_far, pod("web", ann), nodes)[0]
    args_host = NetworkAffinity(Handle(nodes, table(fleet_pairs()), "far"), {"fabricCluster": "host"})
    assert "root-1" not in run_cycle(args_host, pod("web", ann), nodes)[0]


def test_registered_and_in_the_kosmos_profile_only() -> None:
    assert REGISTRY["NetworkAffinity"] is NetworkAffinity
    cfg = {p.scheduler_name: p for p in default_config().profiles}
    kosmos = resolve_plugins(cfg[KOSMOS_SCHEDULER], REGISTRY)
    for point in ("preFilter", "filter", "preScore", "score"):
        assert "NetworkAffinity" in [n for n, _ in kosmos[point]], point
    assert dict(kosmos["score"])["NetworkAffinity"] == 2
    assert "NetworkAffinity" not in [n for n, _ in resolve_plugins(cfg["default-scheduler"], REGISTRY)["filter"]]
    assert REACHABILITY_EVENT in tuple(NetworkAffinity(Handle([]), {}).events_to_register())


# --- the pair table ---------------------------------------------------------------------------------


def rec(state: PairState, publisher: str = PUBLISHER, data: bytes | None = None) -> Record:
    return Record(KIND, record_name(state.source, state.target), 1, encode(state) if data is None else data,
                  publisher=publisher)


def test_pair_table_resync_delta_removal_bad_records_and_the_change_callback() -> None:
    moved: list[int] = []
    r = Reachability(on_change=lambda: moved.append(1))
    r.apply(RecordsChange(1, (rec(up("a", "b", 3.0)), rec(up("b", "a"))), (), resynced=True))
    assert r.synced and set(r.pairs()) == {("a", "b"), ("b", "a")} and len(moved) == 1
    before = r.pairs()
    r.apply(RecordsChange(2, (rec(cut("a", "b")),)))
    assert not r.pairs()[("a", "b")].reachable and before[("a", "b")].reachable  # a new table, the old one intact
    # same state again: no callback; another publisher's record of the kind: ignored
    r.apply(RecordsChange(3, (rec(cut("a", "b")), rec(up("a", "c"), publisher="tree/x"))))
    assert len(moved) == 2 and ("a", "c") not in r.pairs()
    # a bad record: refused, the pair keeps its state
    bad = Record(KIND, "a/b", 4, b"{nope", publisher=PUBLISHER)
    r.apply(RecordsChange(4, (bad,)))
    assert "not JSON" in r.refused[bad.key] and not r.pairs()[("a", "b")].reachable
    r.apply(RecordsChange(5, (), (RecordKey(KIND, PUBLISHER, "b/a"),)))
    assert set(r.pairs()) == {("a", "b")}
    r.apply(RecordsChange(6, (rec(up("c", "a")),), (), resynced=True))
    assert set(r.pairs()) == {("c", "a")} and len(moved) == 4


def test_the_readme_example_parses() -> None:
    import pathlib
    import re

    import yaml

    readme = (pathlib.Path(__file__).resolve().parents[2] / "README.md").read_text()
    block = next(b for b in re.findall(r"```yaml\n(.*?)```", readme, re.S) if na.ANNOTATION in b)
    meta = yaml.safe_load(block)["metadata"]
    db, cache = na.parse({"metadata": {"name": "web", "namespace": "app", **meta}}) or []
    assert db.service == ("db", "postgres") and db.max_rtt_ms == 5 and db.weight == 80
    assert cache.namespaces == {"shared"} and cache.weight == 20 and cache.max_rtt_ms is None
