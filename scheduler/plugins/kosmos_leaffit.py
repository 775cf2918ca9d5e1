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
2. ``reserve``: the request is reserved on the leaf node LeafNodeFragmentation chose for this
   virtual node in this cycle (its score's least fragmenting node, the cycle state's
   ``LEAF_NODE_CHOICE``) when it still admits the pod and has room, else on the view's best-fit
   leaf node (see :mod:`scheduler.leafview`), so the next pods' Filter sees it before the leaf does; it lives
   until ``unreserve`` (bind failed), a record shows it landed (that node's ``ourPods`` rose:
   :meth:`LeafView.apply_record`), or ``reservationSeconds`` (default 30) pass. Expired
   reservations are released at every ``reserve``.
3. ``pre_bind`` (the pin): for a ``tree: cluster`` virtual node (its record's ``mode``) with a
   view and this pod's reservation, the reserved leaf node is written on the root pod as the
   annotation :data:`LEAF_NODE_ANNOTATION` (a JSON merge patch naming the pod's UID, so a newer
   pod of the same name is never touched), before the binding. The tree manager then creates the
   leaf copy with a required node affinity on that node (``tree/pods.py``), so the leaf's own
   scheduler puts it where the reservation counted it; without the pin a first-fit leaf scheduler
   may use the room another reservation holds and strand a later pod (``fabric-tool bench
   placement``: false binds median 2, max 31 over 10 seeds without, 0 with). Nothing is written
   without a view, a reservation or in ``node``/``party`` mode (a node-mode copy is bound to its
   node already; a party's selector is the party's). A failed write fails the bind (the pod is
   retried), as VolumeBinding's PreBind. A pin an earlier cycle wrote (its bind failed) that
   does not apply now is removed (merge patch to null), so it never pins a copy in another leaf.
   ``args.pinLeafNode`` (default true) turns it off: the leaf's scheduler then chooses among all
   its nodes (for leaves whose scheduler does better than our best fit, e.g. with its own
   scoring plugins or pod affinities the view does not know). A pinned copy whose node cannot
   host it after all (the leaf changed under us) is found by the tree manager and created again
   without the pin (``kosmos-tree --stranded-after``), so the pin never strands a pod for longer.
4. ``unreserve``: the reservation is released.

Enable it in a profile's ``filter``, ``reserve`` and ``preBind`` lists (``LeafNodeFit``; the
built-in ``kosmos-scheduler`` profile has it at every point it implements).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from typing import Any

from scheduler.framework import (
    SUCCESS,
    ClusterEvent,
    CycleState,
    Handle,
    NodeInfo,
    PodInfo,
    Status,
    error,
    unschedulable,
)
from scheduler.leafview import Demand, Placement, resource_vector
from scheduler.leafviews import LeafViews
from scheduler.plugins.kosmos_fragmentation import LEAF_NODE_CHOICE
from scheduler.plugins.volumebinding import api_patcher
from scheduler.policy import is_leaf_node

_log = logging.getLogger(__name__)

REASON = "node(s) had no leaf node with room for the pod"
#: The root pod's annotation naming the leaf node its copy is pinned to (``tree.pods`` reads it).
LEAF_NODE_ANNOTATION = "kosmos.io/leaf-node"
#: The tree mode whose copies are pinned (a record's ``mode``).
PINNED_MODE = "cluster"


class LeafNodeFit:
    name = "LeafNodeFit"

    def __init__(self, handle: Handle, args: Mapping[str, Any]) -> None:
        self.handle = handle
        self._state_key = "Filter" + self.name
        self.ttl = float(args.get("reservationSeconds", 30.0))
        if self.ttl <= 0:
            raise ValueError(f"LeafNodeFit args.reservationSeconds: must be positive, got {self.ttl}")
        pin = args.get("pinLeafNode", True)
        if not isinstance(pin, bool):
            raise ValueError(f"LeafNodeFit args.pinLeafNode: must be true or false, got {pin!r}")
        self.pin = pin

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
        prefer = (state.get(LEAF_NODE_CHOICE) or {}).get(node_name)
        with views.lock:
            view = views.view(node_name)
            if view is None or view.assume(self._key(pod), demand, placement, ttl=self.ttl,
                                           prefer=prefer) is not None:
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

    def pre_bind(self, state: CycleState, pod: PodInfo, node_name: str) -> Status:
        """Write the reserved leaf node on the root pod (see the module, step 3)."""
        leaf_node = None
        views = self._views()
        if self.pin and views is not None:
            with views.lock:
                view = views.view(node_name)
                if view is not None and view.mode == PINNED_MODE:
                    r = view.reservations.get(self._key(pod))
                    leaf_node = r.node if r is not None else None
        meta = pod.pod.get("metadata") or {}
        # A pin left by an earlier cycle whose bind failed names a node of another leaf: dropped.
        if (meta.get("annotations") or {}).get(LEAF_NODE_ANNOTATION) == leaf_node:
            return SUCCESS
        patch = api_patcher(self.handle)
        if patch is None:
            _log.warning("pod %s: no API client on the scheduler's handle: its leaf copy is not pinned to %s",
                         pod.key, leaf_node)
            return SUCCESS
        ns, name = meta.get("namespace") or "default", meta["name"]
        try:  # the uid in a patch is a precondition: a newer pod of this name is left alone (409)
            patch(f"/api/v1/namespaces/{ns}/pods/{name}",
                  {"metadata": {"uid": pod.uid, "annotations": {LEAF_NODE_ANNOTATION: leaf_node}}})
        except Exception as e:
            return error(f"pinning the leaf copy to leaf node {leaf_node}: {e}").with_plugin(self.name)
        _log.debug("pod %s: leaf copy pinned to %s (virtual node %s)", pod.key, leaf_node, node_name)
        return SUCCESS

    def events_to_register(self) -> Iterable[ClusterEvent]:
        # The tree manager rewrites a virtual node when its leaf changes; a pod leaving frees room.
        return (ClusterEvent("Node", "Update"), ClusterEvent("Node", "Add"), ClusterEvent("Pod", "Delete"))
