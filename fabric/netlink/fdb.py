"""Owner of the static FDB entries (``bridge fdb ... self permanent``) on our vxlan links.

Ownership: every FDB entry on our links, including all-zero (flood) entries we did not create:
with learning off the only legitimate entries are the ones we program, so extraneous ones are
removed. Entries are (link, MAC, remote VTEP); a unicast MAC has one remote (added with
``NLM_F_REPLACE``, so a moved VTEP is a single message and the later delete of the old pair
answers ENOENT, which is fine), the all-zero MAC holds a flood list (``NLM_F_APPEND``).

The kernel omits ``NDA_VNI`` in dumps when it equals the device's VNI (pyroute2's ``fdb()``
docstring); we never program a VNI, so entries are compared without it.

Order: after the neighbour entry (L3 -> MAC), before the route that makes traffic flow.
"""

from __future__ import annotations

import logging

from fabric.netlink import tolerated
from fabric.netlink.dataplane import Dataplane
from fabric.netlink.objects import FdbEntry
from fabric.netlink.report import TableStats

_log = logging.getLogger(__name__)
TABLE = "fdb"


class FdbOwner:
    def __init__(self, dp: Dataplane, names: frozenset[str]) -> None:
        self._dp = dp
        self._names = names
        self._desired: set[FdbEntry] | None = None
        self._kernel: set[FdbEntry] = set()

    def set_desired(self, entries: frozenset[FdbEntry]) -> None:
        for e in entries:
            if e.link not in self._names:
                raise ValueError(f"desired FDB entry {e.mac} dst {e.dst} is on link {e.link!r}, which is not ours")
        self._desired = set(entries)

    def resync(self) -> None:
        self._kernel = {e for name in self._names for e in self._dp.list_fdb(name)}

    def desired_count(self) -> int:
        return len(self._desired or ())

    def programmed_count(self) -> int:
        return len(self._kernel)

    def apply_adds(self, stats: TableStats) -> None:
        todo = list((self._desired or set()) - self._kernel)
        if not todo:
            return
        failed = set()
        for e in self._dp.add_fdb(todo):
            stats.fail(TABLE, e.errno, e.message)
            failed.add(e.index)
        for i, entry in enumerate(todo):
            if i not in failed:
                stats.adds += 1
                self._kernel.add(entry)

    def apply_deletes(self, stats: TableStats) -> None:
        if self._desired is None:
            return
        todo = list(self._kernel - self._desired)
        if not todo:
            return
        failed = set()
        for e in self._dp.del_fdb(todo):
            if not tolerated.already_gone(TABLE, e.errno):
                stats.fail(TABLE, e.errno, e.message)
                failed.add(e.index)
        for i, entry in enumerate(todo):
            if i not in failed:
                stats.deletes += 1
                self._kernel.discard(entry)

    def clear_desired(self) -> None:
        self._desired = set()
