"""One schema and one set of semantic checks for the fabric configuration and its three readers.

The same configuration reaches the fabric three ways: the topology file
(:mod:`fabric.topology`), Cluster resources (:mod:`fabric.crd`) and, whatever its source, the
:class:`~fabric.types.FabricConfig` the reflector is handed (``admission.config_problems``). Each
used to carry its own validator, and they drifted (the topology file checked the vx-local
default even where no gateway-mode cluster would ever use it). Now:

* structure (keys, types, enums, CIDR syntax, sizes) is one schema, the Cluster CRD's
  ``openAPIV3Schema`` (:mod:`fabric.crd_schema`, generated from the CRD), checked with
  ``jsonschema``; the topology file's schema is built from its per-cluster pieces
  (:func:`topology_schema`), so a value means and fails the same in both;
* the semantic checks (CIDRs that parse, overlaps with the infrastructure ranges, what a
  configuration needs to be planned at all) live here once.

Everything returns ``(path, reason)`` pairs so that every caller keeps naming the key path and
its source.

Rule for defaults: a range the configuration does not set (a family missing from
``bridgeCIDRs``/``localCIDRs``) is checked only where it is used (the bridge range of a family
some cluster runs, the vx-local range of a family some gateway-mode cluster runs), and a
collision with a default says that it is a default and which key to set. Ranges the file does
set are always checked: the user wrote them, an overlap is a mistake even before it bites.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import ipaddress
import re
from collections.abc import Iterable, Sequence
from typing import Any

from fabric import types
from fabric.crd_schema import OPENAPI_V3_SCHEMA

#: Problems as ``(key path, reason)``; the caller prefixes its source.
Problems = list[tuple[str, str]]

BRIDGE_DEFAULTS = (types.DEFAULT_BRIDGE_CIDR_V4, types.DEFAULT_BRIDGE_CIDR_V6)
LOCAL_DEFAULTS = (types.DEFAULT_LOCAL_CIDR_V4, types.DEFAULT_LOCAL_CIDR_V6)


# --------------------------------------------------------------------------------------------
# Structure: one schema, the CRD's openAPIV3Schema (fabric/crd_schema.py, generated from the CRD)
# --------------------------------------------------------------------------------------------

#: Lab pods per node (the topology file's ``pods``).
MAX_PODS_PER_NODE = 64
#: Names of the topology file become parts of namespace and interface names in the lab: short.
MAX_LAB_NAME = 20
#: The schedulers a ``kubernetes: true`` lab cluster can run (the topology's ``scheduler``);
#: which of them are built is the lab's business (tools.lab.schedulers).
LAB_SCHEDULERS = ("none", "kosmos")
DNS1123_LABEL = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"

#: What an enum's value is, by the key holding it, for "'mesh' is not a mode (p2p, gateway)".
_NOUNS = {"networkType": "a network type", "mode": "a mode", "ipFamilies": "an address family",
          "namespace": "a namespace name (DNS-1123 label)"}
_TYPES = {"boolean": "true or false", "array": "a list", "object": "a mapping", "string": "a string",
          "integer": "an integer", "number": "a number"}
_REQUIRED = re.compile(r"^'(.*)' is a required property$")


def cluster_schema() -> dict[str, Any]:
    """The Cluster resource's schema (a copy): what the API server checks per object."""
    return copy.deepcopy(OPENAPI_V3_SCHEMA)


def _link_piece(key: str) -> dict[str, Any]:
    """A copy of the schema of ``spec.clusterLinkOptions.<key>`` (shared with the topology file)."""
    piece = OPENAPI_V3_SCHEMA["properties"]["spec"]["properties"]["clusterLinkOptions"]["properties"][key]
    return {k: copy.deepcopy(v) for k, v in piece.items() if k not in ("default", "description")}


