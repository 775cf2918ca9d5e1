"""Owner of the addresses on our links.

Ownership: every address on one of our links, except IPv6 link-local ones (the kernel makes
those itself). Added after the link, before anything routed through it; removed after every
route and neighbour is gone. Deleting a link removes its addresses with it, so the
Reconciler re-reads this table after a link is (re)created.
"""

from __future__ import annotations

import ipaddress
import logging

from fabric.netlink import tolerated
from fabric.netlink.dataplane import Dataplane, DataplaneError
from fabric.netlink.objects import Address
from fabric.netlink.report import TableStats

_log = logging.getLogger(__name__)
TABLE = "addresses"


def _owned(address: Address) -> bool:
    ip = ipaddress.ip_interface(address.address).ip
    return not (ip.version == 6 and ip.is_link_local)


class AddressOwner:
    def __init__(self, dp: Dataplane, names: frozenset[str]) -> None:
        self._dp = dp
        self._names = names
        self._desired: set[Address] | None = None
        self._kernel: set[Address] = set()

    def set_desired(self, addresses: frozenset[Address]) -> None:
        for a in addresses:
            if a.link not in self._names:
                raise ValueError(f"desired address {a.address} is on link {a.link!r}, which is not ours")
            ipaddress.ip_interface(a.address)
        self._desired = set(addresses)

    def resync(self) -> None:
        self._kernel = {a for name in self._names for a in self._dp.list_addresses(name) if _owned(a)}

    def desired_count(self) -> int:
        return len(self._desired or ())

    def programmed_count(self) -> int:
        return len(self._kernel)

    def apply_adds(self, stats: TableStats) -> None:
        for a in (self._desired or set()) - self._kernel:
            try:
                self._dp.add_address(a)
            except DataplaneError as exc:
                if not tolerated.already_there(TABLE, exc.code):
                    stats.fail(TABLE, exc.code, str(exc))
                    continue
            stats.adds += 1
            self._kernel.add(a)

    def apply_deletes(self, stats: TableStats) -> None:
        if self._desired is None:
            return
        for a in self._kernel - self._desired:
            try:
                self._dp.del_address(a)
            except DataplaneError as exc:
                if not tolerated.already_gone(TABLE, exc.code):
                    stats.fail(TABLE, exc.code, str(exc))
                    continue
            stats.deletes += 1
            self._kernel.discard(a)

    def clear_desired(self) -> None:
        self._desired = set()
