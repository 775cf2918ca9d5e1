"""Fuzzing the configuration readers (issue 20 item 5): the topology file (:mod:`fabric.topology`)
and the Cluster resource validator (:mod:`fabric.crd`, :mod:`fabric.validation`).

Inputs: random YAML text, random YAML/JSON structures, and the files in ``examples/`` (as
topology files, and each of their clusters as a Cluster resource) with one to three mutations
each (a value replaced by another of any type or a near-miss CIDR, name or number; a key removed
or added; a list item duplicated). What must hold:

* the topology loader returns a :class:`~fabric.topology.TopologyFile` or raises
  :class:`~fabric.topology.TopologyError`, never anything else; the error names the file and
  every problem has a key path (``clusters[1].nodes[0].podCIDR`` form) and a reason; whatever it
  accepts is a configuration the reflector accepts too (``validation.config_problems``);
* ``crd.parse_cluster`` returns a :class:`~fabric.crd.ClusterSpec` or raises
  :class:`~fabric.crd.ClusterSpecError` whose problems name the Cluster, a field path and a
  reason; ``crd.resolve`` never raises (invalid Clusters are left out with their problems) and
  the configuration it resolves passes ``validation.config_problems``.

Budget: :mod:`tests.fuzzing`.
"""

from __future__ import annotations

import copy
import datetime
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st

from fabric import crd, topology, validation
from tests.fuzzing import budget

EXAMPLES = sorted((Path(__file__).resolve().parents[2] / "examples").glob("*.yaml"))

NEAR_MISSES: tuple[Any, ...] = (
    "", "east", "East", "a" * 64, "-x", "x-", "e1", "10.10.0.0/16", "10.10.0.1/16", "10.10.0.0/33", "10.10.0.0/0",
    "0.0.0.0/0", "198.18.0.0/16", "198.18.0.11", "100.64.0.0/10", "198.19.0.0/16", "fd00::/64", "fd00::/129",
    "::/0", "10.96.0.0/20", "300.0.0.0/8", "p2p", "gateway", "mesh", "IPv4", "IPv6", "ipv4", "kosmos", "none",
    "host", "cluster", "node", "party=a", "party in (", "4", "8Gi", "-1", "1e9", "*", "eth0", "a/b", "eth0 ",
    "x" * 16, "interface=eth.*", "can-reach=1.2.3.4", "first-found", 0, 1, -1, 64, 65, 2**31, 2**64, 1.5,
    float("nan"), float("inf"), True, False, None, [], {}, ["10.10.0.0/16", "10.10.0.0/16"], {"10.10.0.0/16": 1},
    datetime.date(2020, 1, 1),
)
_scalars = st.one_of(
    st.sampled_from(NEAR_MISSES), st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=20),
)
#: YAML gives mappings with keys of any scalar type, not only strings.
_keys = st.one_of(st.text(max_size=12), st.sampled_from(("name", "podCIDRs", "nodes", "mode", "spec")), st.integers(),
                  st.booleans(), st.none())  # fmt: skip
VALUES = st.recursive(
    _scalars, lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(_keys, inner, max_size=4)),
    max_leaves=12,
)  # fmt: skip