#: A non-negative Kubernetes quantity (``500m``, ``4``, ``8Gi``, ``1.5G``, ``2e3``): a lab node's capacity.
QUANTITY = r"^[+]?([0-9]+(\.[0-9]*)?|\.[0-9]+)(Ki|Mi|Gi|Ti|Pi|Ei|[numkMGTPE]|[eE][+-]?[0-9]+)?$"

#: The CIDR string schema (pattern and size) every CIDR of the configuration follows.
CIDR_SCHEMA = _link_piece("podCIDRs")["items"]


def topology_schema() -> dict[str, Any]:
    """The topology file's schema: per cluster, the Cluster resource's pieces under the file's
    names (``mode`` is ``networkType``, ``gateways`` is ``gatewayCandidates``, ``globalCIDRs`` is
    ``globalCIDRsMap``), plus what only the file has (the lab's nodes, underlays)."""
    cidr = copy.deepcopy(CIDR_SCHEMA)
    ip = {"type": "string"}
    label = {"type": "string", "pattern": DNS1123_LABEL, "maxLength": MAX_LAB_NAME,
             "x-what": "a DNS-1123 label (lower-case letters, digits, '-')"}
    pod_cidr = {"anyOf": [cidr, {"type": "array", "minItems": 1, "maxItems": 2, "items": cidr}],
                "x-what": "a CIDR or a list of one per family"}
    node = {"type": "object", "additionalProperties": False, "required": ["name"], "properties": {
        "name": label, "podCIDR": pod_cidr, "pods": {"type": "integer", "minimum": 0, "maximum": MAX_PODS_PER_NODE,
                                                    "x-what": f"an integer from 0 to {MAX_PODS_PER_NODE}"},
        "underlay": ip, "underlay6": ip,
        "resources": {"type": "object", "additionalProperties": {
            "type": ["string", "integer"], "pattern": QUANTITY, "minimum": 0,
            "x-what": "a non-negative Kubernetes quantity (e.g. \"4\", 500m, 8Gi, 110)"},
            "x-what": "a mapping of resource name to quantity (cpu: \"4\", memory: 8Gi, pods: 110, "
                      "ephemeral-storage: 50Gi, example.com/gpu: 2)"}}}
    gateways = _link_piece("gatewayCandidates")
    gateways.update(items=label, minItems=1)
    gateways["x-what"] = "a non-empty list of node names (omit it to allow every node)"
    global_map = _link_piece("globalCIDRsMap")
    global_map.pop("x-kubernetes-validations", None)  # CEL; the same rule is a semantic check here
    global_map.update(minProperties=1, **{"x-what": "a non-empty mapping of local CIDR to global CIDR"})
    families = _link_piece("ipFamilies")
    families["x-what"] = "a list of one or two address families (IPv4, IPv6)"
    cluster = {"type": "object", "additionalProperties": False, "required": ["name", "podCIDRs"], "properties": {
        "name": label,
        "mode": _link_piece("networkType"),
        "ipFamilies": families,
        "podCIDRs": {**_link_piece("podCIDRs"), "minItems": 1, "x-what": "a non-empty list of CIDRs"},
        "serviceCIDRs": {**_link_piece("serviceCIDRs"), "x-what": "a list of CIDRs"},
        "nodeCIDRs": {**_link_piece("nodeCIDRs"), "x-what": "a list of CIDRs"},
        "gateways": gateways,
        "activeGateways": {**_link_piece("activeGateways"),
                           "x-what": f"an integer from 1 to {types.MAX_ACTIVE_GATEWAYS}"},
        "globalCIDRs": global_map,
        "nodes": {"type": "array", "items": node, "x-what": "a list of nodes"},
        "scheduler": {"enum": list(LAB_SCHEDULERS), "x-what": "one of " + ", ".join(LAB_SCHEDULERS)},
        # ClusterTree in the lab (tools.lab.planning checks the values): the root and its leaves.
        "role": {"type": "string", "x-what": "a string (host)"},
        "tree": {"type": "string", "x-what": "a string (cluster, node or party=<label selector>)"},
    }}
    return {"type": "object", "additionalProperties": False, "required": ["clusters"], "properties": {
        "underlay": cidr, "underlay6": cidr,
        "bridgeCIDRs": {"type": "array", "minItems": 1, "items": cidr, "x-what": "a non-empty list of CIDRs"},
        "localCIDRs": {"type": "array", "minItems": 1, "items": cidr, "x-what": "a non-empty list of CIDRs"},
        "kubernetes": {"type": "boolean"},
        "clusters": {"type": "array", "minItems": 1, "items": cluster, "x-what": "a non-empty list of clusters"},
    }}


