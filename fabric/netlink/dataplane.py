"""The one narrow interface through which the fabric touches the kernel, and its real implementation.

Every kernel call of ``fabric.netlink`` goes through :class:`Dataplane`, so the table owners can
be tested against :class:`fabric.netlink.fake.FakeDataplane` (a stateful fake with fault
injection) and run for real against :class:`KernelDataplane`.

Shape of the interface:

* rare objects (links, addresses, rules) have single-entry calls that raise
  :class:`DataplaneError` (errno + reason);
* hot objects (neighbours, FDB entries, nexthops, routes) have *batch* calls: a list in, a list
  of :class:`BatchError` (index into the list, errno, reason) out. One bad entry never stops
  the others; the owner decides which errnos are harmless (``ENOENT`` on delete...);
* per-namespace sysctls (``net.*`` only: :func:`sysctl_path`) are read and set in the
  dataplane's own namespace (the agent's multipath hash seed);
* ``list_*`` calls return what the kernel has, unfiltered by ownership except where the kernel
  can filter cheaply (routes by table and protocol); owners decide what is theirs.

:class:`KernelDataplane` works in the current network namespace (the agent runs inside its
node's netns), or in ``netns=NAME`` for tests and benchmarks. It uses pyroute2 for links,
addresses and rules, and the raw codec of :mod:`fabric.netlink.rawnl` for the hot path and for
all dumps (pyroute2 takes ~1.3 s to dump 10,000 routes; the raw parser a few ms).

Messages, as ``ip``/``bridge`` would send them:

* neighbour: ``RTM_NEWNEIGH`` ``NLM_F_CREATE|NLM_F_REPLACE``, ndmsg{family, ifindex,
  NUD_PERMANENT}, NDA_DST, NDA_LLADDR (``ip neigh replace IP lladdr MAC dev L nud permanent``);
* FDB: ``RTM_NEWNEIGH`` AF_BRIDGE, NTF_SELF, NUD_PERMANENT|NUD_NOARP, NDA_LLADDR, NDA_DST;
  ``NLM_F_APPEND`` for the all-zero/multicast MAC (a flood list holds many remotes) and
  ``NLM_F_REPLACE`` for a unicast MAC (one remote; a changed VTEP replaces the old one);
* nexthop: ``RTM_NEWNEXTHOP`` ``NLM_F_CREATE|NLM_F_EXCL``, nhmsg{family, protocol,
  RTNH_F_ONLINK}, NHA_ID, NHA_OIF, NHA_GATEWAY (``ip nexthop add id N via GW dev L onlink``);
* route: ``RTM_NEWROUTE`` ``NLM_F_CREATE|NLM_F_EXCL`` (or ``NLM_F_REPLACE`` to repoint one of
  ours), rtmsg{family, dst_len, table, protocol}, RTA_DST, RTA_TABLE, RTA_NH_ID. Deletes carry
  the protocol, so the kernel itself refuses to delete a same-prefix route of someone else.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import functools
import ipaddress
import logging
import socket
import struct
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol, TypeVar

from fabric import netns as namespaces
from fabric.netlink import rawnl
from fabric.netlink.objects import RTPROT_FABRIC, Address, DeviceLink, FdbEntry, Link, Neighbour, Rule, VxlanLink

_log = logging.getLogger(__name__)

T = TypeVar("T")

ZERO_MAC = "00:00:00:00:00:00"


class DataplaneError(OSError):
    """A kernel call failed: ``errno`` plus a reason naming the object."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(code, message)
        self.code = code

    def __str__(self) -> str:
        return f"[{errno.errorcode.get(self.code, self.code)}] {self.strerror}"


class UnderlayError(LookupError):
    """No interface in this network namespace holds the configured underlay address."""


@dataclasses.dataclass(frozen=True, slots=True)
class UnderlayLink:
    ifindex: int
    name: str
    mtu: int


@dataclasses.dataclass(frozen=True, slots=True)
class LinkInfo:
    """A link as the kernel has it; ``vxlan`` is filled only for kind ``vxlan``."""

    name: str
    ifindex: int
    kind: str
    vxlan: VxlanLink | None
    up: bool = True


@dataclasses.dataclass(frozen=True, slots=True)
class KernelRule:
    family: int
    table: int
    priority: int
    protocol: int


@dataclasses.dataclass(frozen=True, slots=True)
class KernelNeighbour:
    link: str
    ip: str
    #: Empty when the entry has no link-layer address (incomplete/failed).
    mac: str
    state: int


