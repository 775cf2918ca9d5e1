"""Netlink event monitor: tell the agent at once when something of ours changes behind its back.

Without it, a deleted ``vx-bridge`` or a flushed route would only come back at the next timer
resync (up to 30 s). A separate NETLINK_ROUTE socket joins the multicast groups for links,
neighbours (ARP and bridge FDB share RTNLGRP_NEIGH), IPv4/IPv6 routes, IPv4 rules and nexthops;
a daemon thread reads it and calls ``callback(reason)`` for:

* ``RTM_DELLINK`` of one of our links, or ``RTM_NEWLINK`` showing it went down (IFF_UP in
  ``ifi_change`` and not in ``ifi_flags``);
* ``RTM_DELROUTE`` in our table with our protocol, ``RTM_DELNEXTHOP`` / ``RTM_DELRULE`` with
  our protocol;
* ``RTM_DELNEIGH`` of a permanent neighbour or an FDB entry on one of our links;
* a receive-buffer overflow (``ENOBUFS``: events were lost, so resync anyway).

Notifications caused by our own requests carry the port id of the socket that sent them
(``nlmsg_pid``); those of the raw hot-path sockets (:data:`rawnl.OWN_PORTIDS`) are ignored, so
our own deletes do not trigger a resync. vxlan FDB notifications always carry port id 0, so our
own FDB deletes are registered beforehand (:func:`rawnl.expect_fdb_deletes`) and matched by
content. Link, address and rule changes go through pyroute2's socket and are reported even when
they are ours (rare; a spurious resync is harmless). Debouncing is the caller's job; the callback runs on
the monitor thread and must be quick and thread-safe (e.g. set an event or
``loop.call_soon_threadsafe``).
"""

from __future__ import annotations

import errno
import logging
import os
import select
import socket
import threading
from collections.abc import Callable

from fabric import netns as namespaces
from fabric.netlink import rawnl
from fabric.netlink.objects import RTPROT_FABRIC

_log = logging.getLogger(__name__)

_GROUPS = (
    rawnl.RTNLGRP_LINK,
    rawnl.RTNLGRP_NEIGH,
    rawnl.RTNLGRP_IPV4_ROUTE,
    rawnl.RTNLGRP_IPV6_ROUTE,
    rawnl.RTNLGRP_IPV4_RULE,
    rawnl.RTNLGRP_NEXTHOP,
)


