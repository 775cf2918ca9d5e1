"""The translator's programs fed random and mutated packets in the kernel (BPF_PROG_TEST_RUN),
checked against the Python model of tests/bpf/model.py.

Each property loads the three programs once (module fixture) and runs many packets; every
example also loads a random mapping set (the loader writes only the delta). Packets are built as
bytes: IPv4 (options, fragments first and non-first) and IPv6 (hop-by-hop, routing with and
without segments left, fragment, destination options, AH; up to more than the programs walk),
TCP/UDP/UDP-Lite/DCCP/ICMP/ICMPv6/other payloads, ICMP errors quoting any of those (truncated
anywhere), then checksums broken on purpose, frames cut short, bytes flipped. Assertions:

* verdict, output bytes and drop reason equal the model's (and the verdict is a documented one);
* every checksum residual (0 = correct) is the same after translation as before: a good checksum
  stays good, a bad one exactly as bad;
* a packet whose addresses are outside every mapping passes, byte for byte unchanged;
* a packet we sent, quoted in an ICMP error and translated back, is byte for byte the original.

Budget: tests/fuzzing.py (CI: a fixed seed and example count; ``FABRIC_FUZZ_EXAMPLES=N
./dev.sh test -m fuzz`` for a long run).
"""

from __future__ import annotations

import ipaddress
import struct
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import event, given
from hypothesis import strategies as st

from fabric.bpf import libbpf
from fabric.bpf.translate import AttachPoint, Mapping, Translator, validate_mappings
from tests.bpf import model as M
from tests.bpf import pkts as P
from tests.fuzzing import budget
from tests.privileged.test_bpf_xlate import CASES, bpffs  # noqa: F401  (the bpffs fixture)

POINTS = list(AttachPoint)
VERDICTS = {
    AttachPoint.TUNNEL_INGRESS: {M.OK, M.SHOT},
    AttachPoint.TUNNEL_EGRESS: {M.OK, M.SHOT},
    AttachPoint.HAIRPIN: {M.OK, M.SHOT, M.REDIRECT},
}
ETH4 = bytes(P.eth_raw(b"", 0x0800))
ETH6 = bytes(P.eth_raw(b"", 0x86DD))
IPNet = ipaddress.IPv4Network | ipaddress.IPv6Network


@pytest.fixture(scope="module")
def translator(bpffs: Path) -> Iterator[Translator]:  # noqa: F811  (bpffs is a fixture)
    t = Translator("fuzz", pin_root=bpffs / "kosmos-fabric")
    t.load()
    try:
        yield t
    finally:
        t.cleanup()


class Kernel:
    """The loaded programs and their maps, with the mapping set of the current example."""

    def __init__(self, t: Translator) -> None:
        self.t = t
        self.fds = {p: t.prog_fd(p) for p in POINTS}

    def load(self, mappings: list[Mapping]) -> None:
        delta = self.t.set_mappings(mappings)
        assert not delta.failed, delta.failed

    def run(self, point: AttachPoint, frame: bytes) -> M.Outcome:
        """The program's outcome in the model's terms (drop reason from the drop counters)."""
        before = self.t.drops()
        try:
            res = libbpf.prog_test_run(self.fds[point], frame)
        except OSError as e:
            if e.errno == 22:
                return M.Outcome(-1, frame, refused=True)
            raise
        after = self.t.drops()
        reasons = [r for r in after if after[r] != before[r]]
        assert len(reasons) <= 1, reasons
        return M.Outcome(res.retval, res.data, reasons[0] if reasons else None)


@pytest.fixture(scope="module")
def kernel(translator: Translator) -> Kernel:
    return Kernel(translator)


# --- strategies: mappings and addresses -------------------------------------------------------------


