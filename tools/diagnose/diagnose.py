"""``fabric-tool diagnose``: find the first thing that is wrong, and say what it is.

Three questions, each answered from data, never from a hard-coded picture of the topology:

* ``state NODE`` - does the kernel hold what the plan asks for? The agent serves
  ``/debug/state`` on its metrics port: its planned state, the kernel tables it rendered from it
  (*desired*) and a fresh read of the tables it owns (*kernel*). Rows are compared table by
  table by their identity (a route by table and destination, an FDB entry by device and MAC, a
  neighbour by device and address, a link by name); missing, extraneous and different rows are
  listed, everything else is counted.

* ``trace SRC DST`` - where does a packet from a pod to an address stop? The walk follows the
  real forwarding decisions (``ip route get`` in each namespace, through our ip rule and table)
  and checks each fabric hop against the agent's plan, in the order the kernel needs them:
  planned route present -> the next hop's neighbour (overlay IP -> MAC) -> its FDB entry
  (MAC -> remote VTEP) -> the kernel really picks that route -> the tunnel answers (ICMP echo
  to the peer's overlay address, sent through the tunnel: the agents' own probe method) ->
  device MTU fits the underlay. The remote VTEP's underlay address names the next node, and the
  walk continues there until the node that owns the destination. Address translations on the
  way (the lab's service DNAT, and global <-> real mappings when the agent's state lists
  ``translations``) are applied and shown as their own hop. Finally an end-to-end echo from the
  source pod confirms (or refutes) the verdict. The first failing hop is reported with its
  reason and the broken object.

* ``mtu SRC DST`` - how large a packet gets through? ICMP echoes with DF set
  (``IP_PMTUDISC_PROBE``: the kernel neither fragments nor clamps to a cached path MTU) are
  sent from the source pod in a binary search over the payload size. The answer is the largest
  payload that is echoed; every fabric tunnel device on the traced path whose MTU is larger
  than the path carries is named (packets between the two sizes are silently dropped: an MTU
  black hole).

Everything runs from the machine that has the lab's namespaces: probes and HTTP requests run
in a thread that entered the right network namespace (:func:`fabric.netns.run_in`),
so nothing is sent from or to the root namespace. ``state`` also works against any agent whose
metrics port is reachable (``--agent HOST:PORT``).
"""

from __future__ import annotations

import dataclasses
import http.client
import ipaddress
import json
import logging
import socket
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar

from fabric import icmp
from fabric import netns as namespaces
from fabric.control import api
from tools import lab

_log = logging.getLogger(__name__)

T = TypeVar("T")

#: Identity of a row per table: rows with equal identity are the same object (maybe different).
TABLE_KEYS: dict[str, tuple[str, ...]] = {
    "links": ("name",),
    "addresses": ("link", "address"),
    "rules": ("family", "table", "priority"),
    "neighbours": ("link", "ip"),
    "fdb": ("link", "mac"),
    "routes": ("table", "dst"),
}
#: ICMP echo payload = IP MTU - 20 (IPv4 header) - 8 (ICMP header).
ICMP_OVERHEAD = 28
_IP_MTU_DISCOVER = 10
_IP_PMTUDISC_PROBE = 3


class DiagnoseError(lab.LabError):
    """The diagnosis itself could not run (no lab, agent unreachable); exit 1."""


# --------------------------------------------------------------------------------------------
# namespaces and endpoints
# --------------------------------------------------------------------------------------------


def in_netns(netns: str | None, fn: Callable[[], T]) -> T:
    """``fn()`` run in network namespace ``netns`` (None: here), its result returned."""
    return fn() if netns is None else namespaces.run_in(netns, fn)