@dataclasses.dataclass(frozen=True, slots=True)
class Nexthop:
    """A nexthop object; ``link``/``gateway`` are empty for groups and blackholes. A device
    nexthop (no gateway) has the unspecified address of its family as ``gateway``."""

    id: int
    link: str
    gateway: str
    protocol: int = RTPROT_FABRIC
    onlink: bool = True
    #: A group: its member nexthop ids (equal weights); empty for a single nexthop.
    group: tuple[int, ...] = ()
    #: A group of type resilient (``NEXTHOP_GRP_TYPE_RES``); False for hash-threshold groups.
    resilient: bool = False


@dataclasses.dataclass(frozen=True, slots=True)
class NexthopGroup:
    """A resilient nexthop group to program (``ip nexthop add|replace id N group a/b type
    resilient``): a fixed table of ``buckets`` hash buckets, each naming a member. Replacing the
    members moves only the buckets of members that left; a bucket moves to a new member only
    after it was idle ``idle_timer_s`` (so growing the group does not move established flows);
    ``unbalanced_timer_s`` 0 never forces a move."""

    id: int
    members: tuple[int, ...]
    buckets: int = 128
    idle_timer_s: float = 10.0
    unbalanced_timer_s: float = 0.0
    protocol: int = RTPROT_FABRIC


@dataclasses.dataclass(frozen=True, slots=True)
class NhRoute:
    """A route to ``dst`` in ``table`` through nexthop object ``nhid`` (0: a classic route)."""

    table: int
    dst: str
    nhid: int
    protocol: int = RTPROT_FABRIC
    #: Filled from dumps of classic (non-nexthop-object) routes only.
    link: str = ""
    gateway: str = ""


@dataclasses.dataclass(frozen=True, slots=True)
class BatchError:
    index: int
    errno: int
    message: str


class Dataplane(Protocol):
    """Every kernel call the table owners make (see the module docstring for the semantics)."""

    def underlay_link(self, ip: str) -> UnderlayLink: ...

    def list_links(self) -> list[LinkInfo]: ...
    def add_link(self, link: Link) -> None: ...
    def update_link(self, link: Link) -> None:
        """Change the attributes that can change in place: mtu, mac, learning, up/down."""
        ...
    def del_link(self, name: str) -> None: ...

    def list_addresses(self, link: str) -> list[Address]: ...
    def add_address(self, address: Address) -> None: ...
    def del_address(self, address: Address) -> None: ...

    def list_rules(self, family: int) -> list[KernelRule]: ...
    def add_rule(self, rule: Rule) -> None: ...
    def del_rule(self, rule: KernelRule) -> None: ...

    def list_neighbours(self, link: str) -> list[KernelNeighbour]: ...
    def set_neighbours(self, entries: Sequence[Neighbour]) -> list[BatchError]: ...
    def del_neighbours(self, entries: Sequence[Neighbour]) -> list[BatchError]: ...

    def list_fdb(self, link: str) -> list[FdbEntry]: ...
    def add_fdb(self, entries: Sequence[FdbEntry]) -> list[BatchError]: ...
    def del_fdb(self, entries: Sequence[FdbEntry]) -> list[BatchError]: ...

    def list_nexthops(self) -> list[Nexthop]: ...
    def add_nexthops(self, entries: Sequence[Nexthop]) -> list[BatchError]: ...
    def del_nexthops(self, ids: Sequence[int]) -> list[BatchError]: ...
    def set_nexthop_groups(self, entries: Sequence[NexthopGroup], *, replace: bool) -> list[BatchError]: ...

    def list_routes(self, table: int, protocol: int) -> list[NhRoute]:
        """Routes of ``protocol`` in ``table`` (0: in every table)."""

    def add_routes(self, entries: Sequence[NhRoute], *, replace: bool = False) -> list[BatchError]: ...
    def del_routes(self, entries: Sequence[NhRoute]) -> list[BatchError]: ...

    def read_sysctl(self, key: str) -> str | None:
        """A per-network-namespace sysctl (``net.``...) of this dataplane's namespace, stripped;
        None when the kernel has no such sysctl (too old, or the feature compiled out)."""
        ...
    def write_sysctl(self, key: str, value: str) -> None:
        """Set a ``net.``... sysctl of this dataplane's namespace; DataplaneError on failure."""
        ...

    def close(self) -> None: ...


_UNSPECIFIED = {socket.AF_INET: "0.0.0.0", socket.AF_INET6: "::"}
#: <linux/if_addr.h>
_IFA_F_NODAD = 0x02


def _family(ip: str) -> int:
    return socket.AF_INET6 if ":" in ip else socket.AF_INET


def _ip_bytes(ip: str) -> bytes:
    return socket.inet_pton(_family(ip), ip)


