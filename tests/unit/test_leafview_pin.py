"""LeafNodeFit's PreBind (issue 19, "never strand a pod"): the leaf node a reservation holds room
on is written on the root pod (``kosmos.io/leaf-node``) for ``tree: cluster`` virtual nodes with
a view and a reservation, through the handle's API client, and nothing otherwise; the built-in
``kosmos-scheduler`` profile runs it at preBind; ``pinLeafNode: false`` turns it off."""

from __future__ import annotations

import json
from typing import Any

import pytest

from fabric.control.records import RecordsChange
from scheduler.framework import Code, CycleState
from scheduler.leafviews import LeafViews
from scheduler.plugins import REGISTRY
from scheduler.plugins.kosmos_leaffit import LEAF_NODE_ANNOTATION, LeafNodeFit
from scheduler.profile import KOSMOS_SCHEDULER, build_profiles, default_config
from tests.unit.test_leafview_plugin import pod, record

pytestmark = pytest.mark.unit


class _Api:
    """Records the merge patches PreBind sends; ``fail`` makes them raise."""

    def __init__(self, fail: Exception | None = None) -> None:
        self.patches: list[tuple[str, Any]] = []
        self.fail = fail

    def patch(self, path: str, body: Any) -> Any:
        if self.fail is not None:
            raise self.fail
        self.patches.append((path, body))
        return {}


class _H:
    def __init__(self, views: LeafViews | None, api: _Api | None) -> None:
        if views is not None:
            self.leaf_views = views
        if api is not None:
            self.api = api

    def snapshot(self) -> Any:
        raise NotImplementedError

    def lister(self, resource: str) -> Any:
        return {}


def views_of(mode: str = "cluster") -> LeafViews:
    views = LeafViews()
    rec = record("kosmos-c1", {"n-big": "8", "n-tight": "2", "n-mid": "4"})
    if mode != "cluster":
        doc = json.loads(rec.data)
        doc["mode"] = mode
        rec = type(rec)(rec.kind, rec.name, rec.version, json.dumps(doc).encode(), publisher=rec.publisher)
    views.apply(RecordsChange(1, (rec,), (), resynced=True))
    return views


def test_pre_bind_pins_the_reserved_leaf_node_on_the_root_pod() -> None:
    api = _Api()
    plugin = LeafNodeFit(_H(views_of(), api), {})
    p = pod("web", "2")
    state = CycleState()
    assert plugin.reserve(state, p, "kosmos-c1").ok
    assert plugin.pre_bind(state, p, "kosmos-c1").ok
    # best fit for 2 CPUs is the 2-CPU node; the patch names the pod's UID (a precondition)
    assert api.patches == [("/api/v1/namespaces/default/pods/web",
                            {"metadata": {"uid": "uid-web", "annotations": {LEAF_NODE_ANNOTATION: "n-tight"}}})]


def test_pre_bind_writes_nothing_without_a_view_a_reservation_or_in_other_modes() -> None:
    p = pod("web", "2")
    for views, node in ((None, "kosmos-c1"), (views_of(), "kosmos-other"), (views_of("node"), "kosmos-c1"),
                        (views_of("party"), "kosmos-c1")):
        api = _Api()
        plugin = LeafNodeFit(_H(views, api), {})
        state = CycleState()
        assert plugin.reserve(state, p, node).ok
        assert plugin.pre_bind(state, p, node).ok
        assert api.patches == [], (views, node)
    api = _Api()
    plugin = LeafNodeFit(_H(views_of(), api), {})
    assert plugin.pre_bind(CycleState(), p, "kosmos-c1").ok  # no reservation
    assert api.patches == []


def test_a_stale_pin_from_an_earlier_cycle_is_removed_and_a_current_one_not_rewritten() -> None:
    api = _Api()
    plugin = LeafNodeFit(_H(views_of("node"), api), {})
    stale = pod("web", "2", annotations={LEAF_NODE_ANNOTATION: "n-of-another-leaf"})
    state = CycleState()
    assert plugin.reserve(state, stale, "kosmos-c1").ok and plugin.pre_bind(state, stale, "kosmos-c1").ok
    assert api.patches == [("/api/v1/namespaces/default/pods/web",
                            {"metadata": {"uid": "uid-web", "annotations": {LEAF_NODE_ANNOTATION: None}}})]
    api = _Api()
    plugin = LeafNodeFit(_H(views_of(), api), {})
    current = pod("web", "2", annotations={LEAF_NODE_ANNOTATION: "n-tight"})
    state = CycleState()
    assert plugin.reserve(state, current, "kosmos-c1").ok and plugin.pre_bind(state, current, "kosmos-c1").ok
    assert api.patches == []


def test_pin_off_and_a_failed_write_and_no_client() -> None:
    p = pod("web", "2")
    api = _Api()
    plugin = LeafNodeFit(_H(views_of(), api), {"pinLeafNode": False})
    state = CycleState()
    assert plugin.reserve(state, p, "kosmos-c1").ok and plugin.pre_bind(state, p, "kosmos-c1").ok
    assert api.patches == []
    with pytest.raises(ValueError, match="pinLeafNode"):
        LeafNodeFit(_H(None, None), {"pinLeafNode": "yes"})
    plugin = LeafNodeFit(_H(views_of(), _Api(fail=OSError("connection refused"))), {})
    state = CycleState()
    assert plugin.reserve(state, p, "kosmos-c1").ok
    st = plugin.pre_bind(state, p, "kosmos-c1")
    assert st.code == Code.ERROR and "n-tight" in st.message() and "connection refused" in st.message()
    plugin = LeafNodeFit(_H(views_of(), None), {})  # no client: the bind goes on unpinned
    state = CycleState()
    assert plugin.reserve(state, p, "kosmos-c1").ok and plugin.pre_bind(state, p, "kosmos-c1").ok


def test_kosmos_profile_runs_it_at_pre_bind() -> None:
    api = _Api()
    k = build_profiles(default_config(), _H(views_of(), api), REGISTRY)[KOSMOS_SCHEDULER]
    assert "LeafNodeFit" in [pl.name for pl in k.pre_bind]
    p = pod("web", "3")
    state = CycleState()
    assert k.plugins["LeafNodeFit"].reserve(state, p, "kosmos-c1").ok
    assert k.run_pre_bind(state, p, "kosmos-c1").ok
    assert api.patches[0][1]["metadata"]["annotations"] == {LEAF_NODE_ANNOTATION: "n-mid"}
