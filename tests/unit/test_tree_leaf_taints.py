"""The leaf-resources record carries each leaf node's hard taints (issue 19, gap b): without them
a tainted leaf node counts as free room for every pod."""

from __future__ import annotations

import json
from typing import Any

import pytest

from tests.unit.test_tree_forge import cluster, forged, node
from tree import forge
from tree.spec import read

pytestmark = pytest.mark.unit

Obj = dict[str, Any]


def tainted(name: str, *taints: Obj, **kw: Any) -> Obj:
    n = node(name, **kw)
    n["spec"]["taints"] = list(taints)
    return n


GPU = {"key": "nvidia.com/gpu", "value": "true", "effect": "NoSchedule"}
DEDICATED = {"key": "dedicated", "value": "db", "effect": "NoExecute"}
SOFT = {"key": "spot", "value": "true", "effect": "PreferNoSchedule"}
LIFECYCLE = {"key": "node.kubernetes.io/memory-pressure", "effect": "NoSchedule"}


def record_nodes(nodes: list[Obj]) -> dict[str, Obj]:
    vn = forged(read(cluster()), nodes)["kosmos-c1"]
    doc = json.loads(forge.leaf_resources(vn, "c1"))
    assert doc["schema"] == forge.RECORD_SCHEMA  # an added field old readers skip: no bump
    return {n["name"]: n for n in doc["nodes"]}


def test_hard_taints_are_published_sorted_without_soft_or_lifecycle_ones() -> None:
    got = record_nodes([tainted("a", GPU, SOFT, DEDICATED, LIFECYCLE), tainted("b", SOFT, LIFECYCLE), node("c")])
    assert got["a"]["taints"] == [{"key": "dedicated", "value": "db", "effect": "NoExecute"},
                                  {"key": "nvidia.com/gpu", "value": "true", "effect": "NoSchedule"}]
    # nothing hard left: the entry is exactly what an untainted node's was (no key at all)
    assert "taints" not in got["b"] and "taints" not in got["c"]
    assert set(got["b"]) == set(got["c"])


def test_taint_order_and_duplicates_do_not_move_the_bytes() -> None:
    spec = read(cluster())
    one = forged(spec, [tainted("a", GPU, DEDICATED)])["kosmos-c1"]
    two = forged(spec, [tainted("a", DEDICATED, GPU, dict(GPU))])["kosmos-c1"]
    assert forge.leaf_resources(one, "c1") == forge.leaf_resources(two, "c1")
    three = forged(spec, [tainted("a", DEDICATED)])["kosmos-c1"]
    assert forge.leaf_resources(three, "c1") != forge.leaf_resources(one, "c1")


def test_a_malformed_taint_is_skipped_not_fatal() -> None:
    got = record_nodes([tainted("a", "junk", {"key": "x"}, GPU)])  # type: ignore[arg-type]
    assert got["a"]["taints"] == [{"key": "nvidia.com/gpu", "value": "true", "effect": "NoSchedule"}]


def test_a_not_ready_or_cordoned_node_keeps_its_taints_in_the_record() -> None:
    got = record_nodes([tainted("a", GPU, ready=False), tainted("b", GPU, unschedulable=True)])
    assert got["a"]["taints"] == got["b"]["taints"] == [GPU]
