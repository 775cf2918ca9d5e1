"""A Python model of the global-IP translator (fabric/bpf/*.bpf.c), for the fuzz tests.

:func:`run` is a pure function: (attach point, Ethernet frame, mappings) -> :class:`Outcome`
(verdict, output bytes, drop reason). It is written from the programs' documented semantics (the
module headers of fabric/bpf/translate.py, xlate.h, parsing.h, csum.h, consts.h and the entry
files), not by transliterating the C, so that BPF_PROG_TEST_RUN output and model output are two
independent readings of one specification:

* A mapping (local CIDR, global CIDR) rewrites an address by keeping its host bits and taking
  the other prefix. Tunnel ingress: destination global -> local (and the *source* of the header
  quoted in an ICMP error). Tunnel egress: source local -> global (and the quoted
  *destination*). Hairpin: both, but only if the destination matched; then redirect to ingress.
* Every checksum that covers a changed word follows it incrementally (RFC 1624 eqn. 3, the
  kernel's csum_replace arithmetic): IPv4 header checksum, the L4 checksum over the
  pseudo-header (TCP, UDP, UDP-Lite, DCCP; ICMPv6 in IPv6; never ICMPv4, SCTP, ESP, GRE, ...),
  the quoted IPv4 header and quoted L4 checksums, and the ICMP checksum around the quote. A
  checksum that was bad stays exactly as bad. A UDP/UDP-Lite checksum of 0 means "none" and
  stays 0; a result of 0 is written as 0xffff (also in a quote: it is what the sender sent).
* No L4 header in a non-first fragment (addresses only). IPv6: up to XLATE_MAX_EXTHDRS (6)
  extension headers are walked; a routing header with segments left takes the destination
  out of the pseudo-header. A quoted IPv6 L4 checksum is fixed only directly behind the quoted
  header; a quoted checksum cut in half by the end of the quote is left as it is (it cannot be
  updated without its other byte).
* Tunnel egress translates the quote of an ICMP error also when the outer source is of no
  mapping (a node of ours reporting on a packet it forwarded to a pod): "a local address never
  reaches a cluster where it may belong to someone else" (tunnel_egress.bpf.c).
* A packet that matches a mapping but whose translation cannot be complete is dropped
  unmodified: L4 checksum field (or an ICMP header's 8 bytes) beyond the end, an extension
  header beyond the end (``l4_truncated``), more extension headers than walked
  (``exthdr_limit``). A packet matching no mapping is not parsed further and passes untouched.
* "The end" is the end of the frame (skb->len), not the IP length field.

Checksums use the kernel's representation: an updated checksum is the unique value in
[0, 0xfffe] congruent to the right one (one's complement has two zeros; the kernel's fold never
yields 0xffff), except UDP's 0 -> 0xffff.

:func:`residuals` is the independent half of the checksum check: for every checksum field it can
locate it returns the one's complement residual (0 for a correct checksum); translation must
leave every residual exactly as it was.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass

from fabric.bpf.translate import AttachPoint, Mapping
from fabric.bpf.translate import IPNetwork as IPNet

ETH_HLEN = 14
OK, SHOT, REDIRECT = 0, 2, 7  # TC_ACT_OK, TC_ACT_SHOT, TC_ACT_REDIRECT
MAX_EXTHDRS = 6  # XLATE_MAX_EXTHDRS

TCP, UDP, DCCP, UDPLITE, ICMP, ICMPV6 = 6, 17, 33, 136, 1, 58
HOP, ROUTING, FRAGMENT, AUTH, DEST = 0, 43, 44, 51, 60
EXTHDRS = (HOP, ROUTING, FRAGMENT, AUTH, DEST)
ICMP4_ERRORS = (3, 4, 5, 11, 12)
ICMP6_ERRORS = (1, 2, 3, 4)

DNAT, SNAT, HAIRPIN = 1, 2, 4
MODES = {
    AttachPoint.TUNNEL_INGRESS: DNAT,
    AttachPoint.TUNNEL_EGRESS: SNAT,
    AttachPoint.HAIRPIN: DNAT | SNAT | HAIRPIN,
}


@dataclass(frozen=True)
class Outcome:
    """What a program does to one frame. ``refused``: BPF_PROG_TEST_RUN itself rejects the frame
    (EINVAL: shorter than Ethernet, or than the IPv4/IPv6 header its EtherType announces)."""

    verdict: int
    data: bytes
    drop: str | None = None
    refused: bool = False


# --- one's complement arithmetic --------------------------------------------------------------


def sum16(data: bytes) -> int:
    """One's complement sum of big-endian 16-bit words (odd length: zero-padded), folded to
    [0, 0xffff]; 0 only for all-zero input."""
    if len(data) % 2:
        data += b"\0"
    s = sum(int.from_bytes(data[i:i + 2], "big") for i in range(0, len(data), 2))
    while s > 0xFFFF:
        s = (s & 0xFFFF) + (s >> 16)
    return s


def csum_update(csum: int, old: bytes, new: bytes) -> int:
    """RFC 1624 eqn. 3 as the kernel computes it: HC' = ~(~HC + ~m + m'), result in [0, 0xfffe]."""
    s = (0xFFFF - csum) + (0xFFFF - sum16(old)) + sum16(new)
    x = s % 0xFFFF or 0xFFFF
    return 0xFFFF - x


def residual(*parts: bytes) -> int:
    """0 if the parts (checksum field included) sum to one's complement zero, else the error;
    modulo 0xffff so that both zeros count as zero."""
    return (0xFFFF - sum16(b"".join(parts))) % 0xFFFF


# --- mappings -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Tables:
    """The four LPM maps as the loader fills them (translate.Translator.set_mappings)."""

    dnat: tuple[tuple[IPNet, IPNet], ...]  # (key prefix, target prefix)
    snat: tuple[tuple[IPNet, IPNet], ...]

    @classmethod
    def of(cls, mappings: Iterable[Mapping]) -> Tables:
        ms = list(mappings)
        return cls(tuple((m.global_, m.local) for m in ms), tuple((m.local, m.global_) for m in ms))

    def lookup(self, kind: int, addr: bytes) -> bytes | None:
        """Longest-prefix match of addr in the dnat or snat map -> the rewritten address."""
        a = ipaddress.ip_address(addr)
        best = None
        for key, target in self.dnat if kind == DNAT else self.snat:
            if key.version == a.version and a in key and (best is None or key.prefixlen > best[0].prefixlen):
                best = (key, target)
        if best is None:
            return None
        key, target = best
        host = int(a) & int(key.hostmask)
        return (int(target.network_address) | host).to_bytes(len(addr), "big")


# --- L4 location --------------------------------------------------------------------------------


def csum_field(proto: int, v6: bool) -> int | None:
    """Offset of the pseudo-header checksum in the L4 header of ``proto``, or None."""
    if proto == TCP:
        return 16
    if proto in (UDP, UDPLITE, DCCP):
        return 6
    if proto == ICMPV6 and v6:
        return 2
    return None


@dataclass
class L4:
    off: int | None  # None: no L4 header here (non-first fragment)
    proto: int
    csum_off: int | None
    drop: str | None = None
    dst_in_pseudo: bool = True  # False behind an IPv6 routing header with segments left


def _locate(buf: bytes, proto: int, off: int, v6: bool) -> L4:
    field = csum_field(proto, v6)
    l4 = L4(off, proto, None if field is None else off + field)
    if l4.csum_off is not None and l4.csum_off + 2 > len(buf):
        l4.drop = "l4_truncated"
    if proto == (ICMPV6 if v6 else ICMP) and off + 8 > len(buf):
        l4.drop = "l4_truncated"
    return l4


def locate_v4(buf: bytes, l3: int) -> L4:
    ihl = buf[l3] & 0xF
    proto = buf[l3 + 9]
    if int.from_bytes(buf[l3 + 6:l3 + 8], "big") & 0x1FFF:
        return L4(None, proto, None)
    return _locate(buf, proto, l3 + ihl * 4, False)


def locate_v6(buf: bytes, l3: int) -> L4:
    nh = buf[l3 + 6]
    off = l3 + 40
    dst_final = True
    for _ in range(MAX_EXTHDRS):
        if nh not in EXTHDRS:
            break
        if off + 8 > len(buf):
            return L4(None, nh, None, "l4_truncated")
        hdr = buf[off:off + 8]
        if nh == FRAGMENT:
            nh, off = hdr[0], off + 8
            if int.from_bytes(hdr[2:4], "big") & 0xFFF8:
                return L4(None, nh, None, dst_in_pseudo=dst_final)
            continue
        if nh == ROUTING and hdr[3]:
            dst_final = False
        off += (hdr[1] + 2) * 4 if nh == AUTH else (hdr[1] + 1) * 8
        nh = hdr[0]
    else:
        if nh in EXTHDRS:
            return L4(None, nh, None, "exthdr_limit")
    l4 = _locate(buf, nh, off, True)
    l4.dst_in_pseudo = dst_final
    return l4


# --- the translation ------------------------------------------------------------------------------


class _Packet:
    """The frame being rewritten, with the checksum bookkeeping of one address change."""

    def __init__(self, frame: bytes) -> None:
        self.b = bytearray(frame)

    def get16(self, off: int) -> int:
        return int.from_bytes(self.b[off:off + 2], "big")

    def put16(self, off: int, v: int) -> None:
        self.b[off:off + 2] = v.to_bytes(2, "big")

    def fix(self, off: int, old: bytes, new: bytes, *, udp: bool = False) -> None:
        """Checksum at off follows old -> new; UDP: 0 stays 0, a result of 0 becomes 0xffff."""
        cur = self.get16(off)
        if udp and cur == 0:
            return
        v = csum_update(cur, old, new)
        self.put16(off, 0xFFFF if udp and v == 0 else v)


def _is_udp(proto: int) -> bool:
    return proto in (UDP, UDPLITE)


def _quote(p: _Packet, icmp: int, mode: int, tables: Tables, v6: bool) -> None:
    """Translate the header quoted in the ICMP error at ``icmp`` and fix the ICMP checksum by
    every byte that changed inside the message."""
    q = icmp + 8
    alen = 16 if v6 else 4
    if v6:
        if len(p.b) < q + 40 or p.b[q] >> 4 != 6:
            return
        nh = p.b[q + 6]
        field = csum_field(nh, True)
        l4csum = None if field is None else q + 40 + field
        proto, ipcsum, src, dst = nh, None, q + 8, q + 24
    else:
        if len(p.b) < q + 20 or p.b[q] >> 4 != 4 or p.b[q] & 0xF < 5:
            return
        l4 = locate_v4(bytes(p.b), q)
        proto, ipcsum, src, dst, l4csum = l4.proto, q + 10, q + 12, q + 16, l4.csum_off
    if l4csum is not None and l4csum + 2 > len(p.b):
        l4csum = None
    before = bytes(p.b[icmp:])
    for kind, off in ((DNAT, src), (SNAT, dst)):
        if not mode & kind:
            continue
        old = bytes(p.b[off:off + alen])
        new = tables.lookup(kind, old)
        if new is None:
            continue
        if ipcsum is not None:
            p.fix(ipcsum, old, new)
        if l4csum is not None:
            p.fix(l4csum, old, new, udp=_is_udp(proto))
        p.b[off:off + alen] = new
    after = bytes(p.b[icmp:])
    if after != before:
        # the ICMP checksum field itself is unchanged in before/after; every change is at an even
        # offset from the ICMP header, so the whole message can be summed as it stands
        p.fix(icmp + 2, before, after)


def run(point: AttachPoint, frame: bytes, mappings: Iterable[Mapping] | Tables) -> Outcome:
    """What ``point``'s program returns for ``frame`` with ``mappings`` loaded."""
    tables = mappings if isinstance(mappings, Tables) else Tables.of(mappings)
    mode = MODES[point]
    untouched = Outcome(OK, frame)
    if len(frame) < ETH_HLEN:
        return Outcome(-1, frame, refused=True)
    ethertype = int.from_bytes(frame[12:14], "big")
    l3 = ETH_HLEN
    if ethertype == 0x0800:
        if len(frame) < l3 + 20:
            return Outcome(-1, frame, refused=True)
        if frame[l3] >> 4 != 4 or frame[l3] & 0xF < 5:
            return untouched
        v6, alen, src, dst = False, 4, l3 + 12, l3 + 16
    elif ethertype == 0x86DD:
        if len(frame) < l3 + 40:
            return Outcome(-1, frame, refused=True)
        if frame[l3] >> 4 != 6:
            return untouched
        v6, alen, src, dst = True, 16, l3 + 8, l3 + 24
    else:
        return untouched

    new_dst = tables.lookup(DNAT, frame[dst:dst + alen]) if mode & DNAT else None
    if mode & HAIRPIN and new_dst is None:
        return untouched
    new_src = tables.lookup(SNAT, frame[src:src + alen]) if mode & SNAT else None
    icmp = ICMPV6 if v6 else ICMP
    if new_dst is None and new_src is None:
        if mode != SNAT:
            return untouched
        # tunnel egress: an ICMP error from an address of no mapping (a node of ours) still has
        # its quote translated (no local destination may leave in it); nothing else changes
        l4 = locate_v6(frame, l3) if v6 else locate_v4(frame, l3)
        if l4.drop or l4.off is None or l4.proto != icmp or frame[l4.off] not in (ICMP6_ERRORS if v6 else ICMP4_ERRORS):
            return untouched
        p = _Packet(frame)
        _quote(p, l4.off, mode, tables, v6)
        return Outcome(OK, bytes(p.b))

    l4 = locate_v6(frame, l3) if v6 else locate_v4(frame, l3)
    if l4.drop:
        return Outcome(SHOT, frame, l4.drop)
    p = _Packet(frame)
    if l4.off is not None and l4.proto == icmp and frame[l4.off] in (ICMP6_ERRORS if v6 else ICMP4_ERRORS):
        _quote(p, l4.off, mode, tables, v6)
    for off, new, in_pseudo in ((dst, new_dst, l4.dst_in_pseudo), (src, new_src, True)):
        if new is None:
            continue
        old = bytes(p.b[off:off + alen])
        if l4.csum_off is not None and in_pseudo:
            p.fix(l4.csum_off, old, new, udp=_is_udp(l4.proto))
        if not v6:
            p.fix(l3 + 10, old, new)
        p.b[off:off + alen] = new
    return Outcome(REDIRECT if mode & HAIRPIN else OK, bytes(p.b))


