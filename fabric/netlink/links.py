"""Owner of our links: the vxlan links (``vx-bridge`` and friends) and the hairpin device.

Ownership: a link is ours when its name is in the owner's ``names`` and its kind is one we
create (``vxlan``; ``ifb`` for the global-IP hairpin device, :class:`DeviceLink`).
A link carrying one of our names but of another kind is *refused* (reported as a failure with a
clear message) and never deleted or modified: it belongs to someone else.

Changing a link: mtu, MAC, learning and up/down are changed in place. VNI, UDP port, local
address and underlay link cannot be changed on a live vxlan device, so the link is deleted and
created again. Recreation (and bringing a link up) wipes what hangs off it in the kernel
(neighbours, nexthops and routes; on delete also FDB and addresses); :meth:`LinkOwner.apply_adds`
returns the names it touched so the Reconciler re-reads the dependent tables and re-adds them in
the same pass. Kosmos left a blackhole until its next 30 s resync here.
"""

from __future__ import annotations

import errno
import logging

from fabric.netlink import tolerated
from fabric.netlink.dataplane import Dataplane, DataplaneError, LinkInfo
from fabric.netlink.objects import OWNED_KINDS, DeviceLink, Link, VxlanLink
from fabric.netlink.report import TableStats

_log = logging.getLogger(__name__)
TABLE = "links"


def _immutable(link: VxlanLink) -> tuple[int, int, str, int]:
    return (link.vni, link.port, link.local, link.underlay_ifindex)


class LinkOwner:
    def __init__(self, dp: Dataplane, names: frozenset[str]) -> None:
        self._dp = dp
        self._names = names
        self._desired: dict[str, Link] | None = None
        self._kernel: dict[str, LinkInfo] = {}

    def set_desired(self, links: frozenset[Link]) -> None:
        desired: dict[str, Link] = {}
        for link in links:
            if link.name not in self._names:
                raise ValueError(f"desired link {link.name!r} is not one of the names we own {sorted(self._names)}")
            if link.name in desired:
                raise ValueError(f"two desired links named {link.name!r}: {desired[link.name]} and {link}")
            desired[link.name] = link
        self._desired = desired

    def resync(self) -> None:
        self._kernel = {li.name: li for li in self._dp.list_links() if li.name in self._names}

    def present(self) -> set[str]:
        """Names of our links that exist in the kernel view (dependents live on these)."""
        return {name for name, li in self._kernel.items() if li.kind in OWNED_KINDS}

    def desired_count(self) -> int:
        return len(self._desired or {})

    def programmed_count(self) -> int:
        return len(self.present())

    def apply_adds(self, stats: TableStats) -> set[str]:
        """Create/fix desired links; return the names whose dependents the kernel flushed."""
        touched: set[str] = set()
        for name, want in (self._desired or {}).items():
            have = self._kernel.get(name)
            try:
                if have is None:
                    self._dp.add_link(want)
                    stats.adds += 1
                    touched.add(name)
                elif isinstance(want, DeviceLink):
                    if have.kind != want.kind:
                        stats.fail(TABLE, errno.EEXIST,
                                   f"refusing to touch link {name!r}: it exists with kind {have.kind or 'unknown'!r}, "
                                   f"not {want.kind}, so it is not ours")
                        continue
                    if have.up == want.up:
                        continue
                    self._dp.update_link(want)
                    stats.updates += 1
                    if want.up:
                        touched.add(name)
                elif have.kind != "vxlan" or have.vxlan is None:
                    stats.fail(TABLE, errno.EEXIST,
                               f"refusing to touch link {name!r}: it exists with kind {have.kind or 'unknown'!r}, "
                               "not vxlan, so it is not ours")
                    continue
                elif _immutable(have.vxlan) != _immutable(want):
                    _log.info("recreating %s: %s -> %s", name, have.vxlan, want)
                    self._dp.del_link(name)
                    self._kernel.pop(name, None)
                    self._dp.add_link(want)
                    stats.updates += 1
                    touched.add(name)
                elif have.vxlan != want:
                    self._dp.update_link(want)
                    stats.updates += 1
                    if want.up and not have.vxlan.up:
                        touched.add(name)
                else:
                    continue
            except DataplaneError as exc:
                stats.fail(TABLE, exc.code, str(exc))
                continue
            kind = want.kind if isinstance(want, DeviceLink) else "vxlan"
            vx = want if isinstance(want, VxlanLink) else None
            self._kernel[name] = LinkInfo(name, have.ifindex if have else 0, kind, vx, want.up)
        return touched

    def apply_deletes(self, stats: TableStats) -> None:
        if self._desired is None:
            return
        for name, have in list(self._kernel.items()):
            if name in self._desired:
                continue
            if have.kind not in OWNED_KINDS:
                _log.debug("leaving link %s alone: kind %r is not ours", name, have.kind)
                continue
            try:
                self._dp.del_link(name)
            except DataplaneError as exc:
                if not tolerated.already_gone(TABLE, exc.code):
                    stats.fail(TABLE, exc.code, str(exc))
                    continue
            stats.deletes += 1
            del self._kernel[name]

    def clear_desired(self) -> None:
        self._desired = {}
