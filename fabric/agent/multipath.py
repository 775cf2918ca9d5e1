"""One multipath hash seed for the whole fabric (issue 21 section 2, active/active gateways).

Why
---

A route through several active gateways is a resilient nexthop group: the kernel hashes each
packet's addresses (``fib_multipath_hash_policy`` 0; ports too with policy 1) into one of the
group's buckets. The hash is SipHash keyed by ``net.ipv4.fib_multipath_hash_seed``; left at 0,
every kernel keys it with a random number drawn at boot (``proc_fib_multipath_hash_rand_seed``,
``net/ipv4/sysctl_net_ipv4.c``, kernel >= 6.11; one value for all namespaces of a machine, which
is why the one-machine lab never saw a difference). The flow hash is symmetric (source and
destination are ordered before hashing) and both sides list the gateways in the same order, so
with one seed on every node a flow's replies leave by the gateway its requests came in by, and
losing a gateway cuts only the flows that crossed it. With per-boot seeds, requests and replies
are spread independently: a gateway's loss also costs a gap to the flows whose *replies* used it.

What the kernel does with it (read in torvalds/linux):

* ``include/net/ip_fib.h``: ``fib_multipath_hash_from_keys`` keys the flow hash with
  ``net->ipv4.sysctl_fib_multipath_hash_seed.mp_seed`` (the user seed, or the boot-random one
  when the user seed is 0);
* ``net/ipv6/route.c``: ``rt6_multipath_hash`` ends in the same ``fib_multipath_hash_from_keys``
  for every policy, so the IPv4 sysctl seeds IPv6 multipath too (there is no IPv6 twin; the
  IPv6 *policy* is separate: ``net.ipv6.fib_multipath_hash_policy``);
* ``net/ipv4/nexthop.c``: a resilient group picks ``bucket = hash % num_nh_buckets`` from that
  same hash (``nexthop_select_path_res``), so the seed governs our groups for both families.

The sysctl is per network namespace (``struct net``): the agent sets it in its node's namespace
only (:meth:`fabric.netlink.dataplane.Dataplane.write_sysctl`, which refuses anything but
``net.*``), never anywhere else.

Where the seed comes from
-------------------------

Every agent must arrive at the same number with no new control message: the fabric CA
certificate (``ca.crt`` of ``--tls-dir``, or of ``--bootstrap-dir`` before the node has its own)
is the one thing all agents of a fabric already share. The seed is the first 32 bits of
SHA-256 over a label and the DER of each certificate in the bundle, sorted (the file's order
does not matter). ``--multipath-hash-seed N`` (1 .. 2^32-1, env ``FABRIC_MULTIPATH_HASH_SEED``)
overrides it, e.g. to match machines outside the fabric or several fabrics; ``off`` leaves the
kernel's seed alone. A plaintext fabric (``--insecure``) has no CA: the label alone gives a
constant seed, the same on every agent. The seed is not a secret (whoever has the CA certificate
can compute it); it only makes the gateway choice of a flow predictable to the fabric's own
members, who could already pick their own addresses and ports. During a CA rotation, nodes with
the old and the new bundle disagree until all have the new one: flows stay correct (gateways
are stateless), only the failover gap of the reply direction comes back meanwhile.

When
----

Only while the node's plan has a route over several gateways (``RouteEntry.vias``; the IPv6
hash only for an IPv6 one): the hash matters for nothing else of ours, and the sysctls are the
node's (they re-key every multipath route of the namespace, the node's own ECMP uplinks too),
so a fabric without active/active gateways leaves them untouched, as ``activeGateways: 1``
promises. Once set they stay when the groups go (setting them back would re-key the node's
other multipath routes a second time for nothing). Every pass compares and repairs them
(cheap: a few small files), like any drift. A kernel without the seed sysctl (< 6.11) is
skipped with one log line; a failure to set one is logged and never fails the pass (routes
still work, only the failover of reply directions is worse).

The hash *policy*. One seed makes a flow's two directions hash alike only if what is hashed is
symmetric. IPv4's default policy (0, L3) hashes the two addresses (ordered: symmetric), and it
is left as the node has it: it already spreads the flows of different host pairs, which is
what gateways carry, ICMP and fragments would hash by addresses under L4 anyway, and L4 would
change the node's other multipath routes; a node whose IPv4 policy is not 0 is warned about (every
node must use the same). IPv6's default policy (0) is *not* symmetric: ``rt6_multipath_hash``
adds the flow label and the next header (``ip6_multipath_l3_keys``), and a flow's two
directions carry different flow labels (each sender makes its own: ``auto_flowlabels``, keyed
per boot, and an echo reply is another ICMPv6 type than its request). So while the plan has IPv6
multipath routes, the agent sets ``net.ipv6.fib_multipath_hash_fields`` to source and destination
address (3) and ``net.ipv6.fib_multipath_hash_policy`` to custom (3, Linux >= 5.12): IPv6 then
hashes as IPv4's L3. Like the seed, both stay set when the groups go. Measured in the 3-active
dual-stack lab (one ping flow at a time, counted on each gateway's ``vx-bridge-6``): with the
IPv6 policy put back to 0 on the three grouping nodes, 5 of the 7 flows measured before the
agents repaired it had their replies on another gateway than their requests; with the agent's
policy, 0 of 24 (twice). (``ip route get`` cannot show this: under the custom policy a
forwarded packet's hash is ``jhash_2words(outer, inner, 0)``, a lookup's the outer hash alone.)
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import re
import ssl
from pathlib import Path

from fabric.netlink import dataplane as dataplane_mod

_log = logging.getLogger(__name__)

SEED_SYSCTL = "net.ipv4.fib_multipath_hash_seed"
IPV4_POLICY = "net.ipv4.fib_multipath_hash_policy"
#: IPv6 hashed by source and destination address only: the custom policy (3) over the fields
#: ``FIB_MULTIPATH_HASH_FIELD_SRC_IP | FIB_MULTIPATH_HASH_FIELD_DST_IP`` (0x0001 | 0x0002), in
#: the order they are written (fields before the policy that reads them).
IPV6_HASH = (("net.ipv6.fib_multipath_hash_fields", "3"), ("net.ipv6.fib_multipath_hash_policy", "3"))
#: Domain separation: the CA's hash for this purpose is not its fingerprint.
LABEL = b"kosmos-fabric multipath hash seed v1\0"
#: ``--multipath-hash-seed`` values that are not numbers.
AUTO, OFF = "auto", "off"
_PEM_CERT = re.compile(rb"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----", re.S)


class SeedError(ValueError):
    """The seed's source cannot be read or holds no certificate (names the file)."""


