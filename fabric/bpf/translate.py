"""Loader of the global-IP translator: stateless 1:1 prefix translation in tc BPF, IPv4 and IPv6.

Kernel objects and their order
------------------------------
* **Pinned maps** under ``<pin_root>/<instance>/`` (default ``/sys/fs/bpf/kosmos-fabric/``):
  ``xlate4_dnat``, ``xlate4_snat``, ``xlate6_dnat``, ``xlate6_snat`` (LPM tries: global -> local
  by destination, local -> global by source), ``xlate_stats`` (per-CPU packet/byte counters, one
  slot per LPM entry) and ``xlate_drops`` (per-CPU drops by reason). They are created by the
  first compile and reused by every later one, so an agent restart keeps mappings and counters.
  A pin whose definition no longer matches (type, key/value size, size, flags) is removed and
  recreated, with a warning: the old maps stay alive as long as the old programs use them.
* **Programs**, compiled once per process and pin directory (bcc, about a second): three entry
  points, one C file each (``tunnel_ingress.bpf.c``, ``tunnel_egress.bpf.c``, ``hairpin.bpf.c``),
  compiled together so that one compile serves every attach point.
* **tc filters**: a ``clsact`` qdisc on the device (added if missing, never removed: others may
  use it) and one ``bpf`` filter in direct-action mode per attach point, at :data:`FILTER_PRIO`
  / :data:`FILTER_HANDLE`. Attaching always *replaces* that filter, which the kernel does
  atomically: on restart the new program takes over without a packet going untranslated.

Order for the agent (and why): ``load()`` (maps exist, reused or new) -> ``set_mappings()``
(fresh maps are filled before any program uses them) -> ``attach()`` per device (the atomic
swap) -> later ``set_mappings()`` deltas. ``cleanup()`` detaches and unpins: only for a node
leaving the fabric, never on a restart.

The agent runs in its node's network namespace: netlink goes to the current namespace, or to
``netns=NAME`` for tests and tools.
"""

from __future__ import annotations

import ctypes
import enum
import ipaddress
import logging
import re
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fabric import netns as namespaces
from fabric.bpf import libbpf

_log = logging.getLogger(__name__)

SRC_DIR = Path(__file__).resolve().parent
DEFAULT_PIN_ROOT = Path("/sys/fs/bpf/kosmos-fabric")
BPF_FS_MAGIC = 0xCAFE4A11
ENTRY_FILES = ("tunnel_ingress.bpf.c", "tunnel_egress.bpf.c", "hairpin.bpf.c")
# tc filter slot of ours on every device; attach replaces exactly this one.
FILTER_PRIO = 0xF0
FILTER_HANDLE = 0xF0
_PARENT = {"ingress": "ffff:fff2", "egress": "ffff:fff3"}
DEFAULT_MAX_MAPPINGS = 1024
# Index = DROP_* in consts.h
DROP_REASONS = ("l4_truncated", "store_failed", "exthdr_limit")

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


class TranslatorError(Exception):
    """A translator operation failed; the message names the value and where it came from."""


class MappingError(TranslatorError, ValueError):
    """A mapping is invalid (bad CIDR, families or prefix lengths differ, overlap)."""


class AttachPoint(enum.Enum):
    """Where a program runs: (function in the C sources, tc direction)."""

    TUNNEL_INGRESS = ("xlate_tunnel_ingress", "ingress")
    TUNNEL_EGRESS = ("xlate_tunnel_egress", "egress")
    HAIRPIN = ("xlate_hairpin", "egress")

    @property
    def function(self) -> str:
        return self.value[0]

    @property
    def direction(self) -> str:
        return self.value[1]