def http_get(netns: str | None, host: str, port: int, path: str, timeout_s: float = 10.0) -> tuple[int, str]:
    """GET ``http://host:port/path`` from inside ``netns``; ``(status, body)``; OSError if no
    connection could be made."""

    def get() -> tuple[int, str]:
        conn = http.client.HTTPConnection(host, port, timeout=timeout_s)
        try:
            conn.request("GET", path)
            resp = conn.getresponse()
            return resp.status, resp.read().decode(errors="replace")
        finally:
            conn.close()

    return in_netns(netns, get)


def node_endpoint(state: lab.LabState, spec: str) -> tuple[str, str, int]:
    """``(netns, host, port)`` of a lab node's agent endpoints, or of the reflector's for
    ``reflector``."""
    if spec == "reflector":
        return state.ul_netns, state.gateway, api.DEFAULT_REFLECTOR_METRICS_PORT
    node = lab.find_node(state, spec)
    return node.netns, "127.0.0.1", api.DEFAULT_AGENT_METRICS_PORT


def fetch(state: lab.LabState, spec: str, path: str) -> tuple[int, str]:
    netns, host, port = node_endpoint(state, spec)
    try:
        return http_get(netns, host, port, path)
    except OSError as e:
        raise DiagnoseError(f"{spec}: cannot reach http://{host}:{port}{path} in namespace {netns}: {e}") from e


def agent_state(state: lab.LabState | None, spec: str, agent: str | None = None) -> dict[str, Any]:
    """The ``/debug/state`` document of a lab node's agent (or of ``agent`` = ``HOST:PORT``)."""
    if agent is not None:
        host, _, port = agent.rpartition(":")
        if not host or not port.isdigit():
            raise lab.LabUsageError(f"--agent {agent!r}: expected HOST:PORT")
        try:
            code, body = http_get(None, host.strip("[]"), int(port), "/debug/state")
        except OSError as e:
            raise DiagnoseError(f"--agent {agent}: cannot reach http://{agent}/debug/state: {e}") from e
        where = agent
    else:
        assert state is not None
        code, body = fetch(state, spec, "/debug/state")
        where = spec
    if code != 200:
        raise DiagnoseError(f"{where}: /debug/state answered {code}: {body.strip()[:200]}")
    doc = json.loads(body)
    if not isinstance(doc, dict):
        raise DiagnoseError(f"{where}: /debug/state is not a JSON object")
    return doc


# --------------------------------------------------------------------------------------------
# state: desired vs kernel
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass
class TableDiff:
    table: str
    matching: int
    missing: list[dict[str, Any]]
    extra: list[dict[str, Any]]
    different: list[tuple[dict[str, Any], dict[str, Any]]]

    @property
    def ok(self) -> bool:
        return not (self.missing or self.extra or self.different)


def _row_key(table: str, row: Mapping[str, Any]) -> tuple[Any, ...]:
    return tuple(row.get(k) for k in TABLE_KEYS.get(table, tuple(sorted(row))))


def diff_tables(desired: Mapping[str, list[dict[str, Any]]], kernel: Mapping[str, list[dict[str, Any]]]) -> list[
    TableDiff
]:
    """Compare two ``/debug/state`` table maps row by row (see the module docstring)."""
    out = []
    for table in [*TABLE_KEYS, *sorted(set(desired) - set(TABLE_KEYS))]:
        want = {_row_key(table, r): r for r in desired.get(table, [])}
        have = {_row_key(table, r): r for r in kernel.get(table, [])}
        missing = [want[k] for k in sorted(want.keys() - have.keys(), key=str)]
        extra = [have[k] for k in sorted(have.keys() - want.keys(), key=str)]
        different = [(want[k], have[k]) for k in sorted(want.keys() & have.keys(), key=str) if want[k] != have[k]]
        matching = len(want.keys() & have.keys()) - len(different)
        out.append(TableDiff(table, matching, missing, extra, different))
    return out


def _fmt_row(row: Mapping[str, Any]) -> str:
    return " ".join(f"{k}={v}" for k, v in row.items())