def parse_setting(text: str) -> str:
    """``--multipath-hash-seed``: ``auto``, ``off`` or an integer from 1 to 2^32-1 (0 is the
    kernel's "random per boot", which is exactly what the setting exists to avoid)."""
    t = text.strip().lower()
    if t in (AUTO, OFF):
        return t
    try:
        v = int(t, 0)
    except ValueError:
        raise ValueError("must be 'auto', 'off' or an integer from 1 to 4294967295") from None
    if not 1 <= v <= 0xFFFFFFFF:
        raise ValueError("must be from 1 to 4294967295 (0 would let each kernel draw its own at boot)")
    return str(v)


def seed_from_ca(pem: bytes, source: str = "ca.crt") -> int:
    """The seed every holder of this CA bundle derives (never 0: that means random to the kernel).
    SeedError when ``pem`` holds no certificate."""
    blocks = _PEM_CERT.findall(pem)
    if not blocks:
        raise SeedError(f"{source} holds no PEM certificate to derive the multipath hash seed from")
    try:
        ders = sorted(ssl.PEM_cert_to_DER_cert(b.decode("ascii")) for b in blocks)
    except (ValueError, UnicodeDecodeError) as e:
        raise SeedError(f"{source}: a certificate is not valid PEM ({e})") from None
    return _seed(LABEL + b"".join(len(d).to_bytes(4, "big") + d for d in ders))


def insecure_seed() -> int:
    """The seed of a fabric without a CA (plaintext): the same constant on every agent."""
    return _seed(LABEL)


def _seed(data: bytes) -> int:
    return int.from_bytes(hashlib.sha256(data).digest()[:4], "big") or 1


@dataclasses.dataclass(frozen=True, slots=True)
class SeedSource:
    """Where an agent's seed comes from: ``setting`` (``auto``/``off``/a number), the CA files to
    try in order (``--tls-dir``'s, then ``--bootstrap-dir``'s), and whether the fabric is
    plaintext."""

    setting: str = AUTO
    ca_files: tuple[Path, ...] = ()
    insecure: bool = False

    def resolve(self) -> tuple[int, str] | None:
        """``(seed, where it came from)``; None for ``off``. SeedError when ``auto`` finds no CA
        (a secure agent whose files are not there yet: try again on the next pass)."""
        if self.setting == OFF:
            return None
        if self.setting != AUTO:
            return int(self.setting), "--multipath-hash-seed"
        problems = []
        for f in self.ca_files:
            try:
                pem = f.read_bytes()
            except OSError as e:
                problems.append(f"{f}: {e.strerror or e}")
                continue
            return seed_from_ca(pem, str(f)), f"the fabric CA ({f})"
        if self.insecure or not self.ca_files:
            return insecure_seed(), "the fabric's built-in constant (no CA: plaintext)"
        raise SeedError("no fabric CA to derive the multipath hash seed from (" + "; ".join(problems) + ")")


