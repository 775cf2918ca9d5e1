"""Underlay carrier-up: drop the underlay's unresolved neighbour entries so peers re-resolve at once.

Why (issue 18, heal within 1 s)
-------------------------------
When the node's underlay device loses carrier the kernel flushes that device's neighbour
(ARP/ND) table. While the carrier is down the tunnel probes (:mod:`fabric.agent.probes`) keep
sending towards the peers, which recreates ``NUD_INCOMPLETE`` entries for the peers' underlay
addresses (they turn ``NUD_FAILED`` after the solicit budget). The kernel retries such an entry
only every ``retrans_time`` (1 s by default), and it does not retry early when the carrier comes
back: each entry resolves at its next retry, 0-1 s after the heal. The peers' entries for this
node stayed ``REACHABLE`` on their side, so they never solicit either. Measured in the
3-cluster lab (node a1 cut 2-4 s, 8 heals each, carrier-up -> the reflector sees mb -> ma
reachable): 0.12-1.01 s (mean 0.62) without this, 0.014-0.14 s (mean 0.08) with it, because
the next probe (every 100 ms) finds no entry and the kernel solicits at once.

The flow
--------
1. :class:`CarrierMonitor` joins ``RTNLGRP_LINK`` on its own NETLINK_ROUTE socket and reads it
   from the asyncio loop (``add_reader``: no thread, no polling). It learns every link's
   ``IFF_LOWER_UP`` from a dump at :meth:`CarrierMonitor.start`, then follows ``RTM_NEWLINK``
   notifications; :class:`CarrierTracker` (pure) turns them into "carrier came back on ifindex
   N" edges (``IFF_LOWER_UP`` off -> on; a link first seen already up is no edge).
2. The agent (:meth:`fabric.agent.agent.Agent._on_carrier_up`) ignores every ifindex but its
   underlay's (IPv4 and, when distinct, IPv6) and runs :func:`flush_unresolved` in its reconcile
   worker (netlink handles belong to that thread; a flush never races a pass).
3. :func:`flush_unresolved` dumps the device's neighbours (IPv4 and IPv6), keeps those
   :func:`unresolved` selects and deletes them; it counts them in
   ``fabric_agent_underlay_neighbours_flushed_total`` and logs once, at info, per carrier-up.
   A receive-buffer overflow (``ENOBUFS``) may have hidden an edge: it is treated as a
   carrier-up of every link (a flush of unresolved entries is harmless when nothing changed).

A narrow, deliberate exception to "delete only what we own"
-----------------------------------------------------------
The underlay's neighbours are not ours (:mod:`fabric.netlink.neighbours` owns only
``NUD_PERMANENT`` entries on our vxlan devices). We still delete, on the underlay device only
and only at carrier-up, entries in state exactly ``NUD_INCOMPLETE`` or ``NUD_FAILED``: these are
transient cache states that hold no link-layer address, that the kernel itself throws away on
carrier loss, and whose only effect after the heal is to delay the next solicitation. Deleting
one loses nothing a packet could use; the kernel recreates it on the next packet and solicits
immediately. Every other state (``PERMANENT``, ``NOARP``, ``REACHABLE``, ``STALE``, ``DELAY``,
``PROBE``), and so every static entry anyone (us included) programmed, is never touched. The one
race left: an entry that resolves between the dump and the delete is deleted while valid; the
cost is one extra ARP/NS by the next packet, not a lost path.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import socket
from collections.abc import Callable, Iterable, Sequence

import prometheus_client

from fabric import netns as namespaces
from fabric.netlink import dataplane as dataplane_mod
from fabric.netlink import objects, rawnl, tolerated

_log = logging.getLogger(__name__)

#: ``ndm_state`` bits (include/uapi/linux/neighbour.h).
NUD_INCOMPLETE = 0x01
NUD_FAILED = 0x20
#: The only states :func:`unresolved` selects: no link-layer address, kernel-transient.
UNRESOLVED_STATES = frozenset({NUD_INCOMPLETE, NUD_FAILED})
#: ``ifi_flags``: the driver reports carrier (RFC 2863 lower layer up).
IFF_LOWER_UP = 0x10000

FLUSHED = prometheus_client.Counter(
    "fabric_agent_underlay_neighbours_flushed_total",
    "Unresolved (INCOMPLETE/FAILED) underlay neighbour entries deleted when the underlay regained carrier",
)


def unresolved(neighbours: Iterable[dataplane_mod.KernelNeighbour]) -> list[dataplane_mod.KernelNeighbour]:
    """The entries a carrier-up may delete: state exactly INCOMPLETE or FAILED (see the module
    header for why). An entry with any other bit (PERMANENT, NOARP, a valid state) or with a
    link-layer address is kept, whatever else it shows."""
    return [n for n in neighbours if n.state in UNRESOLVED_STATES and not n.mac]


def flush_unresolved(dp: dataplane_mod.Dataplane, link: str) -> list[str]:
    """Delete ``link``'s unresolved neighbours (IPv4 and IPv6); return the addresses deleted.

    Runs in the agent's reconcile worker. An entry already gone (resolved-and-replaced or
    garbage-collected meanwhile) is not an error; any other failure is logged and the rest go on."""
    todo = unresolved(dp.list_neighbours(link))
    if not todo:
        return []
    entries = [objects.Neighbour(n.link, n.ip, "") for n in todo]
    failed: set[int] = set()
    for e in dp.del_neighbours(entries):
        failed.add(e.index)
        if not tolerated.already_gone("neighbours", e.errno):
            _log.warning("underlay %s: could not delete unresolved neighbour %s: %s", link, entries[e.index].ip,
                         e.message)
    return [e.ip for i, e in enumerate(entries) if i not in failed]


class CarrierTracker:
    """Carrier state per ifindex from link messages; reports the off -> on edges (pure)."""

    def __init__(self) -> None:
        self._up: dict[int, bool] = {}

    def learn(self, ifindex: int, flags: int) -> None:
        """Initial state (a dump): never an edge."""
        self._up[ifindex] = bool(flags & IFF_LOWER_UP)

    def update(self, ifindex: int, flags: int) -> bool:
        """A ``RTM_NEWLINK``: True when the carrier was known off and is on now."""
        now = bool(flags & IFF_LOWER_UP)
        was = self._up.get(ifindex)
        self._up[ifindex] = now
        return now and was is False

    def forget(self, ifindex: int) -> None:
        """A ``RTM_DELLINK``: the ifindex may be reused by another device."""
        self._up.pop(ifindex, None)

    def known(self) -> Sequence[int]:
        return list(self._up)


class CarrierMonitor:
    """``RTNLGRP_LINK`` read on the asyncio loop; ``callback(ifindex)`` on each carrier-up edge.

    ``callback`` runs on the loop thread and must not block (the agent hands the flush to its
    worker)."""

    def __init__(self, callback: Callable[[int], None], *, netns: str | None = None) -> None:
        self._callback = callback
        self._netns = netns
        self._tracker = CarrierTracker()
        self._sock: socket.socket | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def start(self) -> None:
        """Subscribe, then learn the current state (a change between the two shows up as a
        notification, so no edge is lost), then read on the running loop."""
        if self._sock is not None:
            raise RuntimeError("CarrierMonitor already started")
        loop = asyncio.get_running_loop()
        sock = namespaces.netlink_socket(self._netns, rawnl.NETLINK_ROUTE)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1024 * 1024)
            sock.bind((0, 0))
            sock.setsockopt(rawnl.SOL_NETLINK, rawnl.NETLINK_ADD_MEMBERSHIP, rawnl.RTNLGRP_LINK)
            sock.setblocking(False)
            nl = rawnl.NetlinkSocket(netns=self._netns, rcvbuf=1024 * 1024)
            try:
                for kind, body in nl.dump(rawnl.RTM_GETLINK, rawnl.IFINFOMSG.pack(0, 0, 0, 0, 0, 0)):
                    if kind == rawnl.RTM_NEWLINK:
                        _f, _p, _t, ifindex, flags, _c = rawnl.IFINFOMSG.unpack_from(body, 0)
                        self._tracker.learn(ifindex, flags)
            finally:
                nl.close()
            loop.add_reader(sock.fileno(), self._readable)
        except BaseException:
            sock.close()
            raise
        self._sock, self._loop = sock, loop

    def stop(self) -> None:
        if self._sock is None:
            return
        if self._loop is not None and not self._loop.is_closed():
            self._loop.remove_reader(self._sock.fileno())
        self._sock.close()
        self._sock = None

    def _readable(self) -> None:
        sock = self._sock
        if sock is None:
            return
        while True:
            try:
                data = sock.recv(1024 * 1024)
            except BlockingIOError:
                return
            except OSError as exc:
                if exc.errno == errno.ENOBUFS:
                    # Link events were lost, an edge among them perhaps: act as if every link
                    # came back (a flush of unresolved entries costs nothing when none did).
                    _log.info("netlink link events lost (ENOBUFS); treating as a carrier-up")
                    for ifindex in self._tracker.known():
                        self._callback(ifindex)
                    continue
                _log.error("carrier monitor socket failed: %s; carrier-up flushes stop", exc)
                self.stop()
                return
            try:
                self._dispatch(data)
            except Exception:  # a parse bug must not stop the loop; the feature is an optimisation
                _log.exception("failed to parse a netlink link event")

    def _dispatch(self, data: bytes) -> None:
        off, n = 0, len(data)
        while off + 16 <= n:
            ln, kind, _flags, _seq, _pid = rawnl.NLMSGHDR.unpack_from(data, off)
            if ln < 16:
                return
            body = data[off + 16 : off + ln]
            off += (ln + 3) & ~3
            if kind not in (rawnl.RTM_NEWLINK, rawnl.RTM_DELLINK) or len(body) < rawnl.IFINFOMSG.size:
                continue
            _f, _p, _t, ifindex, flags, _c = rawnl.IFINFOMSG.unpack_from(body, 0)
            if kind == rawnl.RTM_DELLINK:
                self._tracker.forget(ifindex)
            elif self._tracker.update(ifindex, flags):
                self._callback(ifindex)