def render_state(doc: Mapping[str, Any], diffs: Sequence[TableDiff], color: bool = False) -> str:
    red, green, off = ("\033[31m", "\033[32m", "\033[0m") if color else ("", "", "")
    lines = [
        f"node {doc.get('node')}: planned version {doc.get('planned_version')}, applied {doc.get('applied_version')}, "
        f"gateway role {doc.get('gateway_role')}, underlay {doc.get('underlay', {}).get('ip')}"
    ]
    if doc.get("desired") is None:
        lines.append("no desired state yet: the agent has not received its first snapshot")
    for d in diffs:
        verdict = f"{green}ok{off}" if d.ok else f"{red}DIFFERS{off}"
        lines.append(
            f"  {d.table:<11} {verdict:<{9 + len(green + off)}} {d.matching} matching, {len(d.missing)} missing, "
            f"{len(d.extra)} extra, {len(d.different)} different"
        )
        for r in d.missing:
            lines.append(f"    {red}- missing{off}   {_fmt_row(r)}")
        for r in d.extra:
            lines.append(f"    {red}+ extra{off}     {_fmt_row(r)}")
        for want, have in d.different:
            changed = {k: (want.get(k), have.get(k)) for k in want if want.get(k) != have.get(k)}
            what = ", ".join(f"{k}: want {w} have {h}" for k, (w, h) in changed.items())
            lines.append(f"    {red}~ differs{off}   {_fmt_row({k: want[k] for k in TABLE_KEYS.get(d.table, ())})}: "
                         f"{what}")  # fmt: skip
    for p in doc.get("probes") or []:
        rtt = f"{p['last_rtt_s'] * 1000:.2f} ms" if p.get("last_rtt_s") is not None else "-"
        lines.append(f"  probe {p['name']} ({p['ip']} via {p['device']}): {'up' if p['up'] else 'DOWN'}, "
                     f"rtt {rtt}, loss {p['loss_ratio']:.0%}")  # fmt: skip
    bad = [d.table for d in diffs if not d.ok]
    lines.append(f"{red}differences in {', '.join(bad)}{off}" if bad else f"{green}kernel matches the plan{off}")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# trace
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Hop:
    where: str
    what: str
    ok: bool
    detail: str
    #: The broken object (for a failed hop), e.g. ``route 10.20.1.0/24 table 254``.
    broken: str = ""


@dataclasses.dataclass
class Trace:
    src: str
    dst: str
    hops: list[Hop]
    #: Fabric tunnel devices crossed: (node, device, MTU, underlay MTU).
    tunnels: list[tuple[str, str, int, int]] = dataclasses.field(default_factory=list)
    end_to_end: Hop | None = None

    @property
    def first_failure(self) -> Hop | None:
        return next((h for h in self.hops if not h.ok), None)

    @property
    def ok(self) -> bool:
        return self.first_failure is None and (self.end_to_end is None or self.end_to_end.ok)

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self) | {"ok": self.ok}


@dataclasses.dataclass(frozen=True)
class RouteGet:
    """What ``ip route get DST`` answers in a namespace."""

    oif: str
    gateway: str
    table: int
    error: str = ""


def route_get(netns: str, dst: str) -> RouteGet:
    def get() -> RouteGet:
        from pyroute2 import IPRoute  # imported here: pyroute2 is heavy and only trace needs it

        with IPRoute() as ipr:
            try:
                msg = ipr.route("get", dst=dst)[0]
            except Exception as e:  # NetlinkError: no route (ENETUNREACH) and friends
                return RouteGet("", "", 0, str(e))
            oif = msg.get_attr("RTA_OIF")
            name = ipr.link("get", index=oif)[0].get_attr("IFLA_IFNAME") if oif else ""
            table = msg.get_attr("RTA_TABLE") or msg["table"]
            return RouteGet(str(name), str(msg.get_attr("RTA_GATEWAY") or ""), int(table))

    return in_netns(netns, get)