class EventMonitor:
    def __init__(
        self,
        callback: Callable[[str], None],
        link_names: frozenset[str],
        table: int,
        *,
        netns: str | None = None,
    ) -> None:
        self._callback = callback
        self._names = link_names
        self._table = table
        self._netns = netns
        self._ifindex: dict[int, str] = {}
        self._sock: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self._stop_r, self._stop_w = -1, -1

    def start(self) -> None:
        """Subscribe (synchronously, so nothing after ``start`` returns is missed) and start the thread."""
        if self._thread is not None:
            raise RuntimeError("EventMonitor already started")
        sock = namespaces.netlink_socket(self._netns, rawnl.NETLINK_ROUTE)
        try:
            try:
                sock.setsockopt(socket.SOL_SOCKET, rawnl.SO_RCVBUFFORCE, 8 * 1024 * 1024)
            except PermissionError:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 * 1024 * 1024)
            sock.bind((0, 0))
            for group in _GROUPS:
                try:
                    sock.setsockopt(rawnl.SOL_NETLINK, rawnl.NETLINK_ADD_MEMBERSHIP, group)
                except OSError as exc:  # e.g. no nexthop support: run without that group
                    _log.warning("cannot join rtnetlink group %d: %s", group, exc)
            self._learn_ifindexes()
        except BaseException:
            sock.close()
            raise
        self._sock = sock
        self._stop_r, self._stop_w = os.pipe()
        self._thread = threading.Thread(target=self._run, name="netlink-events", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        if self._thread is None:
            return
        os.write(self._stop_w, b"x")
        self._thread.join(timeout=5)
        self._thread = None
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        os.close(self._stop_r)
        os.close(self._stop_w)

    def _learn_ifindexes(self) -> None:
        """Initial ifindex -> name map of our links (a DELNEIGH carries only the ifindex)."""
        nl = rawnl.NetlinkSocket(netns=self._netns, rcvbuf=1024 * 1024)
        try:
            for kind, body in nl.dump(rawnl.RTM_GETLINK, rawnl.IFINFOMSG.pack(0, 0, 0, 0, 0, 0)):
                if kind == rawnl.RTM_NEWLINK:
                    self._on_link(kind, body, report=False)
        finally:
            nl.close()

    def _run(self) -> None:
        assert self._sock is not None
        sock = self._sock
        buf = bytearray(1024 * 1024)
        while True:
            ready, _, _ = select.select([sock.fileno(), self._stop_r], [], [])
            if self._stop_r in ready:
                return
            try:
                n = sock.recv_into(buf)
            except OSError as exc:
                if exc.errno == errno.ENOBUFS:
                    self._emit("netlink event overflow: events lost")
                    continue
                _log.error("netlink event socket failed: %s", exc)
                self._emit(f"netlink event socket failed: {exc}")
                return
            try:
                self._dispatch(bytes(buf[:n]))
            except Exception:  # a parse bug must not kill monitoring silently; resync instead
                _log.exception("failed to parse a netlink event")
                self._emit("unparsable netlink event")

    def _emit(self, reason: str) -> None:
        _log.info("netlink event: %s", reason)
        self._callback(reason)

    def _dispatch(self, data: bytes) -> None:
        off = 0
        n = len(data)
        while off + 16 <= n:
            ln, kind, _flags, _seq, pid = rawnl.NLMSGHDR.unpack_from(data, off)
            if ln < 16:
                return
            body = data[off + 16 : off + ln]
            off += (ln + 3) & ~3
            if pid and pid in rawnl.OWN_PORTIDS:
                continue
            if kind in (rawnl.RTM_NEWLINK, rawnl.RTM_DELLINK):
                self._on_link(kind, body, report=True)
            elif kind == rawnl.RTM_DELROUTE:
                self._on_route(body)
            elif kind == rawnl.RTM_DELNEXTHOP:
                _fam, _scope, proto, _r, _f = rawnl.NHMSG.unpack_from(body, 0)
                if proto == RTPROT_FABRIC:
                    attrs = rawnl.parse_attrs(body, 8, len(body))
                    self._emit(f"nexthop {rawnl.u32(attrs.get(rawnl.NHA_ID, bytes(4)))} deleted")
            elif kind == rawnl.RTM_DELNEIGH:
                self._on_neigh(body)
            elif kind == rawnl.RTM_DELRULE:
                attrs = rawnl.parse_attrs(body, 12, len(body))
                proto = attrs.get(rawnl.FRA_PROTOCOL)
                if proto and proto[0] == RTPROT_FABRIC:
                    self._emit("rule deleted")

    def _on_link(self, kind: int, body: bytes, *, report: bool) -> None:
        _f, _p, _t, ifindex, flags, change = rawnl.IFINFOMSG.unpack_from(body, 0)
        attrs = rawnl.parse_attrs(body, 16, len(body))
        name = rawnl.cstr(attrs.get(rawnl.IFLA_IFNAME, b""))
        if name not in self._names:
            if self._ifindex.get(ifindex) in self._names:  # renamed away from our name
                del self._ifindex[ifindex]
                if report:
                    self._emit(f"link {name} (was one of ours) renamed")
            return
        if kind == rawnl.RTM_DELLINK:
            self._ifindex.pop(ifindex, None)
            if report:
                self._emit(f"link {name} deleted")
            return
        self._ifindex[ifindex] = name
        if report and change & rawnl.IFF_UP and not flags & rawnl.IFF_UP:
            self._emit(f"link {name} set down")

    def _on_route(self, body: bytes) -> None:
        _fam, dst_len, _sl, _tos, table, proto, _scope, _type, _flags = rawnl.RTMSG.unpack_from(body, 0)
        if proto != RTPROT_FABRIC:
            return
        attrs = rawnl.parse_attrs(body, 12, len(body))
        if rawnl.RTA_TABLE in attrs:
            table = rawnl.u32(attrs[rawnl.RTA_TABLE])
        if table != self._table:
            return
        dst = attrs.get(rawnl.RTA_DST)
        where = socket.inet_ntop(socket.AF_INET6 if len(dst) == 16 else socket.AF_INET, dst) if dst else "default"
        self._emit(f"route {where}/{dst_len} deleted")

    def _on_neigh(self, body: bytes) -> None:
        family, _p1, _p2, ifindex, state, _flags, _type = rawnl.NDMSG.unpack_from(body, 0)
        name = self._ifindex.get(ifindex)
        if name is None:
            return
        if family == socket.AF_BRIDGE:
            attrs = rawnl.parse_attrs(body, 12, len(body))
            key = (ifindex, attrs.get(rawnl.NDA_LLADDR, b""), attrs.get(rawnl.NDA_DST, b""))
            if not rawnl.was_expected_fdb_delete(key):
                self._emit(f"FDB entry {rawnl.mac_text(key[1])} on {name} deleted")
        elif state & rawnl.NUD_PERMANENT:
            self._emit(f"neighbour on {name} deleted")