class MultipathHash:
    """Keeps the namespace's multipath hash alike on every node while the plan has multipath
    routes (see the module docstring): :data:`SEED_SYSCTL` at the fabric's seed for any, and
    IPv6 hashed by addresses only (:data:`IPV6_HASH`) for IPv6 ones. Called from the reconcile
    worker, before the routes are programmed."""

    def __init__(self, source: SeedSource) -> None:
        self.source = source
        #: The seed the kernel holds because of us (None: not set, or not needed yet).
        self.applied: int | None = None
        #: The IPv6 hash is addresses-only because of us.
        self.ipv6_applied = False
        #: Per concern, the last reason it is not applied (logged once per distinct reason).
        self._reasons: dict[str, str] = {}

    def sync(self, dp: dataplane_mod.Dataplane, wanted: bool, ipv6: bool = False) -> int | None:
        """Make the kernel's seed the fabric's when ``wanted`` (the plan has routes with ``vias``)
        and the IPv6 hash addresses-only when ``ipv6`` (some of them are IPv6); returns the seed
        the kernel holds because of us, None otherwise. Never raises for a kernel or file
        problem: it logs the reason once and tries again next pass."""
        if wanted:
            self._sync_seed(dp)
        if ipv6:
            self._sync_ipv6(dp)
        return self.applied

    def _sync_seed(self, dp: dataplane_mod.Dataplane) -> None:
        try:
            resolved = self.source.resolve()
        except SeedError as e:
            self._skip("seed", f"{e}; the kernel keeps its own per-boot seed")
            return
        if resolved is None:
            self._skip("seed", "--multipath-hash-seed off: the kernel keeps its own seed", logging.INFO)
            return
        seed, origin = resolved
        try:
            have = dp.read_sysctl(SEED_SYSCTL)
            if have is None:
                self._skip("seed", f"this kernel has no {SEED_SYSCTL} (added in Linux 6.11): multipath flows hash "
                           "with its per-boot seed, so replies may cross another gateway than their requests",
                           logging.INFO)
                self.applied = None
                return
            if have == str(seed):
                if self.applied != seed:
                    _log.info("multipath hash seed already %d (from %s)", seed, origin)
                self.applied = seed
                self._reasons.pop("seed", None)
                return
            dp.write_sysctl(SEED_SYSCTL, str(seed))
        except dataplane_mod.DataplaneError as e:
            self._skip("seed", f"cannot set the multipath hash seed: {e}")
            return
        level = logging.WARNING if have not in ("0", str(self.applied)) else logging.INFO
        _log.log(level, "multipath hash seed set to %d (from %s; was %s%s); IPv4 hash policy %s", seed, origin, have,
                 ", someone else's: replaced" if level == logging.WARNING else "", self._ipv4_policy(dp))
        self.applied = seed
        self._reasons.pop("seed", None)

    def _sync_ipv6(self, dp: dataplane_mod.Dataplane) -> None:
        """Fields first, then the policy that uses them (the policy never points at stale fields)."""
        changed = []
        try:
            for key, value in IPV6_HASH:
                have = dp.read_sysctl(key)
                if have is None:
                    self._skip("ipv6", f"this kernel has no {key} (Linux < 5.12): IPv6 multipath keeps hashing the "
                               "flow label, which differs between a flow's two directions", logging.INFO)
                    self.ipv6_applied = False
                    return
                if have != value:
                    dp.write_sysctl(key, value)
                    changed.append(f"{key}={value} (was {have})")
        except dataplane_mod.DataplaneError as e:
            self._skip("ipv6", f"cannot make the IPv6 multipath hash addresses-only: {e}")
            self.ipv6_applied = False
            return
        if changed or not self.ipv6_applied:
            _log.info("IPv6 multipath hash by source and destination address only, as IPv4's L3 (a flow's two "
                      "directions carry different flow labels): %s", ", ".join(changed) or "already so")
        self.ipv6_applied = True
        self._reasons.pop("ipv6", None)

    @staticmethod
    def _ipv4_policy(dp: dataplane_mod.Dataplane) -> str:
        """The IPv4 hash policy, for the log; a warning when it is not the default L3 (0): every
        node must hash alike for replies to follow their requests, and the agent leaves it."""
        try:
            value = dp.read_sysctl(IPV4_POLICY)
        except dataplane_mod.DataplaneError as e:
            return f"unreadable ({e})"
        if value not in (None, "0"):
            _log.warning("%s is %s, not the default 0 (L3): every node of the fabric must use the same policy "
                         "for a flow's replies to cross the gateway of its requests", IPV4_POLICY, value)
        return str(value)

    def _skip(self, concern: str, reason: str, level: int = logging.WARNING) -> None:
        if self._reasons.get(concern) != reason:
            _log.log(level, "%s", reason)
            self._reasons[concern] = reason