def _ip_text(raw: bytes) -> str:
    return socket.inet_ntop(socket.AF_INET6 if len(raw) == 16 else socket.AF_INET, raw)


def is_flood_mac(mac: str) -> bool:
    """All-zero or multicast MAC: an FDB flood-list entry that may hold several remotes."""
    return mac == ZERO_MAC or bool(int(mac[:2], 16) & 1)


@functools.cache
def kernel_errors() -> tuple[type[Exception], ...]:
    """What a failed kernel call raises: :class:`OSError` (our :class:`rawnl.NetlinkFailure`,
    :class:`DataplaneError`, socket errors) and pyroute2's ``NetlinkError`` (not an OSError).

    Only these become :class:`DataplaneError`; anything else (TypeError, KeyError...) is a bug
    and propagates, so the agent crashes into a clean resync instead of counting it as a kernel
    error. pyroute2 is imported on first use, like everywhere (unit tests never load it); an
    ``except`` clause evaluates this only when something was raised."""
    from pyroute2.netlink.exceptions import NetlinkError

    return (OSError, NetlinkError)


def kernel_errno(exc: BaseException) -> int:
    """The errno of a kernel failure (one of :func:`kernel_errors`: pyroute2's ``code``, an
    OSError's ``errno``); EIO only when it carries none."""
    return int(getattr(exc, "code", None) or getattr(exc, "errno", None) or errno.EIO)


def _nl_error(exc: Exception, what: str) -> DataplaneError:
    """``exc`` (one of :func:`kernel_errors`) as a DataplaneError with its own errno."""
    return DataplaneError(kernel_errno(exc), f"{what}: {exc}")


def sysctl_path(key: str) -> Path:
    """``/proc/sys`` path of ``key`` (``net.ipv4.fib_multipath_hash_seed``). Only ``net.``
    sysctls: they are per network namespace (``/proc/sys/net`` shows the namespace of the task
    that opens it), so writing one changes the dataplane's namespace and nothing else; any other
    key is refused (ValueError), as it would change the whole machine."""
    parts = key.split(".")
    if len(parts) < 3 or parts[0] != "net" or any(not p or "/" in p or p in (".", "..") for p in parts):
        raise ValueError(f"sysctl {key!r}: only per-namespace net.* sysctls may be read or set")
    return Path("/proc/sys", *parts)


