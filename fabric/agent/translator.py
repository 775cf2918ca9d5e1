"""The agent's global-IP translator: keeps the node's BPF translator equal to its planned
:class:`~fabric.agent.render.TranslatorPlan`, the way the netlink Reconciler keeps the kernel tables.

Kernel objects (created by :mod:`fabric.bpf.translate`): maps pinned under
``<pin root>/<instance>/`` (``instance`` = ``<cluster>-<node>``), and one tc ``bpf`` filter of
ours per attach point: both tunnel programs (ingress + egress) on ``vx-bridge``, the hairpin
program on the egress of the hairpin device. The hairpin device itself and the routes to it are
netlink objects (the Reconciler's); this module runs after the Reconciler in a pass, so the
devices exist when programs are attached.

Order per pass (the loader's contract): load (compile once per process; pinned maps reused, so
mappings and counters survive a restart) -> mappings (a delta: only changed entries are written,
additions before removals) -> attach what is planned but not seen attached in the kernel (an
atomic replace: a restarted agent takes over without a packet going untranslated) -> detach
what is attached but no longer planned.

Lazy: a node whose plan has no translation never compiles anything (1-3 s of bcc), unless pins
of an earlier run exist - then it loads once to empty the maps and detach the programs, so
removing a cluster's ``globalCIDRs`` really removes the translation. Like every pass, this runs
only after the first complete snapshot: a restarting agent never touches filters or maps before
it knows the plan. A kernel failure (a map update, an attach, reading the tc filters) is
recorded in the pass report under ``translator`` and retried with the next resync; the rest of
the plan is still applied. Anything else (a mapping set the validators should have refused, a
TypeError...) is a bug and propagates: the agent crashes into a clean resync (DESIGN.md).
"""

from __future__ import annotations

import errno
import logging
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from fabric import types
from fabric.agent import render
from fabric.bpf import translate
from fabric.netlink import dataplane
from fabric.netlink.report import TableStats

_log = logging.getLogger(__name__)

TABLE = "translator"
_POINTS: dict[str, tuple[translate.AttachPoint, ...]] = {
    types.PROGRAM_TUNNEL: (translate.AttachPoint.TUNNEL_INGRESS, translate.AttachPoint.TUNNEL_EGRESS),
    types.PROGRAM_HAIRPIN: (translate.AttachPoint.HAIRPIN,),
}
#: Devices our programs may run on (where cleanup and detach look).
DEVICES = (types.VX_BRIDGE, types.VX_BRIDGE6, types.HAIRPIN_DEVICE)


def instance_name(cluster: str, node: str) -> str:
    """Pin directory name of a node's translator (unique per node on a shared bpffs)."""
    return f"{cluster}-{node}"


class TranslatorSync:
    """Owns one node's translator. Not thread-safe: used from the agent's reconcile worker."""

    def __init__(self, instance: str, pin_root: Path, *, netns: str | None = None) -> None:
        self.instance = instance
        self.pin_root = pin_root
        self.netns = netns
        self._t: translate.Translator | None = None
        self._plan = render.TranslatorPlan()

    @property
    def loaded(self) -> bool:
        return self._t is not None

    def _pinned(self) -> bool:
        try:
            return translate.pin_dir_for(self.instance, self.pin_root).is_dir()
        except translate.TranslatorError:
            return False

    def _translator(self) -> translate.Translator:
        if self._t is None:
            t = translate.Translator(self.instance, pin_root=self.pin_root, netns=self.netns)
            t.load()
            self._t = t
        return self._t

    def apply(self, plan: render.TranslatorPlan, stats: TableStats) -> None:
        """Make the translator hold ``plan``; failures go to ``stats``, never raise for them."""
        if not plan and self._t is None and not self._pinned():
            self._plan = plan
            return
        try:
            t = self._translator()
        except translate.TranslatorError as e:
            stats.fail(TABLE, errno.EIO, f"loading the translator: {e}")
            return
        # Every pass, not only when the plan changed: set_mappings diffs the plan against what
        # the maps hold now, so an entry removed behind our back (drift) comes back like a route.
        # A MappingError is not caught: the mappings are the cluster's globalCIDRs, which the
        # topology file and Cluster resource validators already checked for exactly what it
        # refuses (CIDR syntax, sizes, families, overlaps), so a refused set is a bug of ours
        # (validators, planner or wire) and crashes the agent (DESIGN.md), not an EINVAL to retry.
        delta = t.set_mappings(
            translate.parse_mappings(list(plan.mappings), source="planned translations"),
            source="planned translations",
        )
        stats.adds += len(delta.added)
        stats.deletes += len(delta.removed)
        for msg in delta.failed:
            stats.fail(TABLE, errno.EIO, msg)
        self._attachments(t, plan, stats)
        self._plan = plan

    def _attachments(self, t: translate.Translator, plan: render.TranslatorPlan, stats: TableStats) -> None:
        wanted = {(dev, p) for dev, point in plan.attachments for p in _POINTS.get(point, ())}
        try:
            seen = t.attachments(DEVICES)
        except dataplane.kernel_errors() as e:  # a kernel failure reading tc filters: retry next pass
            stats.fail(TABLE, dataplane.kernel_errno(e), f"reading tc filters: {e}")
            return
        have = {(a["device"], a["direction"], a["program"]) for a in seen}
        for dev, point in sorted(wanted, key=lambda w: (w[0], w[1].function)):
            if (dev, point.direction, point.function) in have:
                continue
            try:
                t.attach(dev, point)
            except translate.TranslatorError as e:
                stats.fail(TABLE, errno.EIO, str(e))
                continue
            stats.adds += 1
        for dev, direction, program in sorted(have):
            point = next(p for p in translate.AttachPoint if p.function == program and p.direction == direction)
            if (dev, point) in wanted:
                continue
            try:
                t.detach(dev, point)
            except translate.TranslatorError as e:
                stats.fail(TABLE, errno.EIO, str(e))
                continue
            stats.deletes += 1

    def dump(self) -> dict[str, Any]:
        """Mappings with counters, drops and attachments (empty document when never loaded)."""
        if self._t is None:
            if not self._pinned():
                return {"instance": self.instance, "loaded": False}
            return {"loaded": False, **translate.dump_pinned(self.instance, self.pin_root)}
        return {"loaded": True, **self._t.dump(DEVICES)}

    def close(self) -> None:
        """Forget handles; programs stay attached and maps stay pinned (an agent restart)."""
        if self._t is not None:
            self._t.close()
            self._t = None


def cleanup(instance: str, pin_root: Path, devices: Iterable[str] = DEVICES, *, netns: str | None = None) -> bool:
    """``fabric-agent --cleanup``: detach our programs from ``devices`` and unpin the maps.
    Needs no compile: detaching reads the filter names from the kernel. Returns True if a pin
    directory was found."""
    existed = translate.pin_dir_for(instance, pin_root).exists()
    translate.Translator(instance, pin_root=pin_root, netns=netns).cleanup(devices)
    return existed