@dataclass(frozen=True)
class Mapping:
    """One cluster CIDR and the global CIDR other clusters know it by (same family and size)."""

    local: IPNetwork
    global_: IPNetwork

    @classmethod
    def parse(cls, local: str, global_: str, *, source: str = "mapping") -> Mapping:
        nets = []
        for what, text in (("local", local), ("global", global_)):
            try:
                nets.append(ipaddress.ip_network(str(text), strict=True))
            except ValueError as e:
                raise MappingError(f"{source}: {what} CIDR {text!r} is not a network address: {e}") from None
        m = cls(nets[0], nets[1])
        m.check(source)
        return m

    def check(self, source: str = "mapping") -> None:
        if self.local.version != self.global_.version:
            raise MappingError(f"{source}: {self} mixes IPv{self.local.version} and IPv{self.global_.version}")
        if self.local.prefixlen != self.global_.prefixlen:
            raise MappingError(
                f"{source}: {self} has different prefix lengths (/{self.local.prefixlen} vs "
                f"/{self.global_.prefixlen}); a 1:1 translation needs the same size on both sides"
            )

    def __str__(self) -> str:
        return f"{self.local}={self.global_}"

    def sort_key(self) -> tuple[int, int, int, int]:
        """IPv4 before IPv6, then by local CIDR (networks of both families do not compare)."""
        return (self.local.version, int(self.local.network_address), self.local.prefixlen,
                int(self.global_.network_address))


def validate_mappings(mappings: Iterable[Mapping], source: str = "mappings") -> list[Mapping]:
    """Check a node's mapping set as a whole and return it sorted.

    Translation must be a bijection: no two local CIDRs may overlap (nor two global ones), and a
    global CIDR may not overlap a local one (a packet to it would be translated twice over).
    """
    out = sorted(set(mappings), key=Mapping.sort_key)
    for m in out:
        m.check(source)
    for i, a in enumerate(out):
        for b in out[i + 1 :]:
            if a.local.version != b.local.version:
                continue
            if a.local.overlaps(b.local):
                raise MappingError(f"{source}: local CIDRs of {a} and {b} overlap")
            if a.global_.overlaps(b.global_):
                raise MappingError(f"{source}: global CIDRs of {a} and {b} overlap")
    for a in out:
        for b in out:
            if a.global_.version == b.local.version and a.global_.overlaps(b.local):
                raise MappingError(f"{source}: global CIDR of {a} overlaps local CIDR of {b}")
    return out


def parse_mappings(table: dict[str, str] | Iterable[tuple[str, str]], source: str = "mappings") -> list[Mapping]:
    """``{local: global}`` (the topology's ``globalCIDRs``) or pairs -> validated mappings."""
    pairs = table.items() if isinstance(table, dict) else table
    return validate_mappings((Mapping.parse(lo, gl, source=f"{source}[{lo}]") for lo, gl in pairs), source)


# --- map layouts, mirrors of maps.h ---------------------------------------------------------


class _Key4(ctypes.Structure):
    _fields_ = [("prefixlen", ctypes.c_uint32), ("addr", ctypes.c_ubyte * 4)]


class _Key6(ctypes.Structure):
    _fields_ = [("prefixlen", ctypes.c_uint32), ("addr", ctypes.c_ubyte * 16)]


class _Xlate4(ctypes.Structure):
    _fields_ = [
        ("base", ctypes.c_ubyte * 4),
        ("mask", ctypes.c_ubyte * 4),
        ("counter", ctypes.c_uint32),
        ("pad", ctypes.c_uint32),
    ]


class _Xlate6(ctypes.Structure):
    _fields_ = [
        ("base", ctypes.c_ubyte * 16),
        ("mask", ctypes.c_ubyte * 16),
        ("counter", ctypes.c_uint32),
        ("pad", ctypes.c_uint32),
    ]


class _Stat(ctypes.Structure):
    _fields_ = [("packets", ctypes.c_uint64), ("bytes", ctypes.c_uint64)]