@st.composite
def mapping_sets(draw: st.DrawFn) -> list[Mapping]:
    """Valid mapping sets (what the loader accepts): the fixed one of pkts.py, or one to three
    random mappings per family. Every CIDR gets its own first octet (IPv4) or first 16 bits
    (IPv6) and prefixes are at least that long, so the CIDRs never overlap; below those bits
    anything goes (/8 to /32, /16 to /128, with the edges and the odd lengths)."""
    if draw(st.integers(0, 3)) == 0:
        return validate_mappings(Mapping.parse(lo, gl) for lo, gl in P.MAPPINGS.items())
    out = []
    for bits, lead in ((32, 8), (128, 16)):
        n = draw(st.integers(1, 3))
        tops = draw(st.lists(st.integers(1, 2**lead - 2), min_size=2 * n, max_size=2 * n, unique=True))
        for i in range(n):
            plen = draw(st.one_of(st.sampled_from([lead, 16, 24, bits - 1, bits]), st.integers(lead, bits)))
            nets = []
            for top in tops[2 * i:2 * i + 2]:
                low = draw(st.integers(0, 2**(bits - lead) - 1)) >> (bits - plen) << (bits - plen)
                nets.append(ipaddress.ip_network(((top << (bits - lead)) | low, plen)))
            out.append(Mapping(nets[0], nets[1]))
    return validate_mappings(out)


