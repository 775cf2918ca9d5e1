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

The wire format (reading the query, writing the response, truncation) is the project's one DNS
codec, :mod:`fabric.dnswire`; this module holds the zone's policy: which names exist, what they
answer, and which error a query that is not a plain one earns. Its question must be written
uncompressed (a query's only question has no earlier name to point to).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping

from fabric import dnswire as w
from mcs.derive import HEADLESS, Import

ZONE = ("svc", "clusterset", "local")
TTL_S = 5
# The codec's values under the names this module's users read (mcs.dnsserver, the tests).
QTYPE_A, QTYPE_AAAA, QCLASS_IN = w.A, w.AAAA, w.QCLASS_IN
NOERROR, FORMERR, SERVFAIL = w.NOERROR, w.FORMERR, w.SERVFAIL
NXDOMAIN, NOTIMP, REFUSED = w.NXDOMAIN, w.NOTIMP, w.REFUSED
#: The largest UDP response without EDNS (RFC 1035 4.2.1): a bigger one is sent truncated (TC).
UDP_MAX = w.UDP_MAX

#: What a member can resolve: (namespace, service) -> the addresses its name resolves to.
Table = Mapping[tuple[str, str], tuple[str, ...]]


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


def answer(query: bytes, table: Table, max_size: int | None = None) -> bytes | None:
    """The response to ``query`` (module docstring); None when it is too short to answer at all
    (no header to echo: dropped, as a server drops such a datagram). A response longer than
    ``max_size`` (UDP: :data:`UDP_MAX`) goes without its answers and with the TC bit, so the
    client asks again over TCP (a headless service with many ready endpoints)."""
    head = w.parse_header(query)
    if head is None or head.is_response:
        return None  # a response, not a query: never answer it (no loops between servers)
    if head.opcode != 0:
        return w.error_response(query, NOTIMP, authoritative=True)
    if head.qdcount != 1:
        return w.error_response(query, FORMERR, authoritative=True)
    try:
        q = w.parse_query(query, pointers=False)
    except w.Malformed:
        return w.error_response(query, FORMERR, authoritative=True)
    if q.qclass != QCLASS_IN:
        return w.encode_response(q, w.Response(rcode=NOTIMP), max_size, partial=False)
    rcode, rdata = _records(q.labels, q.qtype, table)
    answers = [w.Record("", q.qtype, TTL_S, r) for r in rdata]
    return w.encode_response(q, w.Response(rcode=rcode, answers=answers), max_size, partial=False)
