"""ClusterIP allocation for Services: one pool per address family from the cluster's service CIDRs."""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import Iterable

_log = logging.getLogger(__name__)


class ServiceIPs:
    """ClusterIP allocation from the cluster's service CIDR(s), one pool per family.

    The first address of the first CIDR goes to ``default/kubernetes`` (upstream reserves it the
    same way); the rest are handed out lowest-free-first so tests can predict them.
    """

    def __init__(self, cidrs: Iterable[str]) -> None:
        self.networks = [ipaddress.ip_network(c.strip(), strict=False) for c in cidrs if c.strip()]
        self.used: set[str] = set()

    def family_nets(self, family: str) -> list[ipaddress.IPv4Network | ipaddress.IPv6Network]:
        want = 4 if family == "IPv4" else 6
        return [n for n in self.networks if n.version == want]

    def allocate(self, family: str, requested: str | None, peek: bool) -> str:
        nets = self.family_nets(family)
        if not nets:
            raise ValueError(f"no {family} service CIDR configured on this cluster")
        if requested:
            try:
                ip = ipaddress.ip_address(requested)
            except ValueError:
                raise ValueError(f"must be a valid IP address (e.g. 10.9.8.7 or 2001:db8::ffff): {requested}") from None
            if not any(ip in n for n in nets):
                raise ValueError(f"failed to allocate IP {requested}: the provided IP ({requested}) is not in "
                                 f"the valid range. The range of valid IPs is {nets[0]}")
            if requested in self.used:
                raise ValueError(f"failed to allocate IP {requested}: provided IP is already allocated")
            if not peek:
                self.used.add(requested)
            return requested
        for net in nets:
            limit = min(net.num_addresses - 1, 1 << 20)
            for off in range(1, limit):
                cand = str(net.network_address + off)
                if cand not in self.used:
                    if not peek:
                        self.used.add(cand)
                    return cand
        raise ValueError(f"failed to allocate a serviceIP: range is full ({nets[0]})")

    def release(self, ips: Iterable[str]) -> None:
        for ip in ips:
            self.used.discard(ip)
