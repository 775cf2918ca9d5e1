"""Owner of the static neighbour (ARP/NDP) entries on our links.

Ownership: ``NUD_PERMANENT`` entries on our links. Dynamic entries (learnt, incomplete, stale)
are the kernel's business and ignored: with learning off nothing should create them, and
deleting them would only race the kernel.

A neighbour maps a peer's overlay address to its vxlan MAC; it goes in before the FDB entry and
the route that use it (otherwise the kernel ARPs on the tunnel, nobody answers, packets drop) and
comes out after them. Entries are set with ``NLM_F_REPLACE`` so a changed MAC is one message and a
stale dynamic entry for the same address is overwritten. Diff is O(n): dicts keyed by
(link, ip) with the MAC as value.
"""

from __future__ import annotations

import logging

from fabric.netlink import tolerated
from fabric.netlink.dataplane import Dataplane
from fabric.netlink.objects import Neighbour
from fabric.netlink.report import TableStats

_log = logging.getLogger(__name__)
TABLE = "neighbours"
NUD_PERMANENT = 0x80

Key = tuple[str, str]


class NeighbourOwner:
    def __init__(self, dp: Dataplane, names: frozenset[str]) -> None:
        self._dp = dp
        self._names = names
        self._desired: dict[Key, str] | None = None
        self._kernel: dict[Key, str] = {}

    def set_desired(self, neighbours: frozenset[Neighbour]) -> None:
        desired: dict[Key, str] = {}
        for n in neighbours:
            if n.link not in self._names:
                raise ValueError(f"desired neighbour {n.ip} is on link {n.link!r}, which is not ours")
            key = (n.link, n.ip)
            if desired.get(key, n.mac) != n.mac:
                raise ValueError(f"two MACs desired for neighbour {n.ip} on {n.link}: {desired[key]} and {n.mac}")
            desired[key] = n.mac
        self._desired = desired

    def resync(self) -> None:
        self._kernel = {
            (kn.link, kn.ip): kn.mac
            for name in self._names
            for kn in self._dp.list_neighbours(name)
            if kn.state & NUD_PERMANENT and kn.mac
        }

    def desired_count(self) -> int:
        return len(self._desired or {})

    def programmed_count(self) -> int:
        return len(self._kernel)

    def apply_adds(self, stats: TableStats) -> None:
        kernel = self._kernel
        todo = [Neighbour(k[0], k[1], mac) for k, mac in (self._desired or {}).items() if kernel.get(k) != mac]
        if not todo:
            return
        failed = set()
        for e in self._dp.set_neighbours(todo):
            stats.fail(TABLE, e.errno, e.message)
            failed.add(e.index)
        for i, n in enumerate(todo):
            if i in failed:
                continue
            if (n.link, n.ip) in kernel:
                stats.updates += 1
            else:
                stats.adds += 1
            kernel[(n.link, n.ip)] = n.mac

    def apply_deletes(self, stats: TableStats) -> None:
        if self._desired is None:
            return
        desired = self._desired
        todo = [Neighbour(k[0], k[1], mac) for k, mac in self._kernel.items() if k not in desired]
        if not todo:
            return
        failed = set()
        for e in self._dp.del_neighbours(todo):
            if not tolerated.already_gone(TABLE, e.errno):
                stats.fail(TABLE, e.errno, e.message)
                failed.add(e.index)
        for i, n in enumerate(todo):
            if i not in failed:
                stats.deletes += 1
                del self._kernel[(n.link, n.ip)]

    def clear_desired(self) -> None:
        self._desired = {}