def inside(net: IPNet) -> st.SearchStrategy[bytes]:
    """An address of ``net`` (often its first or last)."""
    hosts = st.one_of(st.just(0), st.just(int(net.hostmask)), st.integers(0, int(net.hostmask)))
    return hosts.map(lambda h: (int(net.network_address) | h).to_bytes(net.max_prefixlen // 8, "big"))


@st.composite
def addresses(draw: st.DrawFn, version: int, mappings: list[Mapping], likely: str = "") -> bytes:
    """An address in a local CIDR, in a global CIDR, or anywhere; ``likely`` (local or global)
    is drawn three times as often as the other CIDR."""
    ms = [m for m in mappings if m.local.version == version]
    roles = ["local", "global", "other", "other"] + [likely] * 2 if likely else ["local", "global", "other"]
    role = draw(st.sampled_from(roles)) if ms else "other"
    if role == "other":
        return draw(st.binary(min_size=4 if version == 4 else 16, max_size=4 if version == 4 else 16))
    m = draw(st.sampled_from(ms))
    return draw(inside(m.local if role == "local" else m.global_))


# --- strategies: packets, as bytes ---------------------------------------------------------------

L4_PROTOS = [M.TCP, M.UDP, M.UDPLITE, M.DCCP, M.ICMP, M.ICMPV6, 47, 50, 132, 59, 255]


def csum(data: bytes) -> int:
    return 0xFFFF - M.sum16(data) if M.sum16(data) != 0xFFFF else 0  # (scapy's representation)


def l4_header(draw: st.DrawFn, proto: int, v6: bool) -> bytes:
    """A transport header with its checksum field zeroed (filled in later), plus payload."""
    payload = draw(st.binary(max_size=48))
    if proto == M.TCP:
        opts = draw(st.sampled_from([b"", b"\x02\x04\x05\xb4", b"\x01\x01\x04\x02" * 3]))
        return struct.pack("!HHIIBBHHH", draw(st.integers(0, 65535)), 80, 7, 0, (5 + len(opts) // 4) << 4, 0x18,
                           1024, 0, 0) + opts + payload
    if proto in (M.UDP, M.UDPLITE):
        return struct.pack("!HHHH", 5353, 53, 8 + len(payload), 0) + payload
    if proto == M.DCCP:
        return struct.pack("!HHBBH", 1000, 2000, 4, 0, 0) + b"\x00" * 8 + payload
    if proto in (M.ICMP, M.ICMPV6):
        return bytes([draw(st.sampled_from([0, 8, 128, 129, 133])), 0, 0, 0]) + b"\x00\x07\x00\x01" + payload
    return payload


def fill_l4_csum(l4: bytes, proto: int, pseudo: bytes, v6: bool, *, udp_none: bool = False) -> bytes:
    """The checksum of ``l4`` filled in (``udp_none``: a UDP checksum left 0, "none")."""
    field = M.csum_field(proto, v6)
    if udp_none and proto in (M.UDP, M.UDPLITE):
        return l4
    if proto == M.ICMP and not v6:
        return l4[:2] + csum(l4).to_bytes(2, "big") + l4[4:] if len(l4) >= 4 else l4
    if field is None or len(l4) < field + 2:
        return l4
    c = csum(pseudo + l4)
    if proto in (M.UDP, M.UDPLITE) and c == 0:
        c = 0xFFFF
    return l4[:field] + c.to_bytes(2, "big") + l4[field + 2:]


def ipv4(src: bytes, dst: bytes, proto: int, body: bytes, *, options: bytes = b"", frag: int = 0,
         ttl: int = 64) -> bytes:
    ihl = 5 + len(options) // 4
    hdr = struct.pack("!BBHHHBBH4s4s", 0x40 | ihl, 0, ihl * 4 + len(body), 0x1234, frag, ttl, proto, 0, src,
                      dst) + options
    return hdr[:10] + csum(hdr).to_bytes(2, "big") + hdr[12:] + body


def ipv6(src: bytes, dst: bytes, nh: int, body: bytes) -> bytes:
    return struct.pack("!IHBB16s16s", 0x60000000, len(body), nh, 64, src, dst) + body


@st.composite
def ipv4_options(draw: st.DrawFn) -> bytes:
    kind = draw(st.sampled_from(["none", "nop", "rr", "lsrr", "random"]))
    if kind == "none":
        return b""
    if kind == "nop":
        return b"\x01\x01\x01\x00"
    if kind in ("rr", "lsrr"):
        n = draw(st.integers(1, 4))
        opt = bytes([7 if kind == "rr" else 0x83, 3 + 4 * n, 4]) + draw(st.binary(min_size=4 * n, max_size=4 * n))
        return opt + b"\x00" * (-len(opt) % 4)
    return draw(st.binary(min_size=1, max_size=40).map(lambda b: b + b"\x00" * (-len(b) % 4)))


@st.composite
def ext_chain(draw: st.DrawFn, mappings: list[Mapping]) -> tuple[list[tuple[int, bytes]], bool]:
    """IPv6 extension headers (type, bytes without the next-header byte; sometimes more than the
    programs walk) and whether a routing header has segments left."""
    chain: list[tuple[int, bytes]] = []
    segs_left = False
    for _ in range(draw(st.integers(0, 8)) if draw(st.booleans()) else 0):
        kind = draw(st.sampled_from([M.HOP, M.DEST, M.ROUTING, M.FRAGMENT, M.AUTH]))
        if kind in (M.HOP, M.DEST):
            n = draw(st.integers(0, 2))
            body = bytes([n]) + b"\x01" + bytes([8 * n + 4]) + b"\x00" * (8 * n + 4)  # one PadN
        elif kind == M.ROUTING:
            n = draw(st.integers(0, 3))
            left = draw(st.integers(0, n))
            segs_left |= left > 0
            addrs = b"".join(draw(addresses(6, mappings)) for _ in range(n))
            body = bytes([2 * n, draw(st.sampled_from([0, 4])), left]) + b"\x00" * 4 + addrs
        elif kind == M.FRAGMENT:
            off = draw(st.sampled_from([0, 0, 1, 185]))  # first or not
            body = b"\x00" + struct.pack("!HI", off << 3 | draw(st.integers(0, 1)), 99)
        else:
            body = b"\x01\x00\x00" + b"\x00\x00\x00\x07" * 3  # AH: (1 + 2) * 4 = 12 bytes
        chain.append((kind, body))
    return chain, segs_left


@st.composite
def ip_packets(draw: st.DrawFn, version: int, mappings: list[Mapping], depth: int = 0) -> bytes:
    """One IP packet (no Ethernet) with correct checksums, possibly an ICMP error."""
    v6 = version == 6
    # a source of ours going out, a destination of ours coming in (or both: hairpin); quoted in
    # an error, the other way round (what we sent has a global source, what we got a local
    # destination)
    roles = ("local", "global") if depth == 0 else ("global", "local")
    src, dst = (draw(addresses(version, mappings, role)) for role in roles)
    error = depth == 0 and draw(st.integers(0, 2)) == 0
    if error:
        proto = M.ICMPV6 if v6 else M.ICMP
        inner = draw(ip_packets(version if draw(st.integers(0, 5)) else 10 - version, mappings, depth + 1))
        inner = inner[: draw(st.integers(0, len(inner)))] if draw(st.booleans()) else inner
        types = M.ICMP6_ERRORS if v6 else M.ICMP4_ERRORS
        l4 = bytes([draw(st.sampled_from(types)), draw(st.integers(0, 4)), 0, 0]) + b"\x00\x00\x05\xdc" + inner
    else:
        proto = draw(st.sampled_from(L4_PROTOS))
        l4 = l4_header(draw, proto, v6)
    udp_none = draw(st.integers(0, 5)) == 0
    if not v6:
        frag = draw(st.sampled_from([0, 0, 0x4000, 0x2000, 0x2000 | 3, 0x0007]))
        options = draw(ipv4_options())
        pseudo = src + dst + bytes([0, proto]) + len(l4).to_bytes(2, "big")
        return ipv4(src, dst, proto, fill_l4_csum(l4, proto, pseudo, False, udp_none=udp_none), options=options,
                    frag=frag)
    chain, segs_left = draw(ext_chain(mappings))
    pseudo = src + (b"" if segs_left else dst) + len(l4).to_bytes(4, "big") + bytes([0, 0, 0, proto])
    body = fill_l4_csum(l4, proto, pseudo, True, udp_none=udp_none)
    kinds = [k for k, _ in chain] + [proto]
    for (_kind, ext), nxt in reversed(list(zip(chain, kinds[1:], strict=True))):
        body = bytes([nxt]) + ext + body
    return ipv6(src, dst, kinds[0], body)


@st.composite
def broken(draw: st.DrawFn, frame: bytes) -> bytes:
    """The frame with a bad IPv4 header or L4 checksum, any 16-bit word off by a random amount,
    bytes flipped, its EtherType changed, cut short, or several of these (or none)."""
    b = bytearray(frame)
    for _ in range(draw(st.integers(0, 2))):
        how = draw(st.sampled_from(["csum", "word", "flip", "ethertype"]))
        if how == "csum":  # a bad IPv4 header or L4 checksum
            l4 = M.locate_v6(frame, M.ETH_HLEN) if frame[12:14] == b"\x86\xdd" else M.locate_v4(frame, M.ETH_HLEN)
            fields = [M.ETH_HLEN + 10] if frame[12:14] == b"\x08\x00" else []
            fields += [l4.csum_off] if l4.csum_off is not None and l4.csum_off + 2 <= len(b) else []
            how, i = ("word", draw(st.sampled_from(fields))) if fields else ("flip", 0)
        else:
            i = draw(st.integers(M.ETH_HLEN, len(b) - 2)) & ~1 if len(b) > 16 else 0
        if how == "word" and len(b) > 16:
            word = (int.from_bytes(b[i:i + 2], "big") + draw(st.integers(1, 0xFFFE))) & 0xFFFF
            b[i:i + 2] = word.to_bytes(2, "big")
        elif how == "flip" and len(b) > M.ETH_HLEN:
            b[draw(st.integers(M.ETH_HLEN, len(b) - 1))] ^= draw(st.integers(1, 255))
        elif how == "ethertype":
            b[12:14] = draw(st.sampled_from([b"\x08\x00", b"\x86\xdd", b"\x81\x00", b"\x08\x06", b"\x00\x40"]))
    if draw(st.integers(0, 3)) == 0:  # cut short (mostly behind the IP header: shorter is refused)
        b = b[: draw(st.integers(min(len(b), M.ETH_HLEN + draw(st.sampled_from([0, 20, 40]))), len(b)))]
    return bytes(b)


@st.composite
def cases(draw: st.DrawFn, *, mutate: bool = True) -> tuple[list[Mapping], bytes]:
    mappings = draw(mapping_sets())
    version = draw(st.sampled_from([4, 6]))
    frame = (ETH6 if version == 6 else ETH4) + draw(ip_packets(version, mappings))
    if mutate:
        frame = draw(broken(frame))
    return mappings, frame


# --- the checks ------------------------------------------------------------------------------------


def _show(frame: bytes) -> str:
    from scapy.layers.l2 import Ether

    return str(Ether(frame).show2(dump=True))


def check_against_model(kernel: Kernel, point: AttachPoint, frame: bytes, tables: M.Tables) -> M.Outcome:
    want = M.run(point, frame, tables)
    got = kernel.run(point, frame)
    where = f"{point.name} on {frame.hex()}"
    assert got.refused == want.refused, f"{where}: refused {got.refused}, model {want.refused}"
    event(f"{point.name}: {'refused' if got.refused else (got.verdict, got.drop, got.data != frame)}")
    if got.refused:
        return got
    assert got.verdict in VERDICTS[point], f"{where}: undocumented verdict {got.verdict}"
    assert (got.verdict, got.drop) == (want.verdict, want.drop), \
        f"{where}: verdict/drop {got.verdict}/{got.drop}, model {want.verdict}/{want.drop}"
    if got.data != want.data:
        diff = [i for i in range(len(frame)) if got.data[i:i + 1] != want.data[i:i + 1]]
        pytest.fail(f"{where}: output differs from the model at bytes {diff}\n--- kernel\n{_show(got.data)}"
                    f"\n--- model\n{_show(want.data)}")
    if got.verdict == M.SHOT:
        assert got.data == frame, f"{where}: dropped, but modified"
    else:
        assert M.residuals(got.data) == M.residuals(frame), f"{where}: a checksum residual changed"
    return got


def ours(point: AttachPoint, frame: bytes, mappings: list[Mapping]) -> bool:
    """Independent of the model: does an outer address fall in a prefix this program translates?"""
    ethertype = frame[12:14]
    if ethertype == b"\x08\x00" and len(frame) >= 34 and frame[14] >> 4 == 4:
        src, dst = ipaddress.ip_address(frame[26:30]), ipaddress.ip_address(frame[30:34])
    elif ethertype == b"\x86\xdd" and len(frame) >= 54 and frame[14] >> 4 == 6:
        src, dst = ipaddress.ip_address(frame[22:38]), ipaddress.ip_address(frame[38:54])
    else:
        return False
    dnat = any(dst.version == m.global_.version and dst in m.global_ for m in mappings)
    snat = any(src.version == m.local.version and src in m.local for m in mappings)
    if point is AttachPoint.TUNNEL_INGRESS:
        return dnat
    if point is AttachPoint.TUNNEL_EGRESS:  # (or an ICMP error: its quote is checked by the model)
        return snat or frame[23 if ethertype == b"\x08\x00" else 20] not in (M.TCP, M.UDP, M.UDPLITE, M.DCCP, 47, 50)
    return dnat


@pytest.mark.fuzz
@budget()
@given(case=cases())
def test_random_and_mutated_packets_match_the_model(kernel: Kernel, case: tuple[list[Mapping], bytes]) -> None:
    mappings, frame = case
    kernel.load(mappings)
    tables = M.Tables.of(mappings)
    for point in POINTS:
        got = check_against_model(kernel, point, frame, tables)
        if not got.refused and not ours(point, frame, mappings):
            assert (got.verdict, got.data) == (M.OK, frame), f"{point.name}: changed a packet outside our prefixes"


@pytest.mark.fuzz
@budget(0.25)
@given(case=cases(mutate=False))
def test_every_truncation_matches_the_model(kernel: Kernel, case: tuple[list[Mapping], bytes]) -> None:
    """Cut at every length from the Ethernet header to the whole frame, on every program."""
    mappings, frame = case
    kernel.load(mappings)
    tables = M.Tables.of(mappings)
    for n in range(M.ETH_HLEN, len(frame) + 1):
        for point in POINTS:
            check_against_model(kernel, point, frame[:n], tables)


@pytest.mark.fuzz
@budget(0.5)
@given(data=st.data())
def test_quote_of_a_sent_packet_translates_back_to_the_original(kernel: Kernel, data: st.DataObject) -> None:
    """A pod's packet goes out (egress: source local -> global, checksums must verify), a router
    of the other cluster quotes it in an ICMP error (any length), the error comes in (ingress):
    the pod sees exactly the bytes it sent, under an error whose checksums verify."""
    mappings = data.draw(mapping_sets())
    m = data.draw(st.sampled_from(mappings))
    v6 = m.local.version == 6
    kernel.load(mappings)
    pod = data.draw(inside(m.local))
    inner = data.draw(ip_packets(m.local.version, mappings, depth=1))
    alen = 16 if v6 else 4
    at = 8 if v6 else 12
    sent = inner[:at] + pod + inner[at + alen:]
    sent = _refill(sent, v6)
    eth = ETH6 if v6 else ETH4
    out = kernel.run(AttachPoint.TUNNEL_EGRESS, eth + sent)
    if out.verdict == M.SHOT:
        return
    assert all(r == 0 for r in M.residuals(out.data).values()), f"egress broke a checksum: {out.data.hex()}"
    wire = out.data[len(eth):]
    quote = wire[: data.draw(st.integers(20 if not v6 else 40, len(wire)))]
    router = data.draw(addresses(m.local.version, []))
    proto = M.ICMPV6 if v6 else M.ICMP
    icmp = bytes([1 if v6 else 3, 4 if v6 else 3, 0, 0, 0, 0, 0, 0]) + quote
    gsrc = wire[at:at + alen]
    if v6:
        icmp = fill_l4_csum(icmp, proto, router + gsrc + len(icmp).to_bytes(4, "big") + bytes([0, 0, 0, proto]), True)
        err = ipv6(router, gsrc, proto, icmp)
    else:
        err = ipv4(router, gsrc, proto, fill_l4_csum(icmp, proto, b"", False))
    back = kernel.run(AttachPoint.TUNNEL_INGRESS, eth + err)
    assert back.verdict == M.OK, back
    l4 = M.locate_v6(back.data, 14) if v6 else M.locate_v4(back.data, 14)
    assert l4.off is not None
    got, want = back.data[l4.off + 8:], sent[: len(quote)]
    sent_l4 = M.locate_v6(eth + sent, 14) if v6 else M.locate_v4(eth + sent, 14)
    if sent_l4.csum_off is not None:
        at_csum = slice(sent_l4.csum_off - 14, sent_l4.csum_off - 14 + 2)
        if (v6 and sent[6] in M.EXTHDRS) or at_csum.stop == len(quote) + 1:
            # documented limits: a quoted IPv6 L4 checksum behind extension headers is not
            # fixed (xlate_icmp6_inner), half a quoted checksum cannot be (only kept)
            got, want = _blank(got, at_csum), _blank(want, at_csum)
    assert got == want, (
        f"quote after ingress differs from what the pod sent\n{_show(back.data)}\n--- sent\n{_show(eth + sent)}")
    assert all(r == 0 for r in M.residuals(back.data, quoted=False).values()), f"error checksums: {back.data.hex()}"


def _blank(b: bytes, at: slice) -> bytes:
    return b[:at.start] + b"\0" * len(b[at]) + b[at.stop:]


def _refill(pkt: bytes, v6: bool) -> bytes:
    """``pkt`` with its checksums computed afresh (after its source changed)."""
    frame = (ETH6 if v6 else ETH4) + pkt
    l3 = M.ETH_HLEN
    b = bytearray(frame)
    if not v6:
        ihl = (b[l3] & 0xF) * 4
        b[l3 + 10:l3 + 12] = b"\0\0"
        b[l3 + 10:l3 + 12] = csum(bytes(b[l3:l3 + ihl])).to_bytes(2, "big")
    l4 = M.locate_v6(bytes(b), l3) if v6 else M.locate_v4(bytes(b), l3)
    if l4.off is None or l4.drop:
        return bytes(b[l3:])
    seg = bytes(b[l4.off:])
    if l4.csum_off is None and not (l4.proto == M.ICMP and not v6):
        return bytes(b[l3:])
    field = (l4.csum_off or l4.off + 2) - l4.off
    if l4.proto in (M.UDP, M.UDPLITE) and seg[field:field + 2] == b"\0\0":
        return bytes(b[l3:])
    seg = seg[:field] + b"\0\0" + seg[field + 2:]
    pseudo = b"" if l4.csum_off is None else M._pseudo(bytes(b), l3, v6, len(seg), l4.proto, l4.dst_in_pseudo)
    b[l4.off:] = fill_l4_csum(seg, l4.proto, pseudo, v6)
    return bytes(b[l3:])


def test_model_agrees_with_the_handwritten_cases() -> None:
    """The model reproduces every expectation of test_bpf_xlate.py (built there by scapy)."""
    tables = M.Tables.of(validate_mappings(Mapping.parse(lo, gl) for lo, gl in P.MAPPINGS.items()))
    for desc, point, pkt, expected, verdict in CASES:
        got = M.run(point, P.rebuilt(pkt), tables)
        assert (got.verdict, got.data) == (verdict, P.rebuilt(expected)), desc