def link_mtu(netns: str, ifname: str) -> int | None:
    def get() -> int | None:
        from pyroute2 import IPRoute

        with IPRoute() as ipr:
            links = ipr.link_lookup(ifname=ifname)
            return int(ipr.link("get", index=links[0])[0].get_attr("IFLA_MTU")) if links else None

    return in_netns(netns, get)


def echo(netns: str, ip: str, timeout_s: float = 1.0, count: int = 2) -> tuple[bool, str]:
    """ICMP echo from ``netns`` (see tools.diagnose.probe); ``(answered, error)``."""
    from tools.diagnose import probe

    res = in_netns(netns, lambda: probe.probe_icmp([ip], timeout_s, count))[0]
    return res.ok, res.error or ""


@dataclasses.dataclass(frozen=True)
class Translation:
    """A destination rewrite on the way: ``cidr`` becomes ``to`` (same size) at the nodes of
    ``cluster``; ``kind`` names it (``service DNAT``, ``global->real``)."""

    kind: str
    cluster: str
    cidr: str
    to: str

    def apply(self, dst: str) -> str | None:
        net, to = ipaddress.ip_network(self.cidr), ipaddress.ip_network(self.to)
        addr = ipaddress.ip_address(dst)
        if addr.version != net.version or addr not in net:
            return None
        return str(to.network_address + (int(addr) - int(net.network_address)))


def _mapping_not_loaded(doc: Mapping[str, Any], t: Translation) -> str:
    """Why the node cannot perform global->real rewrite ``t`` (empty when its BPF maps hold it).

    A mapping lives in two LPM maps (global -> local on ingress, local -> global on egress); the
    translator dump lists a mapping whenever either holds it, with its counters. A node whose
    state says nothing about its translator (an agent without global IP) is not judged here."""
    if t.kind != "global->real":
        return ""
    loaded = doc.get("translator")
    if not isinstance(loaded, Mapping) or "mappings" not in loaded:
        return f"the plan translates {t.cidr} -> {t.to} but the node's translator is not loaded"
    for m in loaded["mappings"]:
        if m.get("global") == t.cidr and m.get("local") == t.to:
            if m.get("ingress", True):
                return ""
            return (f"translation missing: the node's ingress BPF map has no entry {t.cidr} -> {t.to} "
                    "(only the egress half is loaded)")
    return f"translation missing: {t.cidr} -> {t.to} is planned but not in the node's BPF maps"


def translations_of(state: lab.LabState, docs: Mapping[str, Mapping[str, Any]]) -> list[Translation]:
    """Every destination rewrite the path may meet: the lab's service DNAT (it plays kube-proxy)
    and, when agents list them in ``/debug/state`` (``translations``: rows with ``cluster``,
    ``global`` and ``real`` CIDRs), global -> real mappings."""
    out = [
        Translation("service DNAT", c.name, f"{c.service_ip}/32", f"{c.service_backend}/32")
        for c in state.clusters
        if c.service_ip and c.service_backend
    ]
    for doc in docs.values():
        for t in doc.get("translations") or []:
            if {"cluster", "global", "real"} <= set(t):
                tr = Translation("global->real", str(t["cluster"]), str(t["global"]), str(t["real"]))
                if tr not in out:
                    out.append(tr)
    return out


def _planned_route(doc: Mapping[str, Any], dst: str) -> dict[str, Any] | None:
    """Longest planned route covering ``dst``."""
    addr = ipaddress.ip_address(dst)
    best: tuple[int, dict[str, Any]] | None = None
    for r in (doc.get("planned") or {}).get("routes", []):
        net = ipaddress.ip_network(r["dst"])
        if net.version == addr.version and addr in net and (best is None or net.prefixlen > best[0]):
            best = (net.prefixlen, r)
    return best[1] if best else None


def _find(rows: Sequence[Mapping[str, Any]], **match: Any) -> Mapping[str, Any] | None:
    return next((r for r in rows if all(r.get(k) == v for k, v in match.items())), None)