def _paths(doc: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    out = [prefix]
    if isinstance(doc, dict):
        for k, v in doc.items():
            out += _paths(v, (*prefix, k))
    elif isinstance(doc, list):
        for i, v in enumerate(doc):
            out += _paths(v, (*prefix, i))
    return out


def _at(doc: Any, path: tuple[Any, ...]) -> Any:
    for p in path:
        doc = doc[p]
    return doc


@st.composite
def mutated(draw: st.DrawFn, docs: list[Any]) -> Any:
    """One of ``docs`` with one to three structural mutations."""
    doc = copy.deepcopy(draw(st.sampled_from(docs)))
    for _ in range(draw(st.integers(1, 3))):
        path = draw(st.sampled_from(_paths(doc)))
        op = draw(st.sampled_from(("replace", "replace", "delete", "add", "dup")))
        # Drawn values are copied: a later mutation must not change a shared one (NEAR_MISSES).
        if not path:
            if op == "replace":
                doc = copy.deepcopy(draw(VALUES))
            continue
        parent, last = _at(doc, path[:-1]), path[-1]
        if op == "replace":
            parent[last] = copy.deepcopy(draw(VALUES))
        elif op == "delete":
            del parent[last]
        elif op == "add" and isinstance(parent, dict):
            parent[draw(_keys)] = copy.deepcopy(draw(VALUES))
        elif op == "add" and isinstance(parent, list):
            parent.insert(last, copy.deepcopy(draw(VALUES)))
        elif op == "dup" and isinstance(parent, list):
            parent.insert(last, copy.deepcopy(parent[last]))
    return doc


# ---------------------------------------------------------------------------------------------
# The topology file
# ---------------------------------------------------------------------------------------------

TOPOLOGY_DOCS = [yaml.safe_load(p.read_text()) for p in EXAMPLES]


def _check_topology(doc: Any, source: str = "fuzz.yaml") -> None:
    try:
        tf = topology.parse(doc, source)
    except topology.TopologyError as e:
        assert e.source == source and str(e).count(source) >= len(e.problems) >= 1, e
        for path, reason in e.problems:
            assert isinstance(path, str) and reason.strip(), e
        return
    assert validation.config_problems(tf.fabric_config()) == [], doc


def test_examples_are_valid_topologies() -> None:
    """The seeds of the mutations load as they are (so a mutation is what breaks them)."""
    assert len(EXAMPLES) >= 5
    for p in EXAMPLES:
        assert topology.load(p).clusters


@pytest.mark.fuzz
@budget()
@given(mutated(TOPOLOGY_DOCS))
def test_topology_mutated_examples(doc: Any) -> None:
    _check_topology(doc)


@pytest.mark.fuzz
@budget(0.5)
@given(st.one_of(VALUES, st.dictionaries(st.sampled_from(("clusters", "underlay", "bridgeCIDRs", "localCIDRs",
                                                          "kubernetes", "underlay6")), VALUES)))  # fmt: skip
def test_topology_random_structures(doc: Any) -> None:
    _check_topology(doc)


@pytest.mark.fuzz
@budget(0.5)
@given(st.one_of(st.text(max_size=200), mutated(TOPOLOGY_DOCS).map(lambda d: yaml.safe_dump(d))).flatmap(
    lambda text: st.tuples(st.just(text), st.integers(0, len(text)), st.text(max_size=8))
))  # fmt: skip
def test_topology_file_text(tmp_path_factory: pytest.TempPathFactory, case: tuple[str, int, str]) -> None:
    text, pos, insert = case
    p = tmp_path_factory.getbasetemp() / "fuzz-topology.yaml"
    p.write_text(text[:pos] + insert + text[pos:])
    try:
        tf = topology.load(p)
    except topology.TopologyError as e:
        assert str(p) in str(e) and all(reason.strip() for _, reason in e.problems), e
        return
    assert validation.config_problems(tf.fabric_config()) == []


# ---------------------------------------------------------------------------------------------
# The Cluster resource
# ---------------------------------------------------------------------------------------------


def _cluster_objects(tf: topology.TopologyFile) -> list[dict[str, Any]]:
    """Each cluster of a topology file as the Cluster resource that declares it."""
    out = []
    for c in tf.clusters:
        cfg = c.config
        link: dict[str, Any] = {"networkType": cfg.mode.value, "podCIDRs": list(cfg.pod_cidrs)}
        if cfg.service_cidrs:
            link["serviceCIDRs"] = list(cfg.service_cidrs)
        if cfg.gateways:
            link["gatewayCandidates"] = list(cfg.gateways)
        if cfg.active_gateways != 1:
            link["activeGateways"] = cfg.active_gateways
        if cfg.global_cidrs:
            link["globalCIDRsMap"] = dict(cfg.global_cidrs)
        link["ipFamilies"] = [f"IPv{f}" for f in cfg.families]
        out.append({"apiVersion": crd.API_VERSION, "kind": crd.KIND, "metadata": {"name": c.name},
                    "spec": {"clusterLinkOptions": link}})  # fmt: skip
    return out


CLUSTER_OBJECTS = [o for p in EXAMPLES for o in _cluster_objects(topology.load(p))]
CLUSTER_SETS = [_cluster_objects(topology.load(p)) for p in EXAMPLES]


def _check_cluster(obj: Any) -> None:
    try:
        spec = crd.parse_cluster(obj)
    except crd.ClusterSpecError as e:
        assert e.problems, e
        for p in e.problems:
            assert isinstance(p.cluster, str), p  # the name as given ("?" when not a string)
            assert isinstance(p.field, str) and p.field and p.reason.strip(), p
        return
    assert spec.name == obj["metadata"]["name"]


def test_example_clusters_are_valid() -> None:
    assert len(CLUSTER_OBJECTS) >= 8
    for obj in CLUSTER_OBJECTS:
        crd.parse_cluster(obj)
    for objs in CLUSTER_SETS:
        assert not crd.resolve(objs).problems


@pytest.mark.fuzz
@budget()
@given(st.one_of(mutated(CLUSTER_OBJECTS), st.fixed_dictionaries(
    {"apiVersion": st.just(crd.API_VERSION), "kind": st.just(crd.KIND), "metadata": st.just({"name": "fuzz"})},
    optional={"spec": VALUES},
)))  # fmt: skip
def test_cluster_mutated_and_random(obj: Any) -> None:
    if not isinstance(obj, dict):  # callers hand it API objects: mappings
        return
    _check_cluster(obj)


#: Statuses as the reflector writes them (discovery mode: the pod CIDRs in use), and mutated.
STATUSES = [{"clusterLinkStatus": {"podCIDRs": ["10.10.0.0/16"]}}, {"clusterLinkStatus": {"podCIDRs": ["fd00::/64"]}}]


@st.composite
def _cluster_with_status(draw: st.DrawFn) -> Any:
    obj = draw(mutated(CLUSTER_OBJECTS))
    if isinstance(obj, dict) and draw(st.booleans()):
        obj = dict(obj, status=draw(mutated(STATUSES)))
        if draw(st.booleans()) and isinstance(obj.get("spec"), dict):  # discovery mode: no podCIDRs
            link = obj["spec"].get("clusterLinkOptions")
            if isinstance(link, dict):
                link.pop("podCIDRs", None)
    return obj


@pytest.mark.fuzz
@budget(0.5)
@given(st.lists(_cluster_with_status(), max_size=4).map(lambda objs: [o for o in objs if isinstance(o, dict)]))
def test_resolve_never_raises(objs: list[dict[str, Any]]) -> None:
    """As the reflector's Kubernetes source runs it: the Clusters, and what their statuses say
    is in use (``status_pod_cidrs``, anyone with write access to the status writes it)."""
    kept = crd.status_pod_cidrs(objs)
    res = crd.resolve(objs, {name: crd.Discovered(pod_cidrs=p) for name, p in kept.items()})
    assert validation.config_problems(res.config) == [], res
    for name, problems in res.problems.items():
        assert problems and all(p.reason.strip() for p in problems), (name, problems)


# ---------------------------------------------------------------------------------------------
# The crashes the fuzzing found, as plain examples
# ---------------------------------------------------------------------------------------------


def test_non_string_yaml_keys_are_named_in_the_problem() -> None:
    with pytest.raises(topology.TopologyError) as info:
        topology.parse({None: 1, 1.5: 2, "clusters": [{None: None}]}, "t.yaml")
    paths = [p for p, _ in info.value.problems]
    assert all(isinstance(p, str) for p in paths) and "None" in paths and "1.5" in paths, paths
    assert "clusters[0].None" in paths, paths


def test_a_status_with_a_bad_pod_cidr_is_ignored_not_a_crash() -> None:
    obj = {"apiVersion": crd.API_VERSION, "kind": crd.KIND, "metadata": {"name": "east"},
           "spec": {"clusterLinkOptions": {"networkType": "p2p"}},
           "status": {"clusterLinkStatus": {"podCIDRs": ["10.10.0.0/16", "east"]}}}  # fmt: skip
    assert crd.status_pod_cidrs([obj]) == {}
    good = dict(obj, status={"clusterLinkStatus": {"podCIDRs": ["10.10.0.0/16"]}})
    assert crd.status_pod_cidrs([good]) == {"east": ("10.10.0.0/16",)}