def _map_layouts(max_mappings: int) -> dict[str, tuple[Any, Any, libbpf.MapDef]]:
    lpm = libbpf.MAP_TYPE_LPM_TRIE
    pcpu = libbpf.MAP_TYPE_PERCPU_ARRAY
    nop = libbpf.BPF_F_NO_PREALLOC
    u32, u64 = ctypes.c_uint32, ctypes.c_uint64

    def d(t: int, k: Any, v: Any, n: int, f: int) -> libbpf.MapDef:
        return libbpf.MapDef(t, ctypes.sizeof(k), ctypes.sizeof(v), n, f)

    return {
        "xlate4_dnat": (_Key4, _Xlate4, d(lpm, _Key4, _Xlate4, max_mappings, nop)),
        "xlate4_snat": (_Key4, _Xlate4, d(lpm, _Key4, _Xlate4, max_mappings, nop)),
        "xlate6_dnat": (_Key6, _Xlate6, d(lpm, _Key6, _Xlate6, max_mappings, nop)),
        "xlate6_snat": (_Key6, _Xlate6, d(lpm, _Key6, _Xlate6, max_mappings, nop)),
        "xlate_stats": (u32, _Stat, d(pcpu, u32, _Stat, 4 * max_mappings, 0)),
        "xlate_drops": (u32, u64, d(pcpu, u32, u64, len(DROP_REASONS), 0)),
    }


@dataclass(frozen=True)
class _Entry:
    """One LPM entry: key prefix -> target prefix, with its counter slot."""

    key: IPNetwork
    target: IPNetwork
    counter: int


def _lpm_map(family: int, kind: str) -> str:
    return f"xlate{family}_{kind}"


@dataclass
class MappingCounters:
    """Packets and bytes translated for one mapping, summed over CPUs.

    ``in_*``: destination global -> local (tunnel ingress, hairpin); ``out_*``: source
    local -> global (tunnel egress, hairpin).
    """

    in_packets: int = 0
    in_bytes: int = 0
    out_packets: int = 0
    out_bytes: int = 0


@dataclass
class MappingDelta:
    """What one ``set_mappings`` pass changed (LPM entries, both directions of each mapping)."""

    added: list[Mapping] = field(default_factory=list)
    removed: list[Mapping] = field(default_factory=list)
    unchanged: int = 0
    failed: list[str] = field(default_factory=list)


class TranslatorMaps:
    """The pinned maps of one instance, opened without compiling anything (dump, counters)."""

    def __init__(self, pin_dir: Path, max_mappings: int = DEFAULT_MAX_MAPPINGS) -> None:
        self.pin_dir = pin_dir
        self.maps: dict[str, libbpf.PinnedMap] = {}
        try:
            for name, (k, v, _d) in _map_layouts(max_mappings).items():
                self.maps[name] = libbpf.PinnedMap(pin_dir / name, k, v)
        except OSError as e:
            self.close()
            raise TranslatorError(f"cannot open the translator maps in {pin_dir}: {e}") from e

    def close(self) -> None:
        for m in self.maps.values():
            m.close()
        self.maps.clear()

    def entries(self, family: int, kind: str) -> dict[IPNetwork, _Entry]:
        size = 4 if family == 4 else 16
        out: dict[IPNetwork, _Entry] = {}
        for key, vals in self.maps[_lpm_map(family, kind)].items():
            v = vals[0]
            k = ipaddress.ip_network((bytes(key.addr)[:size], key.prefixlen))
            t = ipaddress.ip_network((bytes(v.base)[:size], key.prefixlen))
            out[k] = _Entry(k, t, v.counter)
        return out

    def stat(self, slot: int) -> tuple[int, int]:
        vals = self.maps["xlate_stats"].lookup(ctypes.c_uint32(slot)) or []
        return sum(v.packets for v in vals), sum(v.bytes for v in vals)

    def mappings_with_slots(self) -> dict[Mapping, tuple[int | None, int | None]]:
        """Mappings present in the maps -> (dnat slot, snat slot). A half-present mapping (one
        direction only, e.g. after a crash mid-update) is listed with None for the other."""
        out: dict[Mapping, tuple[int | None, int | None]] = {}
        for fam in (4, 6):
            for e in self.entries(fam, "dnat").values():
                out[Mapping(e.target, e.key)] = (e.counter, None)
            for e in self.entries(fam, "snat").values():
                m = Mapping(e.key, e.target)
                out[m] = (out.get(m, (None, None))[0], e.counter)
        return out

    def counters(self) -> dict[Mapping, MappingCounters]:
        out = {}
        for m, (dn, sn) in self.mappings_with_slots().items():
            c = MappingCounters()
            if dn is not None:
                c.in_packets, c.in_bytes = self.stat(dn)
            if sn is not None:
                c.out_packets, c.out_bytes = self.stat(sn)
            out[m] = c
        return out

    def drops(self) -> dict[str, int]:
        out = {}
        for i, reason in enumerate(DROP_REASONS):
            vals = self.maps["xlate_drops"].lookup(ctypes.c_uint32(i)) or []
            out[reason] = sum(int(v.value) for v in vals)
        return out

    def dump(self) -> dict[str, Any]:
        """Mappings with counters and which directions the maps hold (``ingress``: the global ->
        local entry, ``egress``: local -> global; a half-present mapping shows one False)."""
        slots = self.mappings_with_slots()
        return {
            "pin_dir": str(self.pin_dir),
            "mappings": [
                {"local": str(m.local), "global": str(m.global_), **vars(c),
                 "ingress": slots[m][0] is not None, "egress": slots[m][1] is not None}
                for m, c in sorted(self.counters().items(), key=lambda mc: mc[0].sort_key())
            ],
            "drops": self.drops(),
        }


