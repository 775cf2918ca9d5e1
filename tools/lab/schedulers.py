"""The scheduler a ``kubernetes: true`` lab runs per cluster (the topology's ``scheduler:``).

Nothing in the lab binds a pod to a node by itself: kubeemu stores a Pod without ``nodeName`` as
Pending, and the lab kubelet only runs pods bound to its nodes. Binding is a scheduler's job,
through ``pods/binding`` (and ``pods/eviction`` to preempt), as in a real cluster. So the lab
starts, per cluster, the scheduler its topology names:

- ``none``: no scheduler; pods that name no node stay Pending (tests bind them themselves);
- ``kosmos``: the Kosmos scheduler, once it is built (issue 16). Until then a topology naming it
  is refused before the lab builds anything, naming the cluster.

Plugging a scheduler in is one entry in :data:`STARTERS`: a function that starts the scheduler
process of a cluster (it gets the lab state and the cluster's record, whose ``api_url`` is its
API server) and returns its :class:`~tools.lab.state.ProcRecord`. The lab records it in the
state file (``ClusterRecord.scheduler_proc``), restarts it with its API server, and ``lab down``
stops it with the other processes.

Order in ``lab up``: :func:`problems` while planning (nothing built yet), then
:func:`start_scheduler` after the cluster's API server and kubelet are up.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from fabric.topology import LabCluster
from tools.lab.state import ClusterRecord, LabError, LabState, ProcRecord, Progress, quiet, save_state

_log = logging.getLogger(__name__)

SchedulerStart = Callable[[LabState, ClusterRecord], ProcRecord]

#: Built schedulers: name -> start function. ``none`` is not here: it starts nothing.
STARTERS: dict[str, SchedulerStart] = {}

#: Schedulers the topology may name that this build cannot run yet, and why.
NOT_BUILT: dict[str, str] = {"kosmos": "the Kosmos scheduler is not built yet (it arrives with the scheduler issue)"}


def problems(cluster: LabCluster, kubernetes: bool) -> list[str]:
    """Why the lab cannot run ``cluster``'s scheduler (empty: it can)."""
    name = cluster.scheduler
    if name == "none" or not kubernetes or name in STARTERS:
        return []
    why = NOT_BUILT.get(name, "no such scheduler in this build")
    return [f"cluster {cluster.name}: scheduler {name!r}: {why}; use 'scheduler: none' for now"]


def start_scheduler(state: LabState, cluster: ClusterRecord, progress: Progress = quiet) -> ProcRecord | None:
    """Start ``cluster``'s scheduler unless it runs already (``none``: nothing to start)."""
    name = cluster.scheduler
    if name == "none":
        return None
    rec = cluster.scheduler_proc
    if rec is not None and rec.running():
        return rec
    start = STARTERS.get(name)
    if start is None:
        raise LabError(f"cluster {cluster.name}: scheduler {name!r}: "
                       f"{NOT_BUILT.get(name, 'no such scheduler in this build')}")
    rec = start(state, cluster)
    cluster.scheduler_proc = rec
    save_state(state)
    progress(f"lab {state.name}: scheduler {name} of {cluster.name} started (pid {rec.pid}, log {rec.log})")
    return rec


__all__ = ["NOT_BUILT", "STARTERS", "SchedulerStart", "problems", "start_scheduler"]
