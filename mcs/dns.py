"""Answers for ``<service>.<namespace>.svc.clusterset.local``: a pure DNS codec and lookup.

The zone KEP-1645 names: a ClusterSetIP service resolves to its ServiceImport's IPs, a headless
one to the addresses of its ready endpoints (A for IPv4, AAAA for IPv6). :func:`answer` takes
one query datagram and the current :data:`Table` (what one member imports, by namespace and
name) and returns the response datagram, as an authoritative server of the zone answers:

- a name of the zone with records of the asked type: NOERROR with them (TTL :data:`TTL_S`, short:
  an endpoint that leaves must leave clients' caches soon);
- a service name that exists without records of that type (an IPv4-only service asked AAAA),
  or the zone's inner names (``svc.clusterset.local``, ``<ns>.svc.clusterset.local``): NOERROR
  and no answer (NODATA), so a resolver does not conclude the name is absent;
- any other name in the zone: NXDOMAIN; a name outside it: REFUSED (this server is nobody's
  recursive resolver); a query it cannot parse, or not one standard query with one question of
  class IN: FORMERR or NOTIMP, never an exception (input from the network is untrusted).

The codec is written here on the RFC 1035 wire format (header, question, answers whose name is
a pointer to the question's), small enough to read whole; the tests check it against scapy's.
"""

from __future__ import annotations

import ipaddress
import struct
from collections.abc import Mapping

from mcs.derive import HEADLESS, Import

ZONE = ("svc", "clusterset", "local")
TTL_S = 5
QTYPE_A, QTYPE_AAAA, QCLASS_IN = 1, 28, 1
NOERROR, FORMERR, SERVFAIL, NXDOMAIN, NOTIMP, REFUSED = 0, 1, 2, 3, 4, 5

#: What a member can resolve: (namespace, service) -> the addresses its name resolves to.
Table = Mapping[tuple[str, str], tuple[str, ...]]

_HEADER = struct.Struct("!HHHHHH")


def table(imports: Mapping[tuple[str, str], Import], ips: Mapping[tuple[str, str], tuple[str, ...]]) -> dict[
        tuple[str, str], tuple[str, ...]]:
    """What a member resolves, from what it imports (:func:`mcs.derive.view`): a ClusterSetIP
    service its ServiceImport's IPs (``ips``: the derived Service's cluster IPs; none yet, no
    address), a headless one the addresses of its ready endpoints, in order, each once."""
    out: dict[tuple[str, str], tuple[str, ...]] = {}
    for k, imp in imports.items():
        if imp.type == HEADLESS:
            addrs = [a for ss in imp.slices for ep in ss.slice.endpoints if ep.ready for a in ep.addresses]
            out[k] = tuple(dict.fromkeys(addrs))
        else:
            out[k] = tuple(ips.get(k, ()))
    return out


class _Malformed(Exception):
    pass


def _read_name(data: bytes, pos: int) -> tuple[tuple[str, ...], int]:
    """The labels of the (uncompressed: a question's) name at ``pos``, and the position after it."""
    labels: list[str] = []
    total = 0
    while True:
        if pos >= len(data):
            raise _Malformed("name runs past the end")
        n = data[pos]
        pos += 1
        if n == 0:
            return tuple(labels), pos
        if n & 0xC0:
            raise _Malformed("compressed name in a question")
        label = data[pos:pos + n]
        if len(label) != n:
            raise _Malformed("label runs past the end")
        total += n + 1
        if total > 255:
            raise _Malformed("name longer than 255 bytes")
        labels.append(label.decode("ascii", "replace").lower())
        pos += n


def _records(labels: tuple[str, ...], qtype: int, table: Table) -> tuple[int, list[bytes]]:
    """The rcode and the rdata of the answers for ``labels`` (lowercase) and ``qtype``."""
    if len(labels) < len(ZONE) or labels[-len(ZONE):] != ZONE:
        return REFUSED, []
    inner = labels[:-len(ZONE)]
    if len(inner) < 2:  # the zone itself or a namespace's name: names with no records of their own
        namespaces = {ns for ns, _ in table}
        return (NOERROR, []) if not inner or inner[0] in namespaces else (NXDOMAIN, [])
    if len(inner) > 2:
        return NXDOMAIN, []  # <hostname>.<cluster>.<svc>.<ns>: not served here
    service, namespace = inner
    addresses = table.get((namespace, service))
    if addresses is None:
        return NXDOMAIN, []
    version = 4 if qtype == QTYPE_A else 6 if qtype == QTYPE_AAAA else 0
    out = []
    for a in addresses:
        ip = ipaddress.ip_address(a)
        if ip.version == version:
            out.append(ip.packed)
    return NOERROR, out


#: The largest UDP response without EDNS (RFC 1035 4.2.1): a bigger one is sent truncated (TC).
UDP_MAX = 512


def answer(query: bytes, table: Table, max_size: int | None = None) -> bytes | None:
    """The response to ``query`` (module docstring); None when it is too short to answer at all
    (no header to echo: dropped, as a server drops such a datagram). A response longer than
    ``max_size`` (UDP: :data:`UDP_MAX`) goes without its answers and with the TC bit, so the
    client asks again over TCP (a headless service with many ready endpoints)."""
    if len(query) < _HEADER.size:
        return None
    ident, flags, qd, _an, _ns, _ar = _HEADER.unpack_from(query)
    if flags & 0x8000:
        return None  # a response, not a query: never answer it (no loops between servers)
    rd = flags & 0x0100
    opcode = (flags >> 11) & 0xF

    def reply(rcode: int, question: bytes = b"", answers: list[bytes] | None = None, qtype: int = 0) -> bytes:
        rrs = answers or []
        tc = 0
        body = b"".join(struct.pack("!HHHIH", 0xC00C, qtype, QCLASS_IN, TTL_S, len(r)) + r for r in rrs)
        if max_size is not None and _HEADER.size + len(question) + len(body) > max_size:
            rrs, body, tc = [], b"", 0x0200
        head = _HEADER.pack(ident, 0x8000 | (opcode << 11) | 0x0400 | tc | rd | rcode, 1 if question else 0,
                            len(rrs), 0, 0)
        return head + question + body

    if opcode != 0:
        return reply(NOTIMP)
    if qd != 1:
        return reply(FORMERR)
    try:
        labels, pos = _read_name(query, _HEADER.size)
        if pos + 4 > len(query):
            raise _Malformed("question without type and class")
        qtype, qclass = struct.unpack_from("!HH", query, pos)
    except _Malformed:
        return reply(FORMERR)
    question = query[_HEADER.size:pos + 4]
    if qclass != QCLASS_IN:
        return reply(NOTIMP, question, qtype=qtype)
    rcode, rdata = _records(labels, qtype, table)
    return reply(rcode, question, rdata, qtype)