def dump_pinned(instance: str, pin_root: Path = DEFAULT_PIN_ROOT) -> dict[str, Any]:
    """The loaded mappings, counters and drops of an instance, for ``fabric-tool state``; reads
    the pins only (no compile, no root-only tc calls beyond opening bpffs)."""
    maps = TranslatorMaps(pin_dir_for(instance, pin_root))
    try:
        return {"instance": instance, **maps.dump()}
    finally:
        maps.close()


def pin_dir_for(instance: str, pin_root: Path = DEFAULT_PIN_ROOT) -> Path:
    if not re.fullmatch(r"[A-Za-z0-9_.-]{1,64}", instance) or instance in (".", ".."):
        raise TranslatorError(f"translator instance name {instance!r} must be 1-64 of [A-Za-z0-9_.-]")
    return pin_root / instance


def _is_bpffs(path: Path) -> bool:
    libc = ctypes.CDLL(None, use_errno=True)
    buf = ctypes.create_string_buffer(256)  # struct statfs; f_type is the first word
    if libc.statfs(str(path).encode(), buf) != 0:
        return False
    return int.from_bytes(buf.raw[: ctypes.sizeof(ctypes.c_long)], "little") == BPF_FS_MAGIC


# --- compile cache -----------------------------------------------------------------------------

_compiled: dict[tuple[str, tuple[str, ...]], Any] = {}
_compile_lock = threading.Lock()


def _compile(pin_dir: Path, cflags: Sequence[str]) -> Any:
    """One bcc compile per (pin directory, cflags) and process: the pin path is compiled in."""
    key = (str(pin_dir), tuple(cflags))
    with _compile_lock:
        if key not in _compiled:
            from bcc import BPF  # imported late: tools that only dump maps do not need bcc

            text = _bundle(ENTRY_FILES)
            _log.info("compiling the translator for %s (bcc)", pin_dir)
            try:
                _compiled[key] = BPF(text=text.encode(), cflags=list(cflags))
            except Exception as e:
                raise TranslatorError(f"compiling {', '.join(ENTRY_FILES)} for {pin_dir} failed: {e}") from e
        return _compiled[key]


_LOCAL_INCLUDE = re.compile(r'^#include "([A-Za-z0-9_.]+)"\s*$', re.M)


def _bundle(entry_files: Sequence[str]) -> str:
    """The entry files with our own headers inlined, each once.

    bcc rewrites map method calls (``xlate_stats.lookup(&k)``) and turns functions into programs
    only in its main source; in an ``#include``d header the call stays an indirect call the
    verifier rejects. So local headers are expanded here (system headers stay ``#include``s).
    """
    seen: set[str] = set()

    def expand(name: str) -> str:
        if name in seen:
            return ""
        seen.add(name)
        body = (SRC_DIR / name).read_text()
        return _LOCAL_INCLUDE.sub(lambda m: expand(m.group(1)), body)

    return "\n".join(expand(f) for f in entry_files)


def _forget_compiled(pin_dir: Path) -> None:
    with _compile_lock:
        for key in [k for k in _compiled if k[0] == str(pin_dir)]:
            _compiled.pop(key).cleanup()


# --- the loader ----------------------------------------------------------------------------------


