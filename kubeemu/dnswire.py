"""The DNS wire format (RFC 1035) the lab's cluster DNS speaks: parse a query, build a response.

Only what an authoritative server and a forwarder need: the header, one question (its name read
with compression pointers followed, bounded), and resource records built from typed rdata
(A, AAAA, CNAME, SRV, SOA, whose names are written uncompressed except the owner name when it is
the question's: a pointer to offset 12). Input comes from the network and is untrusted: every
malformed query is :class:`Malformed`, never an IndexError.

``mcs/dns.py`` has its own smaller codec for the clusterset zone; kubeemu is never a production
dependency, so this module is not imported from there.
"""

from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass, field

HEADER = struct.Struct("!HHHHHH")
QTYPE = {"A": 1, "NS": 2, "CNAME": 5, "SOA": 6, "PTR": 12, "TXT": 16, "AAAA": 28, "SRV": 33, "OPT": 41, "ANY": 255}
A, CNAME, SOA, AAAA, SRV, ANY = QTYPE["A"], QTYPE["CNAME"], QTYPE["SOA"], QTYPE["AAAA"], QTYPE["SRV"], QTYPE["ANY"]
QCLASS_IN = 1
NOERROR, FORMERR, SERVFAIL, NXDOMAIN, NOTIMP, REFUSED = 0, 1, 2, 3, 4, 5
#: The largest UDP response without EDNS (RFC 1035 4.2.1); longer ones are truncated (TC set).
UDP_MAX = 512
FLAG_QR, FLAG_AA, FLAG_TC, FLAG_RD, FLAG_RA = 0x8000, 0x0400, 0x0200, 0x0100, 0x0080


class Malformed(Exception):
    """A query this codec cannot read (the message says why)."""


@dataclass(frozen=True)
class Query:
    """One parsed query: its id, flags, the question's labels (as sent, for the echo, and
    lowercased for lookups), type and class, and the question's raw bytes."""

    ident: int
    flags: int
    labels: tuple[str, ...]
    qtype: int
    qclass: int
    question: bytes
    qdcount: int = 1

    @property
    def opcode(self) -> int:
        return (self.flags >> 11) & 0xF

    @property
    def name(self) -> str:
        """The question's name, lowercase, without the trailing dot ("" for the root)."""
        return ".".join(self.labels)


def read_name(data: bytes, pos: int) -> tuple[tuple[str, ...], int]:
    """The labels of the name at ``pos`` (pointers followed, at most 127 of them), lowercased,
    and the position just after the name where it starts."""
    labels: list[str] = []
    end = -1
    total = 0
    jumps = 0
    while True:
        if pos >= len(data):
            raise Malformed("name runs past the end")
        n = data[pos]
        if n & 0xC0 == 0xC0:
            if pos + 1 >= len(data):
                raise Malformed("truncated compression pointer")
            jumps += 1
            if jumps > 127:
                raise Malformed("compression pointer loop")
            if end < 0:
                end = pos + 2
            pos = ((n & 0x3F) << 8) | data[pos + 1]
            continue
        if n & 0xC0:
            raise Malformed(f"label type {n >> 6} unknown")
        pos += 1
        if n == 0:
            return tuple(labels), end if end >= 0 else pos
        label = data[pos:pos + n]
        if len(label) != n:
            raise Malformed("label runs past the end")
        total += n + 1
        if total > 255:
            raise Malformed("name longer than 255 bytes")
        labels.append(label.decode("ascii", "replace").lower())
        pos += n


def encode_name(name: str) -> bytes:
    """``name`` (dots between labels; a trailing dot optional) in wire form, uncompressed."""
    out = bytearray()
    for label in name.rstrip(".").split(".") if name.strip(".") else []:
        raw = label.encode("ascii")
        if not 0 < len(raw) <= 63:
            raise ValueError(f"DNS label {label!r} of {name!r}: 1 to 63 characters")
        out += bytes([len(raw)]) + raw
    out += b"\0"
    if len(out) > 255:
        raise ValueError(f"DNS name {name!r}: longer than 255 bytes")
    return bytes(out)


