"""LeafNodeFit in the built-in ``kosmos-scheduler`` profile (issue 19, gap a): enabled at filter
and reserve, and harmless when the scheduler runs without ``--reflector`` (no leaf views)."""

from __future__ import annotations

from typing import Any

import pytest

from scheduler.cache import NodeSnapshot
from scheduler.framework import Code, CycleState
from scheduler.leafviews import LeafViews
from scheduler.plugins import REGISTRY
from scheduler.profile import KOSMOS_SCHEDULER, build_profiles, default_config
from tests.unit.test_leafview_plugin import eight_by_ten, pod, vnode

pytestmark = pytest.mark.unit


class _H:
    def __init__(self, views: LeafViews | None = None) -> None:
        if views is not None:
            self.leaf_views = views

    def snapshot(self) -> Any:
        return NodeSnapshot()

    def lister(self, resource: str) -> Any:
        return {}


def test_kosmos_profile_has_leaf_node_fit_at_filter_and_reserve() -> None:
    profs = build_profiles(default_config(), _H(), REGISTRY)
    k = profs[KOSMOS_SCHEDULER]
    assert "LeafNodeFit" in [p.name for p in k.filter]
    assert "LeafNodeFit" in [p.name for p in k.reserve]
    # Not in upstream's profile: it only knows virtual nodes.
    d = profs["default-scheduler"]
    assert "LeafNodeFit" not in [p.name for p in d.filter + d.reserve]


def test_without_reflector_the_default_profile_passes_what_the_sum_passes() -> None:
    k = build_profiles(default_config(), _H(), REGISTRY)[KOSMOS_SCHEDULER]
    fit = k.plugins["LeafNodeFit"]
    state = CycleState()
    big = pod("big", "12")
    assert fit.filter(state, big, vnode("kosmos-c1")).ok
    assert k.run_reserve(state, big, "kosmos-c1").ok
    k.run_unreserve(state, big, "kosmos-c1")


def test_with_leaf_views_the_default_profile_refuses_a_pod_no_leaf_node_hosts() -> None:
    views = eight_by_ten()
    k = build_profiles(default_config(), _H(views), REGISTRY)[KOSMOS_SCHEDULER]
    fit = k.plugins["LeafNodeFit"]
    st = fit.filter(CycleState(), pod("big", "12"), vnode("kosmos-c1"))
    assert st.code == Code.UNSCHEDULABLE
    small = pod("small", "8")
    state = CycleState()
    assert fit.filter(state, small, vnode("kosmos-c1")).ok
    assert k.run_reserve(state, small, "kosmos-c1").ok
    view = views.view("kosmos-c1")
    assert view is not None and len(view.reservations) == 1
    k.run_unreserve(state, small, "kosmos-c1")
    assert not view.reservations