def resolve_pod(state: lab.LabState, spec: str) -> tuple[lab.NodeRecord, lab.PodRecord]:
    for node in state.nodes():
        for pod in node.pods:
            if spec in (f"{node.key}/{pod.name}", pod.ip):
                return node, pod
    pods = ", ".join(f"{n.key}/{p.name}" for n in state.nodes() for p in n.pods)
    raise lab.LabUsageError(f"source {spec!r} is not a pod (label or IP) of lab {state.name} (pods: {pods})")


def resolve_dst(state: lab.LabState, spec: str) -> str:
    """A pod label or cluster's ``CLUSTER/svc`` -> its IP; an IP address as it is."""
    for node in state.nodes():
        for pod in node.pods:
            if spec == f"{node.key}/{pod.name}":
                return pod.ip
    for c in state.clusters:
        if spec == f"{c.name}/svc" and c.service_ip:
            return c.service_ip
    try:
        return str(ipaddress.ip_address(spec))
    except ValueError:
        raise lab.LabUsageError(
            f"destination {spec!r} is neither an IP address, a pod (cluster/node/pN) nor a service (cluster/svc)"
        ) from None


class _Tracer:
    def __init__(self, state: lab.LabState, probe_timeout_s: float) -> None:
        self.state = state
        self.timeout = probe_timeout_s
        self.docs: dict[str, dict[str, Any]] = {}
        self.by_underlay = {n.underlay_ip: n for n in state.nodes()}

    def doc(self, node: lab.NodeRecord) -> dict[str, Any]:
        if node.key not in self.docs:
            self.docs[node.key] = agent_state(self.state, node.key)
        return self.docs[node.key]

    def run(self, src_spec: str, dst_spec: str, end_to_end: bool = True) -> Trace:
        node, pod = resolve_pod(self.state, src_spec)
        dst = resolve_dst(self.state, dst_spec)
        trace = Trace(f"{node.key}/{pod.name} ({pod.ip})", dst, [])
        hops = trace.hops
        where = f"pod {node.key}/{pod.name}"
        rg = route_get(pod.netns, dst)
        if rg.error or rg.oif != "eth0":
            hops.append(Hop(where, "route to the node", False, f"no route to {dst} out of eth0 in the pod "
                            f"({rg.error or rg.oif})", f"route {dst} in pod {pod.netns}"))  # fmt: skip
            return trace
        hops.append(Hop(where, "route to the node", True, f"{dst} via eth0 to node {node.key}"))
        cur = dst
        visited: set[str] = set()
        while True:
            if node.key in visited:
                hops.append(Hop(f"node {node.key}", "forwarding", False, f"{cur} comes back to {node.key}: a loop",
                                f"routes to {cur}"))  # fmt: skip
                break
            visited.add(node.key)
            done, nxt, cur = self._node_hop(trace, node, cur)
            if done or nxt is None:
                break
            node = nxt
        if end_to_end:
            ok, err = echo(pod.netns, dst, self.timeout, 2)
            trace.end_to_end = Hop(f"pod {src_spec}", "end-to-end echo", ok,
                                   f"{dst} answers" if ok else f"{dst}: {err}")  # fmt: skip
            reached = next((f"{n.key}/{p.name}" for n in self.state.nodes() for p in n.pods if p.ip == cur), None)
            if not ok and trace.first_failure is None and reached is not None:
                # The way there is fine: walk the way back (replies leave from the pod reached).
                back = self.run(reached, pod.ip, end_to_end=False)
                trace.hops += [dataclasses.replace(h, where="return: " + h.where) for h in back.hops]
                trace.tunnels += back.tunnels
        return trace

    def _translate(self, trace: Trace, node: lab.NodeRecord, dst: str) -> str:
        for t in translations_of(self.state, self.docs):
            if t.cluster != node.cluster:
                continue
            real = t.apply(dst)
            if real is None:
                continue
            missing = _mapping_not_loaded(self.docs.get(node.key) or {}, t)
            if missing:
                trace.hops.append(Hop(f"node {node.key}", "translation", False, missing,
                                      f"translation map entry {t.cidr} -> {t.to} on {node.key}"))  # fmt: skip
                return dst
            trace.hops.append(Hop(f"node {node.key}", t.kind, True, f"{dst} -> {real}"))
            return real
        return dst

    def _node_hop(self, trace: Trace, node: lab.NodeRecord, dst: str) -> tuple[bool, lab.NodeRecord | None, str]:
        """Check one node's forwarding of ``dst``; ``(arrived, next node, dst after translation)``."""
        hops = trace.hops
        where = f"node {node.key}"
        self.doc(node)  # its /debug/state lists the translations this node performs
        dst = self._translate(trace, node, dst)
        if hops and not hops[-1].ok:  # a translation this node should perform is missing
            return False, None, dst
        local = next((p for p in node.pods if p.ip == dst), None)
        if local is not None:
            rg = route_get(node.netns, dst)
            ok = rg.oif == local.host_if
            hops.append(Hop(where, "deliver to the pod", ok,
                            f"{dst} via {rg.oif} to pod {node.key}/{local.name}" if ok else
                            f"{dst} goes out of {rg.oif or rg.error} instead of {local.host_if}",
                            "" if ok else f"route {dst}/32 dev {local.host_if}"))  # fmt: skip
            return True, None, dst
        doc = self.doc(node)
        planned = _planned_route(doc, dst)
        rg = route_get(node.netns, dst)
        if planned is None:
            # Not the fabric's business here: the cluster's own routes (the lab's host-gw CNI).
            nxt = self.by_underlay.get(rg.gateway)
            if rg.error or nxt is None:
                hops.append(Hop(where, "route", False, f"no route to {dst}: neither planned by the fabric nor "
                                f"known to the cluster network ({rg.error or f'via {rg.gateway or rg.oif}'})",
                                f"route {dst} on {node.key}"))  # fmt: skip
                return False, None, dst
            hops.append(Hop(where, "cluster route", True, f"{dst} via {rg.gateway} dev {rg.oif} to node {nxt.key}"))
            return False, nxt, dst
        return self._tunnel_hop(trace, node, doc, planned, rg, dst)

    def _tunnel_hop(
        self, trace: Trace, node: lab.NodeRecord, doc: Mapping[str, Any], planned: Mapping[str, Any], rg: RouteGet,
        dst: str,
    ) -> tuple[bool, lab.NodeRecord | None, str]:
        hops, where = trace.hops, f"node {node.key}"
        kernel = doc.get("kernel") or {}
        table, device, via = int(doc.get("table", 0)), str(planned["device"]), str(planned["via"])
        route_name = f"route {planned['dst']} via {via} dev {device} table {table}"

        def fail(what: str, detail: str, broken: str) -> tuple[bool, None, str]:
            hops.append(Hop(where, what, False, detail, broken))
            return False, None, dst

        route = _find(kernel.get("routes", []), table=table, dst=planned["dst"])
        if route is None or (route.get("link"), route.get("gateway")) != (device, via):
            found = f" (kernel has it via {route.get('gateway')} dev {route.get('link')})" if route else ""
            return fail("route", f"missing route: the plan routes {planned['dst']} via {via} dev {device}{found}",
                        route_name)
        peer = _find((doc.get("planned") or {}).get("peers", []), device=device, overlay_ip=via) or {}
        peer_name = peer.get("node") or via
        neigh = _find(kernel.get("neighbours", []), link=device, ip=via)
        if neigh is None or neigh.get("mac") != peer.get("mac"):
            wrong = f" (the kernel has {neigh.get('mac')})" if neigh else ""
            return fail("neighbour", f"missing neighbour {via} -> {peer.get('mac')} on {device} (peer {peer_name})"
                        f"{wrong}", f"neighbour {via} lladdr {peer.get('mac')} dev {device}")
        fdb = _find(kernel.get("fdb", []), link=device, mac=neigh["mac"])
        if fdb is None or fdb.get("dst") != peer.get("underlay_ip"):
            wrong = f" (the kernel sends it to {fdb.get('dst')})" if fdb else ""
            return fail("FDB", f"missing FDB entry {neigh['mac']} dst {peer.get('underlay_ip')} on {device} "
                        f"(peer {peer_name}){wrong}", f"fdb {neigh['mac']} dev {device} dst {peer.get('underlay_ip')}")
        if (rg.oif, rg.gateway) != (device, via):
            return fail("route lookup", f"the kernel sends {dst} {('via ' + rg.gateway + ' ') if rg.gateway else ''}"
                        f"dev {rg.oif or rg.error} instead of via {via} dev {device}: is the ip rule to table "
                        f"{table} there?", f"rule lookup {table}")
        hops.append(Hop(where, "route, neighbour, FDB", True,
                        f"{dst} via {via} dev {device} -> {neigh['mac']} -> VTEP {fdb['dst']} ({peer_name})"))
        link = _find(kernel.get("links", []), name=device) or {}
        underlay_mtu = int((doc.get("underlay") or {}).get("mtu") or 0)
        overhead = 70 if ipaddress.ip_address(str(fdb["dst"])).version == 6 else 50
        if link and underlay_mtu and int(link.get("mtu", 0)) + overhead > underlay_mtu:
            return fail("MTU", f"{device} MTU {link.get('mtu')} + {overhead} bytes of vxlan exceeds the underlay MTU "
                        f"{underlay_mtu}", f"link {device} mtu {link.get('mtu')}")
        trace.tunnels.append((node.key, device, int(link.get("mtu", 0)), underlay_mtu))
        ok, err = echo(node.netns, via, self.timeout, 2)
        if not ok:
            return fail("tunnel", f"tunnel down: {peer_name} ({via}, VTEP {fdb['dst']}) does not answer through "
                        f"{device}: {err}", f"tunnel {device} to {fdb['dst']}")
        nxt = self.by_underlay.get(str(fdb["dst"]))
        hops.append(Hop(f"tunnel {device}", "tunnel", True, f"{node.key} -> {peer_name} answers through {device}"))
        if nxt is None:
            return fail("next node", f"VTEP {fdb['dst']} is not a node of lab {self.state.name}",
                        f"fdb dst {fdb['dst']}")
        return False, nxt, dst


