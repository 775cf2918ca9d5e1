"""A small raw rtnetlink codec for the hot path: many messages per ``sendmsg``, acks by sequence.

Why this exists: pyroute2 spends 0.3-0.8 ms encoding each message, so 10,000 FDB entries take
seconds of Python. The hot messages (neighbour, FDB, nexthop and route add/delete) have a fixed,
tiny shape, so we pack them with :mod:`struct` ourselves and let pyroute2 keep everything that is
rare (links, addresses, rules).

Wire format (``linux/netlink.h``, ``linux/rtnetlink.h``, ``linux/neighbour.h``,
``linux/nexthop.h``): every message is ``nlmsghdr`` (len u32, type u16, flags u16, seq u32,
pid u32), a family header (``ndmsg`` 12 bytes, ``rtmsg`` 12 bytes, ``nhmsg`` 8 bytes,
``ifinfomsg`` 16 bytes) and 4-byte aligned ``rtattr`` TLVs (len u16, type u16, value).

How a batch runs (:meth:`NetlinkSocket.batch`):

1. Each entry becomes one message with ``NLM_F_ACK`` and its own sequence number
   (``seq0 + i``); up to ``chunk`` messages are concatenated and sent in one ``send``.
2. rtnetlink processes the buffer synchronously inside ``sendmsg``, one message after the other,
   and *continues after a failing message*; every message produces one ``NLMSG_ERROR`` (error 0
   is the ack). ``NETLINK_CAP_ACK`` keeps those acks small (no echoed payload) and
   ``NETLINK_EXT_ACK`` adds the kernel's text reason, which ends up in the report.
3. We read acks until every sequence number of the chunk has answered and map each non-zero
   error back to its entry index. The receive buffer is made big (``SO_RCVBUFFORCE``) because
   a chunk's acks all sit in it at once; losing acks (``ENOBUFS``) marks the unanswered
   entries failed, which schedules a resync.

Dumps (:meth:`NetlinkSocket.dump`) send one ``NLM_F_DUMP`` request and collect the multipart
answer until ``NLMSG_DONE``. ``NETLINK_GET_STRICT_CHK`` lets the kernel filter route dumps by
table and protocol; callers still check the fields themselves (older kernels ignore filters).
An interrupted dump (``NLM_F_DUMP_INTR``: the table changed while dumping) is retried.
"""

from __future__ import annotations

import contextlib
import errno as errno_mod
import logging
import os
import socket
import struct
import threading
import time
from collections.abc import Sequence

from fabric import netns as namespaces

_log = logging.getLogger(__name__)

# --- netlink.h ---------------------------------------------------------------------------
NETLINK_ROUTE = 0
NLMSG_NOOP = 1
NLMSG_ERROR = 2
NLMSG_DONE = 3
NLMSG_OVERRUN = 4
NLM_F_REQUEST = 0x1
NLM_F_MULTI = 0x2
NLM_F_ACK = 0x4
NLM_F_DUMP_INTR = 0x10
NLM_F_DUMP = 0x300
NLM_F_REPLACE = 0x100
NLM_F_EXCL = 0x200
NLM_F_CREATE = 0x400
NLM_F_APPEND = 0x800
NLM_F_ACK_TLVS = 0x200  # in NLMSG_ERROR flags
NLMSGERR_ATTR_MSG = 1
SOL_NETLINK = 270
NETLINK_ADD_MEMBERSHIP = 1
NETLINK_CAP_ACK = 10
NETLINK_EXT_ACK = 11
NETLINK_GET_STRICT_CHK = 12
SO_RCVBUFFORCE = 33
SO_SNDBUFFORCE = 32