# --- independent checksum residuals --------------------------------------------------------------


def _pseudo(buf: bytes, l3: int, v6: bool, l4len: int, proto: int, dst_in_pseudo: bool) -> bytes:
    if v6:
        dst = buf[l3 + 24:l3 + 40] if dst_in_pseudo else b""
        return buf[l3 + 8:l3 + 24] + dst + l4len.to_bytes(4, "big") + bytes([0, 0, 0, proto])
    return buf[l3 + 12:l3 + 20] + bytes([0, proto]) + l4len.to_bytes(2, "big")


def residuals(frame: bytes, *, quoted: bool = True) -> dict[str, int]:
    """Residual of every checksum of ``frame`` that the translator maintains and that lies in the
    frame: ``ip``, ``l4`` and, in an ICMP error, ``icmp``, ``quoted_ip``, ``quoted_l4``. A sum
    over the bytes present: a partial L4 (first fragment, truncated quote) has a residual too,
    and translation must leave it unchanged like any other. UDP checksums of 0 are left out.
    The L4 length in the pseudo-header is what the frame holds (it does not change)."""
    out: dict[str, int] = {}
    if len(frame) < ETH_HLEN:
        return out
    ethertype = int.from_bytes(frame[12:14], "big")
    l3 = ETH_HLEN
    if ethertype == 0x0800 and len(frame) >= l3 + 20 and frame[l3] >> 4 == 4 and frame[l3] & 0xF >= 5:
        v6 = False
        out.update(_ip4_residual("ip", frame, l3))
        l4 = locate_v4(frame, l3)
    elif ethertype == 0x86DD and len(frame) >= l3 + 40 and frame[l3] >> 4 == 6:
        v6 = True
        l4 = locate_v6(frame, l3)
    else:
        return out
    if l4.drop or l4.off is None:
        return out
    seg = frame[l4.off:]
    if l4.csum_off is not None and not (_is_udp(l4.proto) and frame[l4.csum_off:l4.csum_off + 2] == b"\0\0"):
        out["l4"] = residual(_pseudo(frame, l3, v6, len(seg), l4.proto, l4.dst_in_pseudo), seg)
    if l4.proto == ICMP and not v6:
        out["icmp"] = residual(seg)  # no pseudo-header: must not change at all
    if quoted and l4.proto == (ICMPV6 if v6 else ICMP) and seg[0] in (ICMP6_ERRORS if v6 else ICMP4_ERRORS):
        out.update(_quote_residuals(frame, l4.off + 8, v6))
    return out


def _ip4_residual(name: str, buf: bytes, l3: int) -> dict[str, int]:
    return {name: residual(buf[l3:l3 + min((buf[l3] & 0xF) * 4, len(buf) - l3)])}


def _quote_residuals(frame: bytes, q: int, v6: bool) -> dict[str, int]:
    out: dict[str, int] = {}
    if v6:
        if len(frame) < q + 40 or frame[q] >> 4 != 6:
            return out
        proto, off, field = frame[q + 6], q + 40, csum_field(frame[q + 6], True)
    else:
        if len(frame) < q + 20 or frame[q] >> 4 != 4 or frame[q] & 0xF < 5:
            return out
        out.update(_ip4_residual("quoted_ip", frame, q))
        l4 = locate_v4(frame, q)
        if l4.off is None or l4.csum_off is None:
            return out
        proto, off, field = l4.proto, l4.off, l4.csum_off - l4.off
    if field is None or off + field + 2 > len(frame):
        return out
    if _is_udp(proto) and frame[off + field:off + field + 2] == b"\0\0":
        return out
    seg = frame[off:]
    out["quoted_l4"] = residual(_pseudo(frame, q, v6, len(seg), proto, True), seg)
    return out
