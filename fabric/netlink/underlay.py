"""Read-only view of the node's interfaces for choosing the underlay (``fabric-agent --in-cluster``).

The agent picks its underlay address once, at start-up, by the Cluster's autodetection method
(:func:`fabric.nodeinfo.choose_underlay`, pure). This module gives that chooser what it needs
from the kernel, in the agent's own network namespace (the DaemonSet runs with hostNetwork, so
that is the node's), or in ``netns=NAME`` for tests:

* every link (``RTM_GETLINK`` dump, kernel order = ifindex order) with its administrative state
  (``IFF_UP``), ``IFF_LOOPBACK``, its ``IFLA_INFO_KIND`` ("" for a physical NIC) and its
  addresses (``RTM_GETADDR`` dump, IPv4 and IPv6, with their scope: ``global`` is what a peer
  can reach; ``link`` and ``host`` addresses never are);
* for ``can-reach=IP``: ``RTM_GETROUTE`` for IP (``ip route get IP``), whose answer carries the
  source address the kernel would choose (``RTA_PREFSRC``) and the output interface
  (``RTA_OIF``). Nothing is sent to IP.

Nothing here writes to the kernel.
"""

from __future__ import annotations

import ipaddress
import logging
import socket
from typing import Any

from fabric import netns as namespaces
from fabric.types import HostAddress, HostLink, RouteHint

_log = logging.getLogger(__name__)

IFF_UP = 0x1
IFF_LOOPBACK = 0x8
#: ``ifa_scope`` numbers as ``ip addr`` names them.
SCOPES = {0: "global", 200: "site", 253: "link", 254: "host", 255: "nowhere"}


def _ipr(netns: str | None) -> Any:
    return namespaces.iproute(netns)  # pyroute2 imported late: keeps unit tests' imports cheap


def read_links(netns: str | None = None) -> list[HostLink]:
    """Every link of the namespace in ifindex order, with its IPv4 and IPv6 addresses."""
    ipr = _ipr(netns)
    try:
        addrs: dict[int, list[HostAddress]] = {}
        for msg in ipr.get_addr():
            local = msg.get_attr("IFA_LOCAL") or msg.get_attr("IFA_ADDRESS")
            if not local:
                continue
            fam = 4 if msg["family"] == socket.AF_INET else 6
            scope = SCOPES.get(int(msg["scope"]), str(msg["scope"]))
            addrs.setdefault(int(msg["index"]), []).append(HostAddress(str(ipaddress.ip_address(local)), fam, scope))
        out: list[tuple[int, HostLink]] = []
        for msg in ipr.get_links():
            flags = int(msg["flags"])
            info = msg.get_attr("IFLA_LINKINFO")
            kind = (info.get_attr("IFLA_INFO_KIND") if info is not None else None) or ""
            idx = int(msg["index"])
            out.append((idx, HostLink(str(msg.get_attr("IFLA_IFNAME")), bool(flags & IFF_UP),
                                      bool(flags & IFF_LOOPBACK), str(kind), tuple(addrs.get(idx, ())))))
        return [link for _idx, link in sorted(out, key=lambda p: p[0])]
    finally:
        ipr.close()


def route_towards(target: str, netns: str | None = None) -> RouteHint:
    """``ip route get TARGET``: the source address and interface the kernel would use."""
    from pyroute2.netlink.exceptions import NetlinkError

    ip = ipaddress.ip_address(target)
    ipr = _ipr(netns)
    try:
        try:
            msgs = ipr.route("get", dst=str(ip), family=socket.AF_INET if ip.version == 4 else socket.AF_INET6)
        except NetlinkError as e:
            return RouteHint(str(ip), error=f"{e.args[1] if len(e.args) > 1 else e} (errno {e.code})")
        if not msgs:
            return RouteHint(str(ip), error="the kernel answered with no route")
        msg = msgs[0]
        src = msg.get_attr("RTA_PREFSRC") or ""
        oif = msg.get_attr("RTA_OIF")
        name = ""
        if oif is not None:
            links = ipr.get_links(int(oif))
            name = str(links[0].get_attr("IFLA_IFNAME")) if links else ""
        return RouteHint(str(ip), source=str(src), interface=name,
                         error="" if src else "the route has no preferred source address")
    finally:
        ipr.close()