@functools.cache
def _validator(which: str) -> Any:
    # Imported on first use: the agent imports this module (through the planner) but never
    # validates a file or a resource.
    import jsonschema  # type: ignore[import-untyped]

    schema = topology_schema() if which == "topology" else cluster_schema()
    return jsonschema.Draft7Validator(schema)


def schema_problems(which: str, doc: Any, unknown: str = "unknown key") -> Problems:
    """Where ``doc`` breaks the ``which`` schema ("topology" or "cluster"), as (path, reason)
    in the configuration's own words; one problem per path (the first, in document order)."""
    out: dict[str, str] = {}
    for e in sorted(_validator(which).iter_errors(doc), key=lambda e: [str(p) for p in e.absolute_path]):
        for path, reason in _explain(e, unknown):
            out.setdefault(path, reason)
    return list(out.items())


def join(path: str, key: object) -> str:
    """A key path as the configuration's messages write it: ``clusters[0].globalCIDRs[10.0.0.0/8]``.
    YAML mapping keys need not be strings (``null:``, ``1.5:``): such a key is written as Python
    prints it (a path is always text; found by tests/unit/test_fuzz_config.py)."""
    if isinstance(key, int):
        return f"{path}[{key}]"
    if not isinstance(key, str):
        key = str(key)
    if not path:
        return key
    return f"{path}[{key}]" if ("." in key or "/" in key or ":" in key) else f"{path}.{key}"


def _explain(e: Any, unknown: str) -> Problems:
    path = ""
    for p in e.absolute_path:
        path = join(path, p)
    v, kind, node = e.instance, e.validator, e.schema
    what = node.get("x-what")
    if kind == "required":
        m = _REQUIRED.match(e.message)
        key = m.group(1) if m else "?"
        sub = (node.get("properties") or {}).get(key, {})
        need = sub.get("x-what") or _TYPES.get(sub.get("type", ""), "")
        return [(join(path, key), f"is required ({need})" if need else "is required")]
    if kind == "additionalProperties":
        allowed = ", ".join(sorted(node.get("properties") or {}))
        extra = [k for k in v if k not in (node.get("properties") or {})]
        return [(join(path, k), f"{unknown} (allowed: {allowed})") for k in extra]
    if node.get("pattern") == CIDR_SCHEMA["pattern"] or (kind == "anyOf" and isinstance(v, str)):
        try:
            parse_cidr(v)
        except ValueError as err:
            return [(path, str(err))]
    if kind == "enum":
        keys = [p for p in e.absolute_path if isinstance(p, str)]
        noun = _NOUNS.get(keys[-1] if keys else "", "a valid value")
        return [(path, f"{v!r} is not {noun} ({', '.join(str(x) for x in e.validator_value)})")]
    if kind == "maxLength":
        return [(path, f"{v!r} is longer than {e.validator_value} characters")]
    if kind in ("maxItems", "maxProperties"):
        return [(path, f"has {len(v)} entries: at most {e.validator_value} are allowed")]
    if what:  # a value of the wrong shape "must be" one; a string that does not match "is not" one
        return [(path, f"{v!r} is not {what}" if kind == "pattern" else f"{v!r} must be {what}")]
    if kind == "type":
        want = e.validator_value if isinstance(e.validator_value, str) else e.validator_value[0]
        return [(path, f"{v!r} must be {_TYPES.get(want, want)}")]
    if kind == "pattern":
        keys = [p for p in e.absolute_path if isinstance(p, str)]
        pattern_noun = _NOUNS.get(keys[-1] if keys else "")
        if pattern_noun:
            return [(path, f"{v!r} is not {pattern_noun}")]
        return [(path, f"{v!r} does not match {e.validator_value}")]
    return [(path, f"{v!r}: {e.message}")]


