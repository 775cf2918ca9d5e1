"""End to end from the tree manager's bytes to the scheduler's answer (issue 19, gap b): a leaf
node's hard taint, published by ``tree.forge.leaf_resources``, keeps a pod that does not
tolerate it off that leaf node in :class:`scheduler.leafview.LeafView` and in LeafNodeFit."""

from __future__ import annotations

import json

import pytest

from fabric.control.api import Record
from fabric.control.records import RecordsChange
from scheduler.framework import Code, CycleState
from scheduler.leafview import RECORD_KIND, Demand, LeafView, Placement
from scheduler.leafviews import LeafViews
from scheduler.plugins.kosmos_leaffit import REASON, LeafNodeFit
from tests.unit.test_leafview_plugin import Handle, pod, vnode
from tests.unit.test_tree_forge import cluster, forged
from tests.unit.test_tree_leaf_taints import GPU, SOFT, node, tainted
from tree import forge
from tree.spec import read

pytestmark = pytest.mark.unit

TOLERATE_GPU = [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]


def leaf_bytes() -> bytes:
    """A leaf with one big tainted node (8 cpu) and one small untainted one (2 cpu)."""
    nodes = [tainted("big", GPU, SOFT, cpu="8"), node("small", cpu="2")]
    return forge.leaf_resources(forged(read(cluster()), nodes)["kosmos-c1"], "c1")


def test_the_view_refuses_an_untolerating_pod_on_the_tainted_node() -> None:
    view = LeafView("kosmos-c1")
    view.apply_record(leaf_bytes())
    four = Demand.of({"cpu": 4000})
    assert not view.fits(four)  # only "big" has 4 cpu, and the pod does not tolerate its taint
    assert view.count(Demand.of({"cpu": 1000})) == 2  # the untainted node only
    tolerating = Placement(tolerations=TOLERATE_GPU)
    assert view.fits(four, tolerating) and view.count(four, tolerating) == 2
    assert view.best_fit(four, tolerating) == "big"
    assert view.assume("p", four) is None  # nothing to reserve for the untolerating pod


def test_leaf_node_fit_refuses_from_forge_bytes_and_passes_with_the_toleration() -> None:
    views = LeafViews()
    views.apply(RecordsChange(1, (Record(RECORD_KIND, "kosmos-c1", 1, leaf_bytes(), publisher="tree/c1"),), (),
                              resynced=True))
    plugin = LeafNodeFit(Handle(views), {})
    st = plugin.filter(CycleState(), pod("p", "4"), vnode("kosmos-c1"))
    assert st.code == Code.UNSCHEDULABLE and st.reasons == (REASON,)
    sel = json.dumps({"tolerations": TOLERATE_GPU})
    ok = pod("q", "4", {"kosmos.io/cluster-selector": sel})
    assert plugin.filter(CycleState(), ok, vnode("kosmos-c1")).ok
    assert plugin.reserve(CycleState(), ok, "kosmos-c1").ok
    view = views.view("kosmos-c1")
    assert view is not None and [r.node for r in view.reservations.values()] == ["big"]
