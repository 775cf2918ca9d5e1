"""LeafNodeFit: a pod passes a virtual node only if some real node of its leaf can host it
(issue 19, "never strand a pod"), and a placement in flight is reserved on one leaf node.

Why: the virtual node's allocatable is the SUM over its leaf nodes, so NodeResourcesFit passes a
12-CPU pod on a virtual node of ten 8-CPU leaf nodes, and the pod then sits Pending in the leaf.

Per pod, in order:

1. ``filter`` (per virtual node): when the handle has leaf views (``handle.leaf_views``, a
   :class:`scheduler.leafviews.LeafViews` fed by the tree manager's records) and one describes
   this virtual node, the pod's effective request (plus one pod slot) must fit on some usable
   leaf node admitting the pod's *leaf* placement (:meth:`Placement.of_root_pod`: the
   ``kosmos.io/cluster-selector`` annotation, what the tree manager gives the leaf copy); else
   Unschedulable ``node(s) had no leaf node with room for the pod`` (the leaf may change: not
   unresolvable). A node that is not a virtual node, or a virtual node without a view (no
   reflector configured, no record yet), passes: the old behaviour.
2. ``reserve``: the request is reserved on the view's best-fit leaf node (see
   :mod:`scheduler.leafview`), so the next pods' Filter sees it before the leaf does; it lives
   until ``unreserve`` (bind failed), a record shows it landed (that node's ``ourPods`` rose:
   :meth:`LeafView.apply_record`), or ``reservationSeconds`` (default 30) pass. Expired
   reservations are released at every ``reserve``.
3. ``unreserve``: the reservation is released.

Enable it in a profile's ``filter`` and ``reserve`` lists (``LeafNodeFit``).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from scheduler.framework import SUCCESS, ClusterEvent, CycleState, Handle, NodeInfo, PodInfo, Status, unschedulable
from scheduler.leafview import Demand, Placement, resource_vector
from scheduler.leafviews import LeafViews
from scheduler.policy import is_leaf_node

REASON = "node(s) had no leaf node with room for the pod"


class LeafNodeFit:
    name = "LeafNodeFit"

    def __init__(self, handle: Handle, args: Mapping[str, Any]) -> None:
        self.handle = handle
        self._state_key = "Filter" + self.name
        self.ttl = float(args.get("reservationSeconds", 30.0))
        if self.ttl <= 0:
            raise ValueError(f"LeafNodeFit args.reservationSeconds: must be positive, got {self.ttl}")

    def _views(self) -> LeafViews | None:
        views = getattr(self.handle, "leaf_views", None)
        return views if isinstance(views, LeafViews) else None

    @staticmethod
    def _ask(pod: PodInfo) -> tuple[Demand, Placement]:
        return Demand.of(resource_vector(pod.requests)), Placement.of_root_pod(pod.pod)

    @staticmethod
    def _key(pod: PodInfo) -> str:
        return f"{pod.key}/{pod.uid}"

    def filter(self, state: CycleState, pod: PodInfo, node: NodeInfo) -> Status:
        if not is_leaf_node(node.node):
            return SUCCESS
        views = self._views()
        if views is None:
            return SUCCESS
        ask = state.get(self._state_key)
        if ask is None:  # once per pod and cycle: the request and the compiled placement
            ask = self._ask(pod)
            state.write(self._state_key, ask)
        demand, placement = ask
        with views.lock:
            view = views.view(str(node.node["metadata"]["name"]))
            if view is None or view.fits(demand, placement):
                return SUCCESS
        return unschedulable(REASON).with_plugin(self.name)

    def reserve(self, state: CycleState, pod: PodInfo, node_name: str) -> Status:
        views = self._views()
        if views is None:
            return SUCCESS
        views.expire()
        demand, placement = self._ask(pod)
        with views.lock:
            view = views.view(node_name)
            if view is None or view.assume(self._key(pod), demand, placement, ttl=self.ttl) is not None:
                return SUCCESS
        return unschedulable(REASON).with_plugin(self.name)

    def unreserve(self, state: CycleState, pod: PodInfo, node_name: str) -> None:
        views = self._views()
        if views is None:
            return
        with views.lock:
            view = views.view(node_name)
            if view is not None:
                view.forget(self._key(pod))

    def events_to_register(self) -> Iterable[ClusterEvent]:
        # The tree manager rewrites a virtual node when its leaf changes; a pod leaving frees room.
        return (ClusterEvent("Node", "Update"), ClusterEvent("Node", "Add"), ClusterEvent("Pod", "Delete"))