def trace(state: lab.LabState, src: str, dst: str, *, timeout_s: float = 1.0, end_to_end: bool = True) -> Trace:
    return _Tracer(state, timeout_s).run(src, dst, end_to_end)


def render_trace(t: Trace, color: bool = False) -> str:
    red, green, off = ("\033[31m", "\033[32m", "\033[0m") if color else ("", "", "")
    lines = [f"trace {t.src} -> {t.dst}"]
    hops = [*t.hops, *([t.end_to_end] if t.end_to_end else [])]
    for i, h in enumerate(hops, 1):
        mark = f"{green}ok  {off}" if h.ok else f"{red}FAIL{off}"
        lines.append(f"{i:>2}. {mark} {h.where:<22} {h.what:<22} {h.detail}")
    first = t.first_failure
    if first is not None:
        lines.append(f"{red}first failing hop: {first.where} ({first.what}): {first.detail}{off}")
        if first.broken:
            lines.append(f"{red}broken object: {first.broken}{off}")
    elif t.end_to_end is not None and not t.end_to_end.ok:
        lines.append(f"{red}every hop checks out, but the end-to-end echo fails: the return path?{off}")
    else:
        lines.append(f"{green}every hop green{off}")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# mtu
# --------------------------------------------------------------------------------------------


def _echo_sized(dst: str, size: int, timeout_s: float, tries: int) -> tuple[bool, str]:
    """One DF echo of ``size`` payload bytes (in the caller's namespace); ``(answered, why not)``."""
    ident = (int(time.monotonic() * 1000) ^ size) & 0xFFFF
    with socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP) as sock:
        sock.setsockopt(socket.IPPROTO_IP, _IP_MTU_DISCOVER, _IP_PMTUDISC_PROBE)
        why = "no reply"
        for seq in range(tries):
            pkt = icmp.echo_request(ident, seq, b"\x5a" * size)
            try:
                sock.sendto(pkt, (dst, 0))
            except OSError as e:
                return False, f"send: {e.strerror or e}"
            deadline = time.monotonic() + timeout_s
            while (left := deadline - time.monotonic()) > 0:
                sock.settimeout(left)
                try:
                    data = sock.recv(65535)
                except TimeoutError:
                    break
                msg = icmp.parse4(data)
                if msg is None:
                    continue
                if msg.type == icmp.ECHO_REPLY and msg.ident == ident:
                    return True, ""
                if msg.type == icmp.DEST_UNREACHABLE and msg.code == icmp.FRAG_NEEDED:
                    # bytes 6-7 of a "fragmentation needed" header: the next hop's MTU
                    why = f"fragmentation needed (next-hop MTU {msg.seq}) from {msg.src}"
        return False, why