def suppressed(path: str, reported: Iterable[str]) -> bool:
    """Is ``path`` (or a key above it) already reported? A semantic check then stays silent:
    one problem per value, the schema's."""
    return any(path == r or path.startswith(r + ".") or path.startswith(r + "[") for r in reported)


# --------------------------------------------------------------------------------------------
# Semantics
# --------------------------------------------------------------------------------------------


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


def mapping_problem(local: str, glob: str) -> str | None:
    """What is wrong with mapping ``local`` to ``glob`` (both canonical CIDRs) for a stateless 1:1
    translation, or None: the one rule of the topology file's ``globalCIDRs`` and the Cluster
    resource's ``globalCIDRsMap``."""
    ln, gn = ipaddress.ip_network(local), ipaddress.ip_network(glob)
    if ln.version != gn.version:
        return f"{glob} and {local} are of different address families: translation is within a family"
    if ln.prefixlen != gn.prefixlen:
        return f"{glob} is a /{gn.prefixlen} but {local} is a /{ln.prefixlen}: a 1:1 translation needs the same size"
    return None


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
                out.append(f"{where}: {v!r} is not a CIDR ({e.__cause__ or e})")

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
        cidrs(f"{where} nodeCIDRs", c.node_cidrs)
        if any(f not in types.FAMILY_NAMES for f in c.ip_families):
            out.append(f"{where}: ipFamilies {list(c.ip_families)} may hold only 4 and 6")
    cidrs("bridgeCIDRs", config.bridge_cidrs)
    cidrs("localCIDRs", config.local_cidrs)
    if not out:
        owned = [(f"cluster {c.name!r}", n) for c in config.clusters if c.mode is types.ClusterMode.GATEWAY
                 for n in c.node_cidrs]
        out += [why for _c, _o, why in node_cidr_clashes(owned, config.local_cidrs)]
    for k in config.expected_nodes:
        try:
            types.NodeKey.parse(k)
        except ValueError as e:
            out.append(f"expected node: {e}")
    return out


def node_cidr_clashes(owned: Iterable[tuple[str, str]], local_cidrs: Iterable[str]) -> list[tuple[str, str, str]]:
    """Node subnets of gateway-mode clusters (``owned``: ``(owner, CIDR)`` in order, the owner
    as the message should name it, e.g. ``cluster 'a'``) whose images in the local CIDR
    (:func:`fabric.types.local_image`) overlap another owner's: other clusters route each image
    via its own cluster's gateway, so an address in two images would go to whichever route the
    kernel prefers (``fabric.control.planner.local_hosts``). The local CIDR keeps only an
    underlay address's host bits, so two different subnets clash when those bits do. Returns
    ``(owner, other owner, why)``, the later owner first. Assumes every CIDR parses."""
    locals_ = types.first_per_family(types.with_defaults(tuple(local_cidrs), LOCAL_DEFAULTS))
    seen: list[tuple[str, str, str]] = []  # (image, owner, node CIDR)
    out: list[tuple[str, str, str]] = []
    for owner, n in owned:
        local = locals_[types.family_of(n)]
        image = types.local_image(n, local)
        for other_image, other, other_n in seen:
            if other != owner and types.cidrs_overlap(image, other_image):
                out.append((owner, other,
                            f"nodeCIDRs {n} of {owner} and {other_n} of {other} map to overlapping vx-local ranges "
                            f"{image} and {other_image} (localCIDRs {local} keeps an underlay address's host bits "
                            "only), so their nodes' vx-local addresses could collide: give the clusters node "
                            "subnets that differ in those bits, or a wider local CIDR"))
        seen.append((image, owner, n))
    return out
