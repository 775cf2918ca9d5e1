"""The fabric's multipath hash seed on a real kernel (issue 21 section 2; fabric.agent.multipath),
in throwaway namespaces:

* the agent's seed keeper sets ``net.ipv4.fib_multipath_hash_seed`` in the dataplane's
  namespace (a ``KernelDataplane(netns=...)`` from this process, which lives in the root
  namespace) and nowhere else: the root namespace's value is read before and after;
* what the kernel source says (``fib_multipath_hash_from_keys`` for both families, resilient
  groups indexed by that hash) holds on this kernel: with resilient groups for IPv4 *and* IPv6,
  the gateway ``ip route get`` picks for each destination depends on the seed (a second seed
  moves some), is the same for the same seed again, and is the same in a second namespace given
  the same seed (two "machines" with one fabric seed choose alike);
* the IPv6 hash the agent sets hashes addresses only (the next header changes no choice),
  where IPv6's default policy hashes more (it does).

Skipped, with the reason, where the kernel has no such sysctl (< 6.11).
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from fabric.agent import multipath as mp
from fabric.netlink.dataplane import KernelDataplane
from tests.privileged.kernelns import fresh_netns, ipj, sh

ROOT_SEED = Path("/proc/sys/net/ipv4/fib_multipath_hash_seed")
GATEWAYS4 = ("10.9.0.2", "10.9.0.3", "10.9.0.4")
GATEWAYS6 = ("fd09::2", "fd09::3", "fd09::4")
DESTS4 = [f"10.50.{i // 200}.{i % 200 + 1}" for i in range(48)]
DESTS6 = [f"fd50::{i + 1:x}" for i in range(48)]

pytestmark = pytest.mark.skipif(not ROOT_SEED.exists(), reason="this kernel has no fib_multipath_hash_seed (< 6.11)")


def _read_in(netns: str, key: str = mp.SEED_SYSCTL) -> str:
    """A sysctl of the namespace as iproute2's exec sees it (not through our own code)."""
    out = subprocess.run(["ip", "netns", "exec", netns, "sysctl", "-n", key], check=True, capture_output=True,
                         text=True)  # fmt: skip
    return out.stdout.strip()


def _groups(netns: str) -> None:
    """Resilient groups of three gateways each for 10.50.0.0/16 and fd50::/64 on a veth (the
    ``dummy`` module is not everywhere)."""
    sh(netns, "link", "add", "d0", "type", "veth", "peer", "name", "d1")
    sh(netns, "link", "set", "d1", "up")
    sh(netns, "link", "set", "d0", "up")
    sh(netns, "addr", "add", "10.9.0.1/24", "dev", "d0")
    sh(netns, "addr", "add", "fd09::1/64", "dev", "d0", "nodad")
    for family, gws, gid, dst in ((4, GATEWAYS4, 10, "10.50.0.0/16"), (6, GATEWAYS6, 20, "fd50::/64")):
        ids = []
        for i, gw in enumerate(gws):
            nhid = gid + 1 + i
            sh(netns, "nexthop", "add", "id", str(nhid), "via", gw, "dev", "d0")
            ids.append(str(nhid))
        sh(netns, "nexthop", "add", "id", str(gid), "group", "/".join(ids), "type", "resilient", "buckets", "64")
        sh(netns, f"-{family}", "route", "add", dst, "nhid", str(gid))


def _choices(netns: str, dests: list[str] | None = None, *extra: str) -> dict[str, str]:
    """Destination -> the gateway the kernel's multipath hash picks for it (``extra``: more of
    the flow, e.g. ``ipproto udp``)."""
    out = {}
    for dst in DESTS4 + DESTS6 if dests is None else dests:
        (route,) = ipj(netns, "route", "get", dst, *extra)
        out[dst] = route["gateway"]
    return out


@pytest.fixture
def second_netns() -> Iterator[str]:
    with fresh_netns() as name:
        yield name


def test_seed_set_in_the_nodes_namespace_only_and_governs_ipv4_and_ipv6_resilient_groups(
    netns: str, second_netns: str
) -> None:
    root_before = ROOT_SEED.read_text().strip()
    dp, dp2 = KernelDataplane(netns=netns), KernelDataplane(netns=second_netns)
    try:
        _groups(netns)
        _groups(second_netns)
        assert dp.read_sysctl(mp.SEED_SYSCTL) == _read_in(netns)
        # The agent's keeper, as in a pass whose plan has active/active routes.
        seed_a = 0x5EED0001
        keeper = mp.MultipathHash(mp.SeedSource(str(seed_a)))
        assert keeper.sync(dp, wanted=True, ipv6=True) == seed_a
        assert _read_in(netns) == str(seed_a)
        for key, value in mp.IPV6_HASH:
            assert _read_in(netns, key) == value
        assert ROOT_SEED.read_text().strip() == root_before, "the root namespace's seed changed"
        assert _read_in(second_netns) != str(seed_a), "the seed leaked into another namespace"

        with_a = _choices(netns)
        for dsts, gws in ((DESTS4, GATEWAYS4), (DESTS6, GATEWAYS6)):
            assert set(with_a[d] for d in dsts) == set(gws), "the destinations did not spread over every gateway"

        # A second seed moves some destinations, in both families; the first seed brings them back.
        dp.write_sysctl(mp.SEED_SYSCTL, str(0x5EED0002))
        with_b = _choices(netns)
        for dsts in (DESTS4, DESTS6):
            moved = [d for d in dsts if with_a[d] != with_b[d]]
            assert moved, f"no destination of {dsts[0]}... changed gateway with another seed"
        dp.write_sysctl(mp.SEED_SYSCTL, str(seed_a))
        assert _choices(netns) == with_a

        # IPv6 by addresses only: what else the flow carries (here its next header) changes
        # nothing; under IPv6's default policy it does (the flow label, too, is hashed there).
        assert _choices(netns, DESTS6, "ipproto", "udp") == _choices(netns, DESTS6, "ipproto", "ipv6-icmp")
        dp.write_sysctl("net.ipv6.fib_multipath_hash_policy", "0")
        udp, icmp = _choices(netns, DESTS6, "ipproto", "udp"), _choices(netns, DESTS6, "ipproto", "ipv6-icmp")
        assert udp != icmp, "IPv6's default policy did not hash the next header"
        keeper.sync(dp, wanted=True, ipv6=True)  # drift repaired
        assert _read_in(netns, "net.ipv6.fib_multipath_hash_policy") == "3"

        # Another "machine" with the fabric's seed picks exactly alike.
        assert mp.MultipathHash(mp.SeedSource(str(seed_a))).sync(dp2, wanted=True, ipv6=True) == seed_a
        assert _choices(second_netns) == with_a
        assert ROOT_SEED.read_text().strip() == root_before, "the root namespace's seed changed"
    finally:
        dp.close()
        dp2.close()


def test_sysctls_outside_net_are_refused_before_any_write(netns: str) -> None:
    dp = KernelDataplane(netns=netns)
    try:
        with pytest.raises(ValueError, match="only per-namespace net"):
            dp.write_sysctl("kernel.hostname", "nope")
        assert dp.read_sysctl("net.ipv4.no_such_sysctl_here") is None
    finally:
        dp.close()