# --- rtnetlink.h ---------------------------------------------------------------------------
RTM_NEWLINK = 16
RTM_DELLINK = 17
RTM_GETLINK = 18
RTM_NEWADDR = 20
RTM_DELADDR = 21
RTM_GETADDR = 22
RTM_NEWROUTE = 24
RTM_DELROUTE = 25
RTM_GETROUTE = 26
RTM_NEWNEIGH = 28
RTM_DELNEIGH = 29
RTM_GETNEIGH = 30
RTM_NEWRULE = 32
RTM_DELRULE = 33
RTM_NEWNEXTHOP = 104
RTM_DELNEXTHOP = 105
RTM_GETNEXTHOP = 106

RTA_DST = 1
RTA_OIF = 4
RTA_GATEWAY = 5
RTA_PRIORITY = 6
RTA_TABLE = 15
RTA_NH_ID = 30
RTN_UNICAST = 1
RT_SCOPE_UNIVERSE = 0
RT_SCOPE_LINK = 253
RTNH_F_ONLINK = 4

NDA_DST = 1
NDA_LLADDR = 2
NDA_VNI = 7
NDA_IFINDEX = 8
NUD_NOARP = 0x40
NUD_PERMANENT = 0x80
NTF_SELF = 0x02

NHA_ID = 1
NHA_GROUP = 2
NHA_GROUP_TYPE = 3
NHA_BLACKHOLE = 4
NHA_OIF = 5
NHA_GATEWAY = 6
NHA_RES_GROUP = 12
NEXTHOP_GRP_TYPE_MPATH = 0
NEXTHOP_GRP_TYPE_RES = 1
NHA_RES_GROUP_BUCKETS = 1
NHA_RES_GROUP_IDLE_TIMER = 2
NHA_RES_GROUP_UNBALANCED_TIMER = 3
NLA_F_NESTED = 0x8000
#: ``struct nexthop_grp``: member id u32, weight-1 u8, two reserved fields.
NH_GRP = struct.Struct("=IBBH")
#: clock_t ticks per second of the resilient group's timers (USER_HZ).
USER_HZ = 100

IFLA_ADDRESS = 1
IFLA_IFNAME = 3
IFLA_MTU = 4
IFLA_LINKINFO = 18
IFLA_INFO_KIND = 1
IFLA_INFO_DATA = 2
IFLA_VXLAN_ID = 1
IFLA_VXLAN_LINK = 3
IFLA_VXLAN_LOCAL = 4
IFLA_VXLAN_LEARNING = 7
IFLA_VXLAN_PORT = 15
IFLA_VXLAN_LOCAL6 = 17
IFF_UP = 0x1

FRA_PRIORITY = 6
FRA_TABLE = 15
FRA_PROTOCOL = 21

RTNLGRP_LINK = 1
RTNLGRP_NEIGH = 3
RTNLGRP_IPV4_ROUTE = 7
RTNLGRP_IPV4_RULE = 8
RTNLGRP_IPV6_ROUTE = 11
RTNLGRP_NEXTHOP = 32

NLMSGHDR = struct.Struct("=IHHII")
NDMSG = struct.Struct("=BBHiHBB")
RTMSG = struct.Struct("=BBBBBBBBI")
NHMSG = struct.Struct("=BBBBI")
IFINFOMSG = struct.Struct("=BBHiII")
RTATTR = struct.Struct("=HH")
_U32_ATTR = struct.Struct("=HHI")
_ERR = struct.Struct("=i")

#: Port ids of every rtnetlink socket this process opened for changes: the event monitor ignores
#: notifications caused by our own requests (the kernel stamps them with the requester's port id).
OWN_PORTIDS: set[int] = set()
_OWN_LOCK = threading.Lock()


#: FDB deletes we are about to make, (ifindex, mac, dst) -> expiry (monotonic seconds). vxlan's FDB
#: notifications carry port id 0 whoever asked, so the event monitor recognises ours by content.
_EXPECTED_FDB_DELETES: dict[tuple[int, bytes, bytes], float] = {}
_EXPECT_TTL = 10.0


