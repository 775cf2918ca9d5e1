"""Semantic checks of the fabric configuration shared by its three readers.

The same configuration reaches the fabric three ways: the topology file
(:mod:`fabric.topology`), Cluster resources (:mod:`fabric.crd`) and, whatever its source, the
:class:`~fabric.types.FabricConfig` the reflector is handed (``planner.config_problems``). Each
used to carry its own CIDR reader and its own overlay-range checks, and they drifted (the
topology file checked the vx-local default even where no gateway-mode cluster would ever use
it). The checks that must mean the same thing everywhere live here; each returns
``(path, reason)`` pairs so that every caller keeps naming the key path and its source.

Rule for defaults: a range the configuration does not set (a family missing from
``bridgeCIDRs``/``localCIDRs``) is checked only where it is used (the bridge range of a family
some cluster runs, the vx-local range of a family some gateway-mode cluster runs), and a
collision with a default says that it is a default and which key to set. Ranges the file does
set are always checked: the user wrote them, an overlap is a mistake even before it bites.
"""

from __future__ import annotations

import dataclasses
import ipaddress
from collections.abc import Iterable, Sequence

from fabric import types

#: Problems as ``(key path, reason)``; the caller prefixes its source.
Problems = list[tuple[str, str]]

BRIDGE_DEFAULTS = (types.DEFAULT_BRIDGE_CIDR_V4, types.DEFAULT_BRIDGE_CIDR_V6)
LOCAL_DEFAULTS = (types.DEFAULT_LOCAL_CIDR_V4, types.DEFAULT_LOCAL_CIDR_V6)


def parse_cidr(value: object, strict: bool = True) -> str:
    """``value`` as a canonical CIDR; ValueError naming the value and why it is not one.

    The one CIDR reader of the configuration: strict (host bits set is an error, as a CIDR
    with host bits is almost always a typo for another range) unless ``strict`` is False.
    """
    if not isinstance(value, str):
        raise ValueError(f"{value!r} is not a CIDR string")
    try:
        return str(ipaddress.ip_network(value, strict=strict))
    except ValueError as e:
        raise ValueError(f"{value!r} is not a valid CIDR ({e})") from e


@dataclasses.dataclass(frozen=True, slots=True)
class Range:
    """An infrastructure range (underlay, bridge or vx-local overlay) and where it comes from."""

    cidr: str
    #: The key path it was read from (``localCIDRs[0]``) or, for a default, the key (``localCIDRs``).
    path: str
    #: The configuration key that sets it (``localCIDRs``).
    key: str
    #: Not in the configuration: the default of its family.
    default: bool = False

    def describe(self) -> str:
        """How a problem names the range: its path, or that it is a default and what to set."""
        if self.default:
            return f"{self.key} (IPv{types.family_of(self.cidr)} default; set {self.key} to use another range)"
        return self.path


def overlay_ranges(key: str, given: Sequence[str], defaults: Sequence[str], used: Iterable[int]) -> list[Range]:
    """The ranges of one overlay key: those given (always), then the default of every family
    not given that is ``used`` (a default nobody uses can collide with nothing that matters)."""
    out = [Range(c, f"{key}[{i}]", key) for i, c in enumerate(given)]
    used_families = set(used)
    out += [
        Range(c, key, key, default=True)
        for c in types.with_defaults(given, defaults)
        if c not in given and types.family_of(c) in used_families
    ]
    return out


def infra_problems(
    owned: Sequence[tuple[str, str]],
    underlays: Sequence[Range],
    bridges: Sequence[Range],
    locals_: Sequence[Range],
) -> Problems:
    """Overlaps between the clusters' ranges (``owned``: (CIDR, path) of every pod, service and
    global CIDR) and the infrastructure, and among the infrastructure ranges themselves."""
    out: Problems = []
    infra = [*underlays, *bridges, *locals_]
    for c, p in owned:
        for r in infra:
            if types.cidrs_overlap(c, r.cidr):
                out.append((p, f"{c} overlaps {r.cidr} ({r.describe()})"))
    for group in (bridges, locals_):
        for r in group:
            for ul in underlays:
                if types.cidrs_overlap(r.cidr, ul.cidr):
                    out.append((r.path, _infra_clash(r, f"the {ul.key} {ul.cidr}{_default_note(ul)}")))
    for r in locals_:
        for b in bridges:
            if types.cidrs_overlap(r.cidr, b.cidr):
                out.append((r.path, _infra_clash(r, f"{b.cidr} ({b.describe()})")))
    return out


def _default_note(r: Range) -> str:
    return f" (its default; set {r.key} to use another range)" if r.default else ""


def _infra_clash(r: Range, what: str) -> str:
    if r.default:
        return (f"{r.cidr} is the IPv{types.family_of(r.cidr)} default of {r.key} (the configuration does not set it) "
                f"and overlaps {what}: set {r.key} to a range that overlaps nothing")
    return f"{r.cidr} overlaps {what}"


def config_problems(config: types.FabricConfig) -> list[str]:
    """Why ``config`` cannot be planned from at all (empty when it can): duplicate cluster names,
    CIDRs that do not parse, unknown families, malformed expected nodes. Overlaps between
    clusters are the business of whoever wrote the configuration (the topology file and Cluster
    resource readers check them); a node that no longer fits is refused per node."""
    out: list[str] = []
    seen: set[str] = set()

    def cidrs(where: str, values: Iterable[str]) -> None:
        for v in values:
            try:
                parse_cidr(v, strict=False)
            except ValueError as e:
                out.append(f"{where}: {e}")

    for c in config.clusters:
        where = f"cluster {c.name!r}"
        if not c.name or "/" in c.name:
            out.append(f"{where}: a cluster name must be non-empty and without '/'")
        if c.name in seen:
            out.append(f"{where}: declared twice")
        seen.add(c.name)
        cidrs(f"{where} podCIDRs", c.pod_cidrs)
        cidrs(f"{where} serviceCIDRs", c.service_cidrs)
        cidrs(f"{where} globalCIDRs", (x for pair in c.global_cidrs for x in pair))
        if any(f not in types.FAMILY_NAMES for f in c.ip_families):
            out.append(f"{where}: ipFamilies {list(c.ip_families)} may hold only 4 and 6")
    cidrs("bridgeCIDRs", config.bridge_cidrs)
    cidrs("localCIDRs", config.local_cidrs)
    for k in config.expected_nodes:
        try:
            types.NodeKey.parse(k)
        except ValueError as e:
            out.append(f"expected node: {e}")
    return out