class Translator:
    """Compile, attach, program the mappings of, and remove the translator of one instance.

    ``instance`` names the pin directory (one per node agent, e.g. ``<cluster>-<node>``).
    """

    def __init__(
        self,
        instance: str,
        *,
        pin_root: Path = DEFAULT_PIN_ROOT,
        netns: str | None = None,
        max_mappings: int = DEFAULT_MAX_MAPPINGS,
        ipv4: bool = True,
        ipv6: bool = True,
        icmp_inner: bool = True,
    ) -> None:
        self.instance = instance
        self.pin_dir = pin_dir_for(instance, pin_root)
        self.netns = netns
        self.max_mappings = max_mappings
        self.features = {"ENABLE_IPV4": ipv4, "ENABLE_IPV6": ipv6, "ENABLE_ICMP_INNER": icmp_inner,
                         "ENABLE_CSUM_IPV6_FLAG": True}
        self._bpf: Any = None
        self._maps: TranslatorMaps | None = None
        self._attached: set[tuple[str, AttachPoint]] = set()

    # -- lifecycle --

    def cflags(self) -> list[str]:
        flags = [f'-DPIN_DIR="{self.pin_dir}"', f"-DXLATE_MAX_MAPPINGS={self.max_mappings}"]
        flags += [f"-D{name}" for name, on in sorted(self.features.items()) if on]
        return flags

    def load(self) -> None:
        """Compile (once per process) and open the pinned maps, reusing compatible pins."""
        if self._bpf is not None:
            return
        root = self.pin_dir.parent
        if not _is_bpffs(root) and not _is_bpffs(root.parent):
            raise TranslatorError(
                f"{root} is not on a bpf filesystem; mount one first (mount -t bpf bpf {root.parent})"
            )
        self.pin_dir.mkdir(parents=True, exist_ok=True)
        self._drop_incompatible_pins()
        bpf = _compile(self.pin_dir, self.cflags())
        for point in AttachPoint:
            bpf.load_func(point.function.encode(), bpf.SCHED_CLS)
        self._bpf = bpf
        self._maps = TranslatorMaps(self.pin_dir, self.max_mappings)
        expected = {n: d for n, (_k, _v, d) in _map_layouts(self.max_mappings).items()}
        for name, pm in self._maps.maps.items():
            if pm.info != expected[name]:
                raise TranslatorError(
                    f"map {pm.path} is {pm.info}, the loader expects {expected[name]} (maps.h and "
                    "translate.py disagree)"
                )

    def _drop_incompatible_pins(self) -> None:
        stale = []
        for name, (_k, _v, want) in _map_layouts(self.max_mappings).items():
            path = self.pin_dir / name
            if not path.exists():
                continue
            try:
                have = libbpf.pinned_map_def(path)
            except OSError as e:
                stale.append(f"{name} ({e})")
                continue
            if have != want:
                stale.append(f"{name} ({have} != {want})")
        if stale:
            _log.warning(
                "pinned translator maps in %s do not match this version: %s; recreating all of them "
                "(counters restart from zero)", self.pin_dir, ", ".join(stale),
            )
            _forget_compiled(self.pin_dir)
            self._unpin()

    def _unpin(self) -> None:
        for name in _map_layouts(self.max_mappings):
            (self.pin_dir / name).unlink(missing_ok=True)

    def _require(self) -> tuple[Any, TranslatorMaps]:
        if self._bpf is None or self._maps is None:
            raise TranslatorError(f"translator {self.instance!r} is not loaded (call load() first)")
        return self._bpf, self._maps

    def close(self) -> None:
        """Forget this process's handles; programs stay attached and maps stay pinned."""
        if self._maps is not None:
            self._maps.close()
            self._maps = None
        self._bpf = None

    def cleanup(self, ifnames: Iterable[str] = ()) -> None:
        """Detach our filters from ``ifnames`` and unpin every map: the node leaves the fabric."""
        for ifname in ifnames:
            for point in AttachPoint:
                self._detach(ifname, point, missing_ok=True)
        self.close()
        _forget_compiled(self.pin_dir)
        self._unpin()
        try:
            self.pin_dir.rmdir()
        except FileNotFoundError:
            pass
        except OSError as e:
            _log.warning("could not remove %s: %s", self.pin_dir, e)

    # -- tc --

    def _ipr(self) -> Any:
        return namespaces.iproute(self.netns)

    def _ifindex(self, ipr: Any, ifname: str) -> int:
        idx = ipr.link_lookup(ifname=ifname)
        if not idx:
            where = f"network namespace {self.netns!r}" if self.netns else "this network namespace"
            raise TranslatorError(f"device {ifname!r} not found in {where}")
        return int(idx[0])

    def attach(self, ifname: str, point: AttachPoint) -> None:
        """Run ``point``'s program on ``ifname``: add clsact if needed, then replace our filter
        (atomic for a filter that is already there, e.g. from the previous agent process)."""
        from pyroute2.netlink.exceptions import NetlinkError

        bpf, _maps = self._require()
        fn = bpf.load_func(point.function.encode(), bpf.SCHED_CLS)
        with self._ipr() as ipr:
            idx = self._ifindex(ipr, ifname)
            try:
                ipr.tc("add", "clsact", idx)
            except NetlinkError as e:
                if e.code != 17:  # EEXIST: already there
                    raise TranslatorError(f"adding clsact to {ifname!r}: {e}") from e
            try:
                ipr.tc(
                    "replace-filter", "bpf", idx, FILTER_HANDLE, fd=fn.fd, name=point.function,
                    parent=_PARENT[point.direction], prio=FILTER_PRIO, direct_action=True,
                )
            except NetlinkError as e:
                raise TranslatorError(f"attaching {point.function} to {point.direction} of {ifname!r}: {e}") from e
        self._attached.add((ifname, point))
        _log.info("translator %s: %s attached to %s %s", self.instance, point.function, ifname, point.direction)

    def attach_tunnel(self, ifname: str) -> None:
        """Both tunnel programs on an inter-cluster tunnel device (vx-bridge, vx-bridge-6)."""
        self.attach(ifname, AttachPoint.TUNNEL_INGRESS)
        self.attach(ifname, AttachPoint.TUNNEL_EGRESS)

    def detach(self, ifname: str, point: AttachPoint) -> None:
        self._detach(ifname, point, missing_ok=True)

    def _detach(self, ifname: str, point: AttachPoint, *, missing_ok: bool) -> None:
        from pyroute2.netlink.exceptions import NetlinkError

        with self._ipr() as ipr:
            idx = ipr.link_lookup(ifname=ifname)
            if not idx:
                if missing_ok:
                    return
                raise TranslatorError(f"device {ifname!r} not found")
            ours = self._our_filter(ipr, idx[0], point.direction)
            if ours != point.function:
                return
            try:
                ipr.tc("del-filter", "bpf", idx[0], FILTER_HANDLE, parent=_PARENT[point.direction], prio=FILTER_PRIO)
            except NetlinkError as e:
                if not (missing_ok and e.code in (2, 22)):
                    raise TranslatorError(f"detaching {point.function} from {ifname!r}: {e}") from e
        self._attached.discard((ifname, point))

    def _our_filter(self, ipr: Any, idx: int, direction: str) -> str | None:
        """Name of the program in our filter slot on that side of the device, if any."""
        from pyroute2.netlink.exceptions import NetlinkError

        try:
            filters = ipr.get_filters(index=idx, parent=_PARENT[direction])
        except NetlinkError:
            return None
        for f in filters:
            if (f["info"] >> 16) != FILTER_PRIO:
                continue
            opts = f.get_attr("TCA_OPTIONS")
            name = opts.get_attr("TCA_BPF_NAME") if opts is not None else None
            if name and str(name).split(":")[0] in {p.function for p in AttachPoint}:
                return str(name).split(":")[0]
        return None

    def attachments(self, ifnames: Iterable[str]) -> list[dict[str, str]]:
        """Which of our programs run on which of ``ifnames`` (read from the kernel)."""
        out = []
        with self._ipr() as ipr:
            for ifname in ifnames:
                idx = ipr.link_lookup(ifname=ifname)
                for direction in ("ingress", "egress"):
                    name = self._our_filter(ipr, idx[0], direction) if idx else None
                    if name:
                        out.append({"device": ifname, "direction": direction, "program": name})
        return out

    # -- mappings --

    def set_mappings(self, mappings: Iterable[Mapping], *, source: str = "mappings") -> MappingDelta:
        """Make the maps hold exactly ``mappings``, writing only the difference.

        Additions and changes are written before removals (a prefix never goes briefly
        untranslated when a mapping moves); an entry whose target is unchanged keeps its
        counter slot, a new or changed one gets a zeroed free slot. A failed entry is logged and
        listed in ``failed``; the others are still applied.
        """
        _bpf, maps = self._require()
        wanted = validate_mappings(mappings, source)
        delta = MappingDelta()
        current = maps.mappings_with_slots()
        used = {s for pair in current.values() for s in pair if s is not None}
        keep = {m for m in wanted if m in current and None not in current[m]}
        delta.unchanged = len(keep)
        free = (s for s in range(4 * self.max_mappings) if s not in used)
        for m in wanted:
            if m in keep:
                continue
            fam = m.local.version
            try:
                for kind, key, target in (("dnat", m.global_, m.local), ("snat", m.local, m.global_)):
                    slot = next(free)
                    maps.maps["xlate_stats"].update(ctypes.c_uint32(slot), _Stat(0, 0))
                    maps.maps[_lpm_map(fam, kind)].update(_key(key), _value(target, slot))
                delta.added.append(m)
            except (OSError, StopIteration) as e:
                msg = f"{source}: loading {m} failed: {e or 'no free counter slot'}"
                _log.error("%s", msg)
                delta.failed.append(msg)
        wanted_keys = {(m.local.version, "dnat", m.global_) for m in wanted} | {
            (m.local.version, "snat", m.local) for m in wanted
        }
        for m in current:
            if m in keep:
                continue
            for kind, key in (("dnat", m.global_), ("snat", m.local)):
                if (m.local.version, kind, key) in wanted_keys:
                    continue  # overwritten above by a changed mapping with the same key
                try:
                    maps.maps[_lpm_map(m.local.version, kind)].delete(_key(key))
                except OSError as e:
                    msg = f"{source}: removing {m} ({kind}) failed: {e}"
                    _log.error("%s", msg)
                    delta.failed.append(msg)
            delta.removed.append(m)
        if delta.added or delta.removed:
            _log.info(
                "translator %s: %d mappings added, %d removed, %d unchanged",
                self.instance, len(delta.added), len(delta.removed), delta.unchanged,
            )
        return delta

    def mappings(self) -> list[Mapping]:
        _bpf, maps = self._require()
        return sorted(maps.mappings_with_slots(), key=Mapping.sort_key)

    def counters(self) -> dict[Mapping, MappingCounters]:
        _bpf, maps = self._require()
        return maps.counters()

    def drops(self) -> dict[str, int]:
        _bpf, maps = self._require()
        return maps.drops()

    def dump(self, ifnames: Iterable[str] = ()) -> dict[str, Any]:
        """Everything ``fabric-tool state`` shows: mappings with counters, drops, attachments."""
        _bpf, maps = self._require()
        return {"instance": self.instance, **maps.dump(), "attachments": self.attachments(ifnames)}

    def prog_fd(self, point: AttachPoint) -> int:
        """The loaded program's fd (for BPF_PROG_TEST_RUN in tests and benchmarks)."""
        bpf, _maps = self._require()
        return int(bpf.load_func(point.function.encode(), bpf.SCHED_CLS).fd)


def _key(net: IPNetwork) -> Any:
    k: Any = _Key4() if net.version == 4 else _Key6()
    k.prefixlen = net.prefixlen
    raw = net.network_address.packed
    ctypes.memmove(k.addr, raw, len(raw))
    return k


def _value(target: IPNetwork, slot: int) -> Any:
    v: Any = _Xlate4() if target.version == 4 else _Xlate6()
    ctypes.memmove(v.base, target.network_address.packed, len(target.network_address.packed))
    ctypes.memmove(v.mask, target.netmask.packed, len(target.netmask.packed))
    v.counter = slot
    return v