class KernelDataplane:
    """:class:`Dataplane` on the real kernel (current netns, or ``netns`` for tests/benchmarks)."""

    def __init__(self, *, netns: str | None = None, chunk: int = 1000) -> None:
        self._netns = netns
        self._nl = rawnl.NetlinkSocket(netns=netns, chunk=chunk)
        self._ipr: Any = namespaces.iproute(netns)
        self._index: dict[str, int] = {}
        self._names: dict[int, str] = {}

    def close(self) -> None:
        self._nl.close()
        self._ipr.close()

    # --- link index ---------------------------------------------------------------------

    def _refresh_index(self) -> list[tuple[int, bytes]]:
        msgs = self._nl.dump(rawnl.RTM_GETLINK, rawnl.IFINFOMSG.pack(0, 0, 0, 0, 0, 0))
        self._index.clear()
        self._names.clear()
        for kind, body in msgs:
            if kind != rawnl.RTM_NEWLINK:
                continue
            ifindex = rawnl.IFINFOMSG.unpack_from(body, 0)[3]
            attrs = rawnl.parse_attrs(body, 16, len(body))
            if rawnl.IFLA_IFNAME in attrs:
                name = rawnl.cstr(attrs[rawnl.IFLA_IFNAME])
                self._index[name] = ifindex
                self._names[ifindex] = name
        return msgs

    def _ifindex(self, name: str) -> int:
        idx = self._index.get(name)
        if idx is None:
            self._refresh_index()
            idx = self._index.get(name)
            if idx is None:
                raise DataplaneError(errno.ENODEV, f"link {name!r} does not exist")
        return idx

    def _name(self, ifindex: int) -> str:
        name = self._names.get(ifindex)
        if name is None:
            self._refresh_index()
            name = self._names.get(ifindex, f"if{ifindex}")
        return name

    # --- underlay -------------------------------------------------------------------------

    def underlay_link(self, ip: str) -> UnderlayLink:
        want = ipaddress.ip_address(ip)
        for msg in self._ipr.get_addr(family=_family(str(want))):
            local = msg.get_attr("IFA_LOCAL") or msg.get_attr("IFA_ADDRESS")
            if local and ipaddress.ip_address(local) == want:
                ifindex = int(msg["index"])
                link = self._ipr.get_links(ifindex)[0]
                return UnderlayLink(ifindex, str(link.get_attr("IFLA_IFNAME")), int(link.get_attr("IFLA_MTU")))
        where = f"network namespace {self._netns!r}" if self._netns else "this network namespace"
        raise UnderlayError(f"no interface in {where} holds underlay address {ip} (from the agent's configuration)")

    # --- links ------------------------------------------------------------------------------

    def list_links(self) -> list[LinkInfo]:
        out: list[LinkInfo] = []
        for kind, body in self._refresh_index():
            if kind != rawnl.RTM_NEWLINK:
                continue
            _f, _p, _t, ifindex, flags, _c = rawnl.IFINFOMSG.unpack_from(body, 0)
            attrs = rawnl.parse_attrs(body, 16, len(body))
            name = rawnl.cstr(attrs.get(rawnl.IFLA_IFNAME, b""))
            info = attrs.get(rawnl.IFLA_LINKINFO)
            link_kind, data = "", {}
            if info is not None:
                nested = rawnl.parse_attrs(info, 0, len(info))
                link_kind = rawnl.cstr(nested.get(rawnl.IFLA_INFO_KIND, b""))
                raw_data = nested.get(rawnl.IFLA_INFO_DATA)
                if raw_data is not None:
                    data = rawnl.parse_attrs(raw_data, 0, len(raw_data))
            vx = None
            if link_kind == "vxlan":
                local_raw = data.get(rawnl.IFLA_VXLAN_LOCAL) or data.get(rawnl.IFLA_VXLAN_LOCAL6)
                vx = VxlanLink(
                    name=name,
                    vni=rawnl.u32(data.get(rawnl.IFLA_VXLAN_ID, b"\0\0\0\0")),
                    port=struct.unpack("!H", data.get(rawnl.IFLA_VXLAN_PORT, b"\0\0")[:2])[0],
                    mac=rawnl.mac_text(attrs.get(rawnl.IFLA_ADDRESS, b"\0" * 6)),
                    local=_ip_text(local_raw) if local_raw else "",
                    underlay_ifindex=rawnl.u32(data.get(rawnl.IFLA_VXLAN_LINK, b"\0\0\0\0")),
                    mtu=rawnl.u32(attrs.get(rawnl.IFLA_MTU, b"\0\0\0\0")),
                    learning=bool(data.get(rawnl.IFLA_VXLAN_LEARNING, b"\0")[0]),
                    up=bool(flags & rawnl.IFF_UP),
                )
            out.append(LinkInfo(name, ifindex, link_kind, vx, bool(flags & rawnl.IFF_UP)))
        return out

    def add_link(self, link: Link) -> None:
        if isinstance(link, DeviceLink):
            try:
                self._ipr.link("add", ifname=link.name, kind=link.kind)
                self._refresh_index()
                if link.up:
                    self._ipr.link("set", index=self._ifindex(link.name), state="up")
            except DataplaneError:
                raise
            except kernel_errors() as exc:
                raise _nl_error(exc, f"add {link.kind} link {link.name}") from exc
            return
        family_local = "vxlan_local6" if ":" in link.local else "vxlan_local"
        kwargs = {
            "ifname": link.name,
            "kind": "vxlan",
            "vxlan_id": link.vni,
            "vxlan_port": link.port,
            family_local: link.local,
            "vxlan_link": link.underlay_ifindex,
            "vxlan_learning": int(link.learning),
            "address": link.mac,
            "mtu": link.mtu,
        }
        try:
            self._ipr.link("add", **kwargs)
            self._refresh_index()
            self._enable_ipv6(link.name)
            if link.up:
                self._ipr.link("set", index=self._ifindex(link.name), state="up")
        except DataplaneError:
            raise
        except kernel_errors() as exc:
            raise _nl_error(exc, f"add vxlan link {link.name} (vni {link.vni}, port {link.port})") from exc

    def _in_netns(self, fn: Callable[[], T]) -> T:
        """``fn`` run in this dataplane's namespace: here, or in a short-lived thread that entered
        ``netns`` (what ``/proc/sys/net`` shows depends on the namespace of the opening thread)."""
        return fn() if not self._netns else namespaces.run_in(self._netns, fn)

    def read_sysctl(self, key: str) -> str | None:
        path = sysctl_path(key)

        def read() -> str | None:
            try:
                return path.read_text().strip()
            except FileNotFoundError:
                return None

        try:
            return self._in_netns(read)
        except OSError as e:
            raise DataplaneError(e.errno or errno.EIO, f"read sysctl {key} ({path}): {e.strerror or e}") from e

    def write_sysctl(self, key: str, value: str) -> None:
        path = sysctl_path(key)
        try:
            self._in_netns(lambda: path.write_text(value))
        except OSError as e:
            raise DataplaneError(e.errno or errno.EIO, f"set sysctl {key}={value} ({path}): {e.strerror or e}") from e

    def _enable_ipv6(self, name: str) -> None:
        """``disable_ipv6=0`` on a new tunnel device: a host with IPv6 disabled by default
        (``net.ipv6.conf.default.disable_ipv6=1``) would refuse the IPv6 overlay address of
        ``vx-bridge-6``. Only in our own namespace (/proc/sys/net is per namespace of the
        caller); a failure is logged, and the address add that follows says what went wrong."""
        if self._netns:
            return
        path = Path(f"/proc/sys/net/ipv6/conf/{name}/disable_ipv6")
        try:
            if path.read_text().strip() != "0":
                path.write_text("0")
        except OSError as e:
            _log.warning("cannot enable IPv6 on %s (%s): %s", name, path, e.strerror or e)

    def update_link(self, link: Link) -> None:
        idx = self._ifindex(link.name)
        if isinstance(link, DeviceLink):
            try:
                self._ipr.link("set", index=idx, state="up" if link.up else "down")
            except kernel_errors() as exc:
                raise _nl_error(exc, f"update link {link.name}") from exc
            return
        try:
            # Separate requests: vxlan's changelink refuses a mixed request with EOPNOTSUPP.
            self._ipr.link("set", index=idx, mtu=link.mtu, address=link.mac)
            self._ipr.link("set", index=idx, kind="vxlan", vxlan_learning=int(link.learning))
            self._ipr.link("set", index=idx, state="up" if link.up else "down")
        except kernel_errors() as exc:
            raise _nl_error(exc, f"update link {link.name}") from exc

    def del_link(self, name: str) -> None:
        idx = self._ifindex(name)
        try:
            self._ipr.link("del", index=idx)
        except kernel_errors() as exc:
            raise _nl_error(exc, f"delete link {name}") from exc
        finally:
            self._index.pop(name, None)
            self._names.pop(idx, None)

    # --- addresses ----------------------------------------------------------------------

    def list_addresses(self, link: str) -> list[Address]:
        try:
            idx = self._ifindex(link)
        except DataplaneError:
            return []
        out = []
        try:
            msgs = self._ipr.get_addr(index=idx)
        except kernel_errors() as exc:
            raise _nl_error(exc, f"dump addresses of {link}") from exc
        for msg in msgs:
            local = msg.get_attr("IFA_LOCAL") or msg.get_attr("IFA_ADDRESS")
            if local:
                out.append(Address(link, f"{ipaddress.ip_address(local)}/{msg['prefixlen']}"))
        return out

    def _addr(self, command: str, address: Address) -> None:
        iface = ipaddress.ip_interface(address.address)
        idx = self._ifindex(address.link)
        extra: dict[str, int] = {}
        if command == "add" and iface.version == 6:
            # IFA_F_NODAD: an overlay address is unique by construction (the planner refuses
            # collisions), and duplicate address detection would keep it tentative - unusable
            # as a source - for a second or more after every (re)creation of the device.
            extra["flags"] = _IFA_F_NODAD
        try:
            self._ipr.addr(command, index=idx, address=str(iface.ip), prefixlen=iface.network.prefixlen, **extra)
        except kernel_errors() as exc:
            raise _nl_error(exc, f"{command} address {address.address} on {address.link}") from exc

    def add_address(self, address: Address) -> None:
        self._addr("add", address)

    def del_address(self, address: Address) -> None:
        self._addr("del", address)

    # --- rules ------------------------------------------------------------------------------

    def list_rules(self, family: int) -> list[KernelRule]:
        out = []
        try:
            msgs = self._ipr.get_rules(family=family)
        except kernel_errors() as exc:
            raise _nl_error(exc, f"dump rules of family {family}") from exc
        for msg in msgs:
            table = msg.get_attr("FRA_TABLE") or msg["table"]
            out.append(
                KernelRule(
                    family=int(msg["family"]),
                    table=int(table),
                    priority=int(msg.get_attr("FRA_PRIORITY") or 0),
                    protocol=int(msg.get_attr("FRA_PROTOCOL") or 0),
                )
            )
        return out

    def add_rule(self, rule: Rule) -> None:
        try:
            self._ipr.rule(
                "add", family=rule.family, table=rule.table, priority=rule.priority, protocol=RTPROT_FABRIC
            )
        except kernel_errors() as exc:
            raise _nl_error(exc, f"add rule 'lookup {rule.table} priority {rule.priority}'") from exc

    def del_rule(self, rule: KernelRule) -> None:
        try:
            self._ipr.rule("del", family=rule.family, table=rule.table, priority=rule.priority, protocol=rule.protocol)
        except kernel_errors() as exc:
            raise _nl_error(exc, f"delete rule 'lookup {rule.table} priority {rule.priority}'") from exc

    # --- batches ------------------------------------------------------------------------------

    def _send(self, msg_type: int, flags: int, bodies: list[bytes | BatchError]) -> list[BatchError]:
        """Send the encodable bodies; entries that failed to encode are already BatchErrors."""
        errors = [b for b in bodies if isinstance(b, BatchError)]
        ok_idx = [i for i, b in enumerate(bodies) if not isinstance(b, BatchError)]
        payloads = [b for b in bodies if not isinstance(b, BatchError)]
        try:
            failed = self._nl.batch(msg_type, flags, payloads)
        except OSError as exc:  # the socket itself failed: every entry is unknown, resync
            code = exc.errno or errno.EIO
            return [BatchError(i, code, f"netlink send failed: {exc}") for i in range(len(bodies))]
        if not errors:
            return [BatchError(i, code, text) for i, (code, text) in sorted(failed.items())]
        errors += [BatchError(ok_idx[i], code, text) for i, (code, text) in failed.items()]
        errors.sort(key=lambda e: e.index)
        return errors

    def _ifindexes(self, links: set[str]) -> dict[str, int]:
        out = {}
        for name in links:
            with contextlib.suppress(DataplaneError):
                out[name] = self._ifindex(name)
        return out

    def _neigh_bodies(self, entries: Sequence[Neighbour], with_mac: bool) -> list[bytes | BatchError]:
        idx = self._ifindexes({e.link for e in entries})
        body = rawnl.neigh_body
        out: list[bytes | BatchError] = []
        for i, e in enumerate(entries):
            ifindex = idx.get(e.link)
            if ifindex is None:
                out.append(BatchError(i, errno.ENODEV, f"neighbour {e.ip}: link {e.link!r} does not exist"))
                continue
            fam = socket.AF_INET6 if ":" in e.ip else socket.AF_INET
            out.append(
                body(fam, ifindex, rawnl.NUD_PERMANENT, 0, socket.inet_pton(fam, e.ip),
                     rawnl.mac_bytes(e.mac) if with_mac else None)
            )
        return out

    def set_neighbours(self, entries: Sequence[Neighbour]) -> list[BatchError]:
        return self._send(
            rawnl.RTM_NEWNEIGH, rawnl.NLM_F_CREATE | rawnl.NLM_F_REPLACE, self._neigh_bodies(entries, True)
        )

    def del_neighbours(self, entries: Sequence[Neighbour]) -> list[BatchError]:
        return self._send(rawnl.RTM_DELNEIGH, 0, self._neigh_bodies(entries, False))

    def _dump_neigh(self, family: int, link: str) -> list[tuple[int, bytes]]:
        try:
            idx = self._ifindex(link)
        except DataplaneError:
            return []
        req = rawnl.NDMSG.pack(family, 0, 0, 0, 0, 0, 0) + rawnl.u32_attr(rawnl.NDA_IFINDEX, idx)
        return [(idx, body) for kind, body in self._nl.dump(rawnl.RTM_GETNEIGH, req) if kind == rawnl.RTM_NEWNEIGH]

    def list_neighbours(self, link: str) -> list[KernelNeighbour]:
        out = []
        unpack = rawnl.NDMSG.unpack_from
        for fam in (socket.AF_INET, socket.AF_INET6):
            for idx, body in self._dump_neigh(fam, link):
                family, _p1, _p2, ifindex, state, _flags, _type = unpack(body, 0)
                if ifindex != idx or family != fam:
                    continue
                attrs = rawnl.parse_attrs(body, 12, len(body))
                dst = attrs.get(rawnl.NDA_DST)
                if dst is None:
                    continue
                ll = attrs.get(rawnl.NDA_LLADDR)
                out.append(KernelNeighbour(link, _ip_text(dst), rawnl.mac_text(ll) if ll else "", state))
        return out

    def _fdb_bodies(self, entries: Sequence[FdbEntry]) -> list[bytes | BatchError]:
        idx = self._ifindexes({e.link for e in entries})
        out: list[bytes | BatchError] = []
        for i, e in enumerate(entries):
            ifindex = idx.get(e.link)
            if ifindex is None:
                out.append(BatchError(i, errno.ENODEV, f"fdb {e.mac}: link {e.link!r} does not exist"))
                continue
            out.append(
                rawnl.neigh_body(
                    socket.AF_BRIDGE, ifindex, rawnl.NUD_PERMANENT | rawnl.NUD_NOARP, rawnl.NTF_SELF,
                    _ip_bytes(e.dst), rawnl.mac_bytes(e.mac),
                )
            )
        return out

    def add_fdb(self, entries: Sequence[FdbEntry]) -> list[BatchError]:
        # Flood entries append (a list of remotes), unicast entries replace (one remote each):
        # two batches with different flags, errors mapped back to the caller's indexes.
        flood = [i for i, e in enumerate(entries) if is_flood_mac(e.mac)]
        uni = [i for i, e in enumerate(entries) if not is_flood_mac(e.mac)]
        errors: list[BatchError] = []
        for group, flag in ((flood, rawnl.NLM_F_APPEND), (uni, rawnl.NLM_F_REPLACE)):
            if not group:
                continue
            bodies = self._fdb_bodies([entries[i] for i in group])
            for err in self._send(rawnl.RTM_NEWNEIGH, rawnl.NLM_F_CREATE | flag, bodies):
                errors.append(BatchError(group[err.index], err.errno, err.message))
        errors.sort(key=lambda e: e.index)
        return errors

    def del_fdb(self, entries: Sequence[FdbEntry]) -> list[BatchError]:
        idx = self._ifindexes({e.link for e in entries})
        rawnl.expect_fdb_deletes(
            [(idx[e.link], rawnl.mac_bytes(e.mac), _ip_bytes(e.dst)) for e in entries if e.link in idx]
        )
        return self._send(rawnl.RTM_DELNEIGH, 0, self._fdb_bodies(entries))

    def list_fdb(self, link: str) -> list[FdbEntry]:
        out = []
        for idx, body in self._dump_neigh(socket.AF_BRIDGE, link):
            family, _p1, _p2, ifindex, _state, flags, _type = rawnl.NDMSG.unpack_from(body, 0)
            if ifindex != idx or family != socket.AF_BRIDGE or not flags & rawnl.NTF_SELF:
                continue
            attrs = rawnl.parse_attrs(body, 12, len(body))
            ll, dst = attrs.get(rawnl.NDA_LLADDR), attrs.get(rawnl.NDA_DST)
            if ll is None or dst is None:
                continue
            out.append(FdbEntry(link, rawnl.mac_text(ll), _ip_text(dst)))
        return out

    # --- nexthops -------------------------------------------------------------------------------

    def list_nexthops(self) -> list[Nexthop]:
        try:
            msgs = self._nl.dump(rawnl.RTM_GETNEXTHOP, rawnl.NHMSG.pack(0, 0, 0, 0, 0))
        except rawnl.NetlinkFailure as exc:
            if exc.code in (errno.EOPNOTSUPP, errno.EINVAL):
                return []
            raise DataplaneError(exc.code, f"dump nexthops: {exc.strerror}") from exc
        out = []
        for kind, body in msgs:
            if kind != rawnl.RTM_NEWNEXTHOP:
                continue
            fam, _scope, proto, _r, flags = rawnl.NHMSG.unpack_from(body, 0)
            attrs = rawnl.parse_attrs(body, 8, len(body))
            nhid = rawnl.u32(attrs.get(rawnl.NHA_ID, b"\0\0\0\0"))
            oif = attrs.get(rawnl.NHA_OIF)
            gw = attrs.get(rawnl.NHA_GATEWAY)
            grp = attrs.get(rawnl.NHA_GROUP)
            gtype = attrs.get(rawnl.NHA_GROUP_TYPE)
            out.append(
                Nexthop(
                    id=nhid,
                    link=self._name(rawnl.u32(oif)) if oif else "",
                    gateway=_ip_text(gw) if gw else _UNSPECIFIED.get(fam, "") if oif else "",
                    protocol=proto,
                    onlink=bool(flags & rawnl.RTNH_F_ONLINK),
                    group=rawnl.group_members(grp) if grp else (),
                    resilient=gtype is not None and int.from_bytes(gtype[:2], "little") == rawnl.NEXTHOP_GRP_TYPE_RES,
                )
            )
        return out

    def add_nexthops(self, entries: Sequence[Nexthop]) -> list[BatchError]:
        idx = self._ifindexes({e.link for e in entries})
        bodies: list[bytes | BatchError] = []
        for i, e in enumerate(entries):
            ifindex = idx.get(e.link)
            if ifindex is None:
                bodies.append(BatchError(i, errno.ENODEV, f"nexthop {e.id}: link {e.link!r} does not exist"))
                continue
            fam = _family(e.gateway)
            gw = socket.inet_pton(fam, e.gateway)
            if gw == bytes(len(gw)):  # device nexthop: no gateway, and onlink needs one
                bodies.append(rawnl.nexthop_body(e.id, fam, e.protocol, ifindex, None, False))
            else:
                bodies.append(rawnl.nexthop_body(e.id, fam, e.protocol, ifindex, gw, e.onlink))
        return self._send(rawnl.RTM_NEWNEXTHOP, rawnl.NLM_F_CREATE | rawnl.NLM_F_EXCL, bodies)

    def set_nexthop_groups(self, entries: Sequence[NexthopGroup], *, replace: bool) -> list[BatchError]:
        """Create (``replace`` False: fails EEXIST on a taken id) or replace resilient groups;
        replacing keeps the buckets of the members that stay (see :class:`NexthopGroup`)."""
        bodies: list[bytes | BatchError] = [
            rawnl.nexthop_group_body(e.id, e.protocol, e.members, e.buckets, e.idle_timer_s, e.unbalanced_timer_s)
            for e in entries
        ]
        flags = rawnl.NLM_F_CREATE | (rawnl.NLM_F_REPLACE if replace else rawnl.NLM_F_EXCL)
        return self._send(rawnl.RTM_NEWNEXTHOP, flags, bodies)

    def del_nexthops(self, ids: Sequence[int]) -> list[BatchError]:
        bodies: list[bytes | BatchError] = [
            rawnl.NHMSG.pack(0, 0, 0, 0, 0) + rawnl.u32_attr(rawnl.NHA_ID, i) for i in ids
        ]
        return self._send(rawnl.RTM_DELNEXTHOP, 0, bodies)

    # --- routes --------------------------------------------------------------------------------

    def _route_bodies(self, entries: Sequence[NhRoute], with_nh: bool) -> list[bytes | BatchError]:
        out: list[bytes | BatchError] = []
        body = rawnl.route_body
        for e in entries:
            addr, _, plen = e.dst.partition("/")
            fam = socket.AF_INET6 if ":" in addr else socket.AF_INET
            raw = socket.inet_pton(fam, addr)
            out.append(
                body(fam, e.table, raw, int(plen) if plen else len(raw) * 8, e.protocol, e.nhid if with_nh else 0)
            )
        return out

    def add_routes(self, entries: Sequence[NhRoute], *, replace: bool = False) -> list[BatchError]:
        flags = rawnl.NLM_F_CREATE | (rawnl.NLM_F_REPLACE if replace else rawnl.NLM_F_EXCL)
        return self._send(rawnl.RTM_NEWROUTE, flags, self._route_bodies(entries, True))

    def del_routes(self, entries: Sequence[NhRoute]) -> list[BatchError]:
        return self._send(rawnl.RTM_DELROUTE, 0, self._route_bodies(entries, False))

    def list_routes(self, table: int, protocol: int) -> list[NhRoute]:
        out: list[NhRoute] = []
        unpack = rawnl.RTMSG.unpack_from
        for fam in (socket.AF_INET, socket.AF_INET6):
            req = rawnl.RTMSG.pack(fam, 0, 0, 0, table if table < 256 else 0, protocol, 0, 0, 0)
            req += rawnl.u32_attr(rawnl.RTA_TABLE, table)
            try:
                msgs = self._nl.dump(rawnl.RTM_GETROUTE, req)
            except rawnl.NetlinkFailure as exc:
                if exc.code == errno.ENOENT:  # the table does not exist (yet): nothing in it
                    continue
                raise DataplaneError(exc.code, f"dump routes of table {table}: {exc.strerror}") from exc
            for kind, body in msgs:
                if kind != rawnl.RTM_NEWROUTE:
                    continue
                family, dst_len, _sl, _tos, tbl, proto, _scope, rtype, _flags = unpack(body, 0)
                if proto != protocol or rtype != rawnl.RTN_UNICAST:
                    continue
                attrs = rawnl.parse_attrs(body, 12, len(body))
                if rawnl.RTA_TABLE in attrs:
                    tbl = rawnl.u32(attrs[rawnl.RTA_TABLE])
                if table and tbl != table:
                    continue
                dst = attrs.get(rawnl.RTA_DST)
                dst_ip = _ip_text(dst) if dst else ("::" if family == socket.AF_INET6 else "0.0.0.0")
                nh = attrs.get(rawnl.RTA_NH_ID)
                oif = attrs.get(rawnl.RTA_OIF)
                gw = attrs.get(rawnl.RTA_GATEWAY)
                out.append(
                    NhRoute(
                        table=tbl,
                        dst=f"{dst_ip}/{dst_len}",
                        nhid=rawnl.u32(nh) if nh else 0,
                        protocol=proto,
                        link=self._name(rawnl.u32(oif)) if oif else "",
                        gateway=_ip_text(gw) if gw else "",
                    )
                )
        return out