def expect_fdb_deletes(keys: Sequence[tuple[int, bytes, bytes]]) -> None:
    """Register FDB deletes this process is about to send (call *before* sending)."""
    now = time.monotonic()
    with _OWN_LOCK:
        if len(_EXPECTED_FDB_DELETES) > 100_000:
            for key in [k for k, t in _EXPECTED_FDB_DELETES.items() if t < now]:
                del _EXPECTED_FDB_DELETES[key]
        deadline = now + _EXPECT_TTL
        for key in keys:
            _EXPECTED_FDB_DELETES[key] = deadline


def was_expected_fdb_delete(key: tuple[int, bytes, bytes]) -> bool:
    with _OWN_LOCK:
        deadline = _EXPECTED_FDB_DELETES.pop(key, None)
    return deadline is not None and deadline >= time.monotonic()


class NetlinkFailure(OSError):
    """A whole netlink request failed (not a per-entry error): errno plus the kernel's reason."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(code, message)
        self.code = code


def attr(kind: int, value: bytes) -> bytes:
    """One rtattr TLV, padded to 4 bytes."""
    n = 4 + len(value)
    return RTATTR.pack(n, kind) + value + b"\0" * ((4 - n % 4) % 4)


def u32_attr(kind: int, value: int) -> bytes:
    return _U32_ATTR.pack(8, kind, value)


def parse_attrs(buf: bytes, off: int, end: int) -> dict[int, bytes]:
    """TLVs in ``buf[off:end]`` as ``{type: value}`` (nested flag masked off; last one wins)."""
    out: dict[int, bytes] = {}
    unpack = RTATTR.unpack_from
    while off + 4 <= end:
        ln, kind = unpack(buf, off)
        if ln < 4:
            break
        out[kind & 0x3FFF] = buf[off + 4 : off + ln]
        off += (ln + 3) & ~3
    return out


def u32(value: bytes) -> int:
    return int.from_bytes(value[:4], "little")


def cstr(value: bytes) -> str:
    return value.split(b"\0", 1)[0].decode("utf-8", "replace")


class NetlinkSocket:
    """One NETLINK_ROUTE socket used synchronously from one thread at a time."""

    def __init__(
        self,
        *,
        netns: str | None = None,
        groups: Sequence[int] = (),
        rcvbuf: int = 32 * 1024 * 1024,
        chunk: int = 1000,
        strict: bool = True,
    ) -> None:
        self.sock = namespaces.netlink_socket(netns, NETLINK_ROUTE)
        try:
            self._setup(groups, rcvbuf, strict)
        except BaseException:
            self.sock.close()
            raise
        self.chunk = chunk
        self._seq = 1
        self._buf = bytearray(4 * 1024 * 1024)
        self.portid: int = self.sock.getsockname()[0]
        with _OWN_LOCK:
            OWN_PORTIDS.add(self.portid)

    def _setup(self, groups: Sequence[int], rcvbuf: int, strict: bool) -> None:
        s = self.sock
        try:
            s.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, rcvbuf)
        except PermissionError:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1024 * 1024)
        for opt in (NETLINK_CAP_ACK, NETLINK_EXT_ACK):
            with contextlib.suppress(OSError):
                s.setsockopt(SOL_NETLINK, opt, 1)
        if strict:
            with contextlib.suppress(OSError):
                s.setsockopt(SOL_NETLINK, NETLINK_GET_STRICT_CHK, 1)
        s.bind((0, 0))
        for group in groups:
            s.setsockopt(SOL_NETLINK, NETLINK_ADD_MEMBERSHIP, group)

    def close(self) -> None:
        with _OWN_LOCK:
            OWN_PORTIDS.discard(self.portid)
        self.sock.close()

    def fileno(self) -> int:
        return self.sock.fileno()

    def _next_seqs(self, n: int) -> int:
        seq0 = self._seq
        self._seq = (self._seq + n) & 0x7FFFFFFF or 1
        if self._seq < seq0:  # wrapped: restart so a chunk's numbers stay contiguous
            seq0, self._seq = 1, n + 1
        return seq0

    @staticmethod
    def _error_text(buf: bytes, off: int, end: int, flags: int) -> str:
        if not flags & NLM_F_ACK_TLVS:
            return ""
        # error (4) + the original nlmsghdr (16; payload capped by NETLINK_CAP_ACK) + TLVs
        attrs = parse_attrs(buf, off + 20, end)
        msg = attrs.get(NLMSGERR_ATTR_MSG)
        return cstr(msg) if msg else ""

    def batch(self, msg_type: int, flags: int, payloads: Sequence[bytes]) -> dict[int, tuple[int, str]]:
        """Send one message per payload; return ``{index: (errno, reason)}`` for failed entries."""
        failures: dict[int, tuple[int, str]] = {}
        n = len(payloads)
        pack = NLMSGHDR.pack
        flags |= NLM_F_REQUEST | NLM_F_ACK
        for start in range(0, n, self.chunk):
            stop = min(n, start + self.chunk)
            count = stop - start
            seq0 = self._next_seqs(count)
            parts: list[bytes] = []
            append = parts.append
            seq = seq0
            for i in range(start, stop):
                p = payloads[i]
                append(pack(16 + len(p), msg_type, flags, seq, 0))
                append(p)
                seq += 1
            self.sock.send(b"".join(parts))
            answered = 0
            try:
                answered = self._collect_acks(seq0, count, start, failures)
            except OSError as exc:
                code = exc.errno or errno_mod.EIO
                _log.warning("netlink batch lost acks after %d of %d: %s", answered, count, exc)
                for i in range(start, stop):
                    if i not in failures:
                        failures[i] = (code, f"ack lost: {exc}")
        return failures

    def _collect_acks(self, seq0: int, count: int, start: int, failures: dict[int, tuple[int, str]]) -> int:
        seen = 0
        buf = self._buf
        unpack_hdr = NLMSGHDR.unpack_from
        unpack_err = _ERR.unpack_from
        while seen < count:
            n = self.sock.recv_into(buf)
            off = 0
            while off + 16 <= n:
                ln, kind, mflags, seq, _pid = unpack_hdr(buf, off)
                if ln < 16:
                    break
                if kind == NLMSG_ERROR:
                    idx = seq - seq0
                    if 0 <= idx < count:
                        seen += 1
                        (code,) = unpack_err(buf, off + 16)
                        if code:
                            text = self._error_text(bytes(buf[off + 16 : off + ln]), 0, ln - 16, mflags)
                            failures[start + idx] = (-code, text or os.strerror(-code))
                off += (ln + 3) & ~3
        return seen

    def request(self, msg_type: int, flags: int, payload: bytes) -> None:
        """One message with an ack; raise :class:`NetlinkFailure` on error."""
        failed = self.batch(msg_type, flags, [payload])
        if failed:
            code, text = failed[0]
            raise NetlinkFailure(code, text)

    def dump(self, msg_type: int, payload: bytes) -> list[tuple[int, bytes]]:
        """A full dump as ``[(message type, message bytes without nlmsghdr)]``."""
        for _attempt in range(5):
            result, interrupted = self._dump_once(msg_type, payload)
            if not interrupted:
                return result
            _log.debug("dump of type %d interrupted by a concurrent change; retrying", msg_type)
        return result

    def _dump_once(self, msg_type: int, payload: bytes) -> tuple[list[tuple[int, bytes]], bool]:
        seq = self._next_seqs(1)
        self.sock.send(NLMSGHDR.pack(16 + len(payload), msg_type, NLM_F_REQUEST | NLM_F_DUMP, seq, 0) + payload)
        out: list[tuple[int, bytes]] = []
        interrupted = False
        buf = self._buf
        unpack_hdr = NLMSGHDR.unpack_from
        while True:
            n = self.sock.recv_into(buf)
            data = bytes(buf[:n])
            off = 0
            while off + 16 <= n:
                ln, kind, mflags, mseq, _pid = unpack_hdr(data, off)
                if ln < 16:
                    break
                if mseq != seq:
                    off += (ln + 3) & ~3
                    continue
                if mflags & NLM_F_DUMP_INTR:
                    interrupted = True
                if kind == NLMSG_DONE:
                    return out, interrupted
                if kind == NLMSG_ERROR:
                    (code,) = _ERR.unpack_from(data, off + 16)
                    if code:
                        text = self._error_text(data[off + 16 : off + ln], 0, ln - 16, mflags)
                        raise NetlinkFailure(-code, text or os.strerror(-code))
                    return out, interrupted
                out.append((kind, data[off + 16 : off + ln]))
                off += (ln + 3) & ~3


# --- message bodies --------------------------------------------------------------------------


def neigh_body(family: int, ifindex: int, state: int, flags: int, dst: bytes, lladdr: bytes | None) -> bytes:
    body = NDMSG.pack(family, 0, 0, ifindex, state, flags, 0) + attr(NDA_DST, dst)
    if lladdr is not None:
        body += attr(NDA_LLADDR, lladdr)
    return body


def route_body(family: int, table: int, dst: bytes, dst_len: int, protocol: int, nhid: int) -> bytes:
    body = RTMSG.pack(
        family, dst_len, 0, 0, table if table < 256 else 252, protocol, RT_SCOPE_UNIVERSE, RTN_UNICAST, 0
    )
    body += attr(RTA_DST, dst) + u32_attr(RTA_TABLE, table)
    if nhid:
        body += u32_attr(RTA_NH_ID, nhid)
    return body


def nexthop_body(nhid: int, family: int, protocol: int, oif: int, gateway: bytes | None, onlink: bool) -> bytes:
    """``ip nexthop add id N [via GW] dev OIF [onlink]``; no gateway = a device nexthop."""
    return (
        NHMSG.pack(family, 0, protocol, 0, RTNH_F_ONLINK if onlink else 0)
        + u32_attr(NHA_ID, nhid)
        + u32_attr(NHA_OIF, oif)
        + (attr(NHA_GATEWAY, gateway) if gateway is not None else b"")
    )


def nexthop_group_body(
    nhid: int, protocol: int, members: Sequence[int], buckets: int, idle_timer_s: float, unbalanced_timer_s: float
) -> bytes:
    """``ip nexthop add id N group a/b/... type resilient buckets B idle_timer I
    unbalanced_timer U``: equal weights (``nexthop_grp.weight`` is weight - 1). A group has no
    family of its own (AF_UNSPEC); its members carry the addresses."""
    group = b"".join(NH_GRP.pack(m, 0, 0, 0) for m in members)
    res = (
        attr(NHA_RES_GROUP_BUCKETS, struct.pack("=H", buckets))
        + u32_attr(NHA_RES_GROUP_IDLE_TIMER, int(idle_timer_s * USER_HZ))
        + u32_attr(NHA_RES_GROUP_UNBALANCED_TIMER, int(unbalanced_timer_s * USER_HZ))
    )
    return (
        NHMSG.pack(socket.AF_UNSPEC, 0, protocol, 0, 0)
        + u32_attr(NHA_ID, nhid)
        + attr(NHA_GROUP, group)
        + attr(NHA_GROUP_TYPE, struct.pack("=H", NEXTHOP_GRP_TYPE_RES))
        + attr(NHA_RES_GROUP | NLA_F_NESTED, res)
    )


def group_members(value: bytes) -> tuple[int, ...]:
    """The member ids of an ``NHA_GROUP`` attribute."""
    n = len(value) // NH_GRP.size
    return tuple(NH_GRP.unpack_from(value, i * NH_GRP.size)[0] for i in range(n))


def mac_bytes(mac: str) -> bytes:
    try:
        raw = bytes.fromhex(mac.replace(":", ""))
    except ValueError:
        raw = b""
    if len(raw) != 6:
        raise ValueError(f"bad MAC address {mac!r}: expected six octets aa:bb:cc:dd:ee:ff")
    return raw


def mac_text(raw: bytes) -> str:
    return ":".join(f"{b:02x}" for b in raw)