@dataclasses.dataclass
class MtuResult:
    src: str
    dst: str
    largest_payload: int | None
    path_mtu: int | None
    first_failure: str
    warnings: list[str]

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def mtu(state: lab.LabState, src: str, dst_spec: str, *, timeout_s: float = 0.5, tries: int = 2) -> MtuResult:
    node, pod = resolve_pod(state, src)
    dst = resolve_dst(state, dst_spec)
    path = trace(state, src, dst_spec, timeout_s=1.0, end_to_end=False)
    hi = (link_mtu(pod.netns, "eth0") or 1500) - ICMP_OVERHEAD
    lo = 0
    if not in_netns(pod.netns, lambda: _echo_sized(dst, lo, timeout_s, tries))[0]:
        return MtuResult(src, dst, None, None, "even an empty echo gets no answer (see 'diagnose trace')", [])
    why_hi = ""
    ok_hi, why_hi = in_netns(pod.netns, lambda: _echo_sized(dst, hi, timeout_s, tries))
    if ok_hi:
        lo = hi
    else:
        fail = hi
        while fail - lo > 1:
            mid = (lo + fail) // 2
            ok, why = in_netns(pod.netns, lambda m=mid: _echo_sized(dst, m, timeout_s, tries))  # type: ignore[misc]
            if ok:
                lo = mid
            else:
                fail, why_hi = mid, why
    path_mtu = lo + ICMP_OVERHEAD
    warnings = []
    for where, device, dev_mtu, _ul in path.tunnels:
        if dev_mtu > path_mtu:
            warnings.append(f"{device} on {where} has MTU {dev_mtu} but the path carries only {path_mtu}: packets "
                            f"of {path_mtu + 1}-{dev_mtu} bytes are silently dropped (MTU black hole)")  # fmt: skip
    return MtuResult(f"{node.key}/{pod.name}", dst, lo, path_mtu, "" if ok_hi else f"{lo + 1} bytes: {why_hi}",
                     warnings)  # fmt: skip


def render_mtu(r: MtuResult) -> str:
    if r.largest_payload is None:
        return f"mtu {r.src} -> {r.dst}: {r.first_failure}"
    lines = [f"mtu {r.src} -> {r.dst}: largest ICMP payload that passes with DF: {r.largest_payload} bytes "
             f"(path MTU {r.path_mtu})"]  # fmt: skip
    if r.first_failure:
        lines.append(f"  above it: {r.first_failure}")
    lines += [f"  WARNING: {w}" for w in r.warnings]
    return "\n".join(lines)
