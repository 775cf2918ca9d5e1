"""``lab status``: the lab's state joined with the reflector's view, as a document
(``--json``) and as text.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

from fabric.control import api
from tools.lab.procs import query_status
from tools.lab.state import DEFAULT_NAME, LabError, LabState, require_state

_log = logging.getLogger(__name__)

# -- status ----------------------------------------------------------------------------------


def status_doc(state: LabState, status: api.FabricStatus | None, error: str | None) -> dict[str, Any]:
    """The ``lab status --json`` document: lab facts from the state file, live facts from the
    reflector (in_sync is false for every node when the reflector cannot be asked)."""
    by_key = {n.key: n for n in status.nodes()} if status is not None else {}
    refl = state.reflector
    doc: dict[str, Any] = {
        "name": state.name,
        "topology": state.topology_source,
        "reflector": {
            "netns": state.ul_netns,
            "address": state.reflector_address,
            "pid": refl.pid if refl and refl.running() else None,
            "socket": str(state.reflector_socket),
            "log": refl.log if refl else None,
            "reachable": status is not None,
            "epoch": status.epoch if status else None,
            "generation": status.generation if status else None,
            "holding": status.holding if status else None,
            # Restarts of a crashed reflector by the lab's supervisor (tools.lab.supervisor).
            "restarts": state.restarts.get("reflector", 0),
        },
        "clusters": [],
    }
    if state.relay_procs:
        # ``lab up --relays K``: the relays beside the reflector; each node's "session_via" names its relay.
        doc["relays"] = [
            {"index": i, "address": state.relay_address(i), "pid": r.pid if r and r.running() else None,
             "log": r.log if r else None, "restarts": state.restarts.get(f"relay/{i}", 0)}
            for i, r in enumerate(state.relay_procs)
        ]  # fmt: skip
    if error is not None:
        doc["note"] = f"reflector unreachable: {error}; in_sync is false for every node"
    if status is not None and status.rejections:
        doc["rejections"] = [{"source": r.source, "reason": r.reason} for r in status.rejections]
    live = {c.name: c for c in status.clusters} if status is not None else {}
    session_via = state.session_targets()
    for c in state.clusters:
        lc = live.get(c.name)
        nodes = []
        for n in c.nodes:
            ns = by_key.get(n.key)
            nodes.append(
                {
                    "name": n.name,
                    "netns": n.netns,
                    "underlay": n.underlay_ip,
                    "pod_cidr": n.pod_cidr,
                    "agent_pid": n.agent.pid if n.agent and n.agent.running() else None,
                    "agent_log": n.agent.log if n.agent else None,
                    # Restarts of a crashed agent by the lab's supervisor (tools.lab.supervisor).
                    "agent_restarts": state.restarts.get(f"agent/{n.key}", 0),
                    # Where the agent holds its session: the reflector, or its relay (--relays).
                    "session_via": session_via[n.key],
                    "in_sync": bool(ns and ns.in_sync),
                    "connected": bool(ns and ns.connected),
                    "planned_version": ns.planned_version if ns else None,
                    "applied_version": ns.applied_version if ns else None,
                    "counters": dataclasses.asdict(ns.counters) if ns else None,
                    "role": lc.role_of(n.name) if lc else "",
                    "failed": n.failed,
                    "unreachable_reports": ns.unreachable_reports if ns else None,
                    "pods": [
                        {"name": p.name, "netns": p.netns, "ip": p.ip, "global_ip": c.global_ip(p.ip or None),
                         "ip6": p.ip6, "global_ip6": c.global_ip(p.ip6 or None)}
                        for p in n.pods
                    ],
                }
            )
        doc["clusters"].append(
            {
                "name": c.name,
                "mode": c.mode,
                "gateways": c.gateways,
                "active_gateway": (lc.active_gateway or None) if lc else None,
                "standby_gateway": (lc.standby_gateway or None) if lc else None,
                "also_active_gateways": list(lc.also_active_gateways) if lc else [],
                "gateway_moves": lc.gateway_moves if lc else None,
                "service": {"ip": c.service_ip, "global_ip": c.global_ip(c.service_ip), "backend": c.service_backend}
                if c.service_ip else None,
                "global_cidrs": c.global_cidrs,
                "kubernetes": {
                    "url": c.api_url,
                    "apiserver_pid": c.apiserver.pid if c.apiserver and c.apiserver.running() else None,
                    "apiserver_log": c.apiserver.log if c.apiserver else None,
                    "kubelet_pid": c.kubelet.pid if c.kubelet and c.kubelet.running() else None,
                    "kubelet_log": c.kubelet.log if c.kubelet else None,
                    "controller_manager_pid": c.controller_manager.pid
                    if c.controller_manager and c.controller_manager.running() else None,
                    "controller_manager_log": c.controller_manager.log if c.controller_manager else None,
                    "proxy_pid": c.proxy.pid if c.proxy and c.proxy.running() else None,
                    "proxy_log": c.proxy.log if c.proxy else None,
                    "dns_pid": c.dns_proc.pid if c.dns_proc and c.dns_proc.running() else None,
                    "dns_log": c.dns_proc.log if c.dns_proc else None,
                    "dns_ip": c.dns_ip,
                    "scheduler": c.scheduler,
                    "scheduler_pid": c.scheduler_proc.pid if c.scheduler_proc and c.scheduler_proc.running() else None,
                    "scheduler_log": c.scheduler_proc.log if c.scheduler_proc else None,
                    "service": {"name": c.service_name, "ips": [ip for ip in (c.service_ip, c.service_ip6) if ip],
                                "port": c.service_port} if c.service_name else None,
                }
                if state.kubernetes else None,
                "nodes": nodes,
            }
        )
    doc["kubeconfig"] = str(state.kubeconfig) if state.kubernetes else None
    host = state.host_cluster
    if host is not None:
        tp, sup = state.tree_proc, state.supervisor
        doc["tree"] = {
            "host": host.name,
            "leaves": {c.name: c.tree for c in state.clusters if c.tree},
            "pid": tp.pid if tp and tp.running() else None,
            "log": tp.log if tp else None,
            "supervisor_pid": sup.pid if sup and sup.running() else None,
            "supervisor_log": sup.log if sup else None,
        }
    mp = state.mcs_proc
    if mp is not None:
        from tools.lab import mcs as labmcs

        doc["mcs"] = {"pid": mp.pid if mp.running() else None, "log": mp.log,
                      "dns": {c.name: labmcs.dns_port(c) for c in state.clusters}}
    sup = state.supervisor
    doc["supervisor"] = {"pid": sup.pid if sup and sup.running() else None, "log": sup.log if sup else None}
    # Restarts the supervisor made, by what: "agent/<cluster>/<node>", "reflector", "tree",
    # "scheduler/<cluster>", "dns/<cluster>", "mcs".
    doc["restarts"] = dict(state.restarts)
    return doc


def render_status(doc: dict[str, Any]) -> str:
    """A readable table of :func:`status_doc`."""
    r = doc["reflector"]
    head = f"lab {doc['name']} ({doc['topology']})\nreflector {r['address']} in {r['netns']}: "
    if r["pid"] is None:
        head += "not running"
    else:
        head += f"pid {r['pid']}"
    if r.get("reachable"):
        head += f", epoch {r['epoch']}, generation {r['generation']}" + (", holding" if r.get("holding") else "")
    lines = [head]
    for r in doc.get("relays", []):
        lines.append(f"relay {r['index']} {r['address']}: " + (f"pid {r['pid']}" if r["pid"] else "not running")
                     + (f", {r['restarts']} restarts" if r["restarts"] else ""))
    if "note" in doc:
        lines.append(f"note: {doc['note']}")
    rows = [("CLUSTER", "MODE", "NODE", "GATEWAY", "UNDERLAY", "AGENT", "SESSION", "VERSION", "IN-SYNC", "PODS")]
    for c in doc["clusters"]:
        for n in c["nodes"]:
            version = "-" if n["planned_version"] is None else f"{n['applied_version']}/{n['planned_version']}"
            rows.append(
                (
                    c["name"],
                    c["mode"],
                    n["name"],
                    n.get("role") or "-",
                    n["underlay"] + (" (FAILED)" if n.get("failed") else ""),
                    str(n["agent_pid"]) if n["agent_pid"] else "stopped",
                    "up" if n["connected"] else "down",
                    version,
                    "yes" if n["in_sync"] else "NO",
                    " ".join(
                        f"{p['name']}={p['ip']}" + (f"({p['global_ip']})" if p.get("global_ip") else "")
                        for p in n["pods"]
                    ) or "-",
                )
            )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    for row in rows:
        lines.append("  ".join(cell.ljust(w) for cell, w in zip(row[:-1], widths, strict=True)) + "  " + row[-1])
    for c in doc["clusters"]:
        if c.get("service"):
            backend = c["service"]["backend"] or "its EndpointSlices (lab kube-proxy)"
            lines.append(f"service of {c['name']}: {c['service']['ip']} -> {backend}")
    for c in doc["clusters"]:
        k = c.get("kubernetes")
        if k:
            pids = (f"apiserver {k['apiserver_pid'] or 'stopped'}, kubelet {k['kubelet_pid'] or 'stopped'}, "
                    f"controller-manager {k.get('controller_manager_pid') or 'stopped'}")
            lines.append(f"kubernetes of {c['name']}: {k['url'] or '-'} ({pids})")
            lines.append(f"kube-proxy of {c['name']}: {k.get('proxy_pid') or 'stopped'}")
            if k.get("dns_ip"):
                lines.append(f"cluster DNS of {c['name']}: {k['dns_ip']} ({k.get('dns_pid') or 'stopped'})")
            if k.get("scheduler", "none") != "none":
                lines.append(f"scheduler of {c['name']}: {k['scheduler']} {k.get('scheduler_pid') or 'stopped'}")
    restarts = doc.get("restarts") or {}
    t = doc.get("tree")
    if t:
        leaves = ", ".join(f"{n} ({m})" for n, m in t["leaves"].items()) or "none"
        lines.append(f"tree: host {t['host']}, leaves {leaves}; kosmos-tree {t['pid'] or 'stopped'} "
                     f"(restarts {restarts.get('tree', 0)}), supervisor {t['supervisor_pid'] or 'stopped'}")
    for key, n in sorted(restarts.items()):
        if key not in ("tree", "mcs"):
            lines.append(f"restarts of {key}: {n}")
    m = doc.get("mcs")
    if m:
        dns = ", ".join(f"{c} 127.0.0.1:{p}" for c, p in m["dns"].items() if p)
        lines.append(f"kosmos-mcs: {m['pid'] or 'stopped'} (restarts {restarts.get('mcs', 0)}); clusterset.local "
                     f"answered for {dns or 'no cluster'}")
    sv = doc.get("supervisor") or {}
    lines.append(f"supervisor: {sv.get('pid') or 'stopped'} (restarts crashed agents, the reflector and add-ons "
                 f"with back-off; {sum(restarts.values())} restarts so far)")
    if doc.get("kubeconfig"):
        lines.append(f"kubeconfig: {doc['kubeconfig']}")
    for rej in doc.get("rejections", []):
        lines.append(f"rejected {rej['source']}: {rej['reason']}")
    return "\n".join(lines)


def status(name: str = DEFAULT_NAME) -> dict[str, Any]:
    state = require_state(name)
    try:
        st, err = query_status(state)
    except LabError as e:
        st, err = None, str(e)
    return status_doc(state, st, err)