def parse_query(data: bytes) -> Query:
    """The header and first question of ``data``; :class:`Malformed` if unreadable (a datagram
    shorter than a header cannot even be answered: the caller drops it)."""
    if len(data) < HEADER.size:
        raise Malformed("shorter than a DNS header")
    ident, flags, qd, _an, _ns, _ar = HEADER.unpack_from(data)
    if qd < 1:
        raise Malformed("no question")
    labels, pos = read_name(data, HEADER.size)
    if pos + 4 > len(data):
        raise Malformed("question without type and class")
    qtype, qclass = struct.unpack_from("!HH", data, pos)
    return Query(ident, flags, labels, qtype, qclass, data[HEADER.size:pos + 4], qd)


@dataclass(frozen=True)
class Record:
    """One resource record: owner name ("" meaning the question's name, written as a pointer),
    type, TTL and rdata already in wire form."""

    name: str
    rtype: int
    ttl: int
    rdata: bytes

    def encode(self) -> bytes:
        owner = b"\xc0\x0c" if not self.name else encode_name(self.name)
        return owner + struct.pack("!HHIH", self.rtype, QCLASS_IN, self.ttl, len(self.rdata)) + self.rdata


def address_record(ip: str, ttl: int, name: str = "") -> Record:
    addr = ipaddress.ip_address(ip)
    return Record(name, A if addr.version == 4 else AAAA, ttl, addr.packed)


def cname_record(target: str, ttl: int, name: str = "") -> Record:
    return Record(name, CNAME, ttl, encode_name(target))


def srv_record(priority: int, weight: int, port: int, target: str, ttl: int, name: str = "") -> Record:
    return Record(name, SRV, ttl, struct.pack("!HHH", priority, weight, port) + encode_name(target))


def soa_record(zone: str, ttl: int, serial: int) -> Record:
    """The zone's SOA (CoreDNS kubernetes plugin's shape: ``ns.dns.<zone>``,
    ``hostmaster.<zone>``, minimum = TTL), for the authority section of negative answers."""
    rdata = encode_name(f"ns.dns.{zone}") + encode_name(f"hostmaster.{zone}") + struct.pack(
        "!IIIII", serial & 0xFFFFFFFF, 7200, 1800, 86400, ttl)
    return Record(zone, SOA, ttl, rdata)


@dataclass
class Response:
    """What to answer: an rcode, answer and authority records."""

    rcode: int = NOERROR
    answers: list[Record] = field(default_factory=list)
    authority: list[Record] = field(default_factory=list)
    authoritative: bool = True


def encode_response(q: Query, resp: Response, limit: int | None = None) -> bytes:
    """The response datagram to ``q`` (its id, opcode and RD echoed; RA clear: this server does
    not recurse). With ``limit`` (UDP), answers that do not fit are left out and TC set, so
    the client retries over TCP (RFC 1035 4.2.1, RFC 7766)."""
    answers = [r.encode() for r in resp.answers]
    authority = [r.encode() for r in resp.authority]
    tc = 0
    if limit is not None:
        size = HEADER.size + len(q.question)
        kept: list[bytes] = []
        for r in answers:
            if size + len(r) > limit:
                tc = FLAG_TC
                break
            kept.append(r)
            size += len(r)
        if tc:
            answers, authority = kept, []
        elif size + sum(len(r) for r in authority) > limit:
            authority = []  # an SOA is a hint for negative caching: dropped, never a reason for TC
    flags = FLAG_QR | (q.flags & 0x7800) | (FLAG_AA if resp.authoritative else 0) | tc | (q.flags & FLAG_RD) \
        | (resp.rcode & 0xF)
    return HEADER.pack(q.ident, flags, 1, len(answers), len(authority), 0) + q.question + b"".join(answers) + \
        b"".join(authority)


def error_response(data: bytes, rcode: int) -> bytes | None:
    """A header-only response with ``rcode`` to a query that could not be parsed (its id echoed);
    None when it is too short to have an id, or is itself a response (never answer those)."""
    if len(data) < HEADER.size:
        return None
    ident, flags = struct.unpack_from("!HH", data)
    if flags & FLAG_QR:
        return None
    return HEADER.pack(ident, FLAG_QR | (flags & 0x7800) | (flags & FLAG_RD) | rcode, 0, 0, 0, 0)
